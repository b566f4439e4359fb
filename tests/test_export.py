"""ONNX export of the shipped checkpoint, checked by ONNX Runtime against PyTorch."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from panorama.geometry import STANDARD_12, resolve_views
from panorama.records import read_record
from panorama.synth import Synthesizer


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from export.onnx import export_onnx
    from panorama.synth import default_checkpoint

    path = export_onnx(default_checkpoint(), tmp_path_factory.mktemp("onnx") / "model.onnx")
    return path, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(sess, synth, x, inputs, queries):
    feeds = {"x": x[None].astype(np.float32), "in_views": synth.angles(inputs)[None],
             "mask": np.ones((1, len(inputs)), bool), "q_views": synth.angles(queries)[None]}
    return sess.run(None, feeds)[0][0]


def test_onnx_is_valid_and_describes_itself(exported):
    proto = onnx.load(str(exported[0]))
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["fs"] == "500" and meta["units"] == "mV" and len(meta["model_sha256"]) == 64
    assert proto.opset_import[0].version >= 17
    assert [i.name for i in proto.graph.input] == ["x", "in_views", "mask", "q_views"]


def test_onnxruntime_matches_pytorch_within_1_uv_on_a_real_record(exported, data_dir):
    synth = Synthesizer.load()
    rec = read_record(data_dir / "ludb" / "ludb001")
    x = np.stack([rec.lead(n) for n in STANDARD_12])
    inputs, queries = resolve_views(",".join(STANDARD_12)), resolve_views("V2,V6,V7,V4R,120:45")
    err = np.abs(_run(exported[1], synth, x, inputs, queries) - synth(x, inputs, queries)).max()
    assert err < 1e-3  # mV: 1 µV


def test_dynamic_leads_views_and_time(exported):
    synth = Synthesizer.load()
    x = np.random.default_rng(0).standard_normal((3, 1200)).astype(np.float32) * 0.3
    inputs, queries = resolve_views("I,II,V3"), resolve_views("V7")
    y = _run(exported[1], synth, x, inputs, queries)
    assert y.shape == (1, 1200)
    assert np.abs(y - synth(x, inputs, queries)).max() < 1e-3


def test_backends_are_chosen_by_name_with_clear_errors():
    from edge.backends import make_backend
    from panorama.synth import default_checkpoint

    with pytest.raises(ValueError, match="unknown backend 'tensorrt'; choose one of torch, onnxruntime"):
        make_backend("tensorrt", default_checkpoint())
    torch_backend = make_backend("torch", default_checkpoint())
    x = np.random.default_rng(1).standard_normal((1, 3, 800)).astype(np.float32) * 0.3
    views = Synthesizer.angles(resolve_views("I,II,V3"))[None]
    y = torch_backend.run(x, views, np.ones((1, 3), bool), Synthesizer.angles(resolve_views("V7"))[None])
    assert y.shape == (1, 1, 800) and np.isfinite(y).all()
