"""ONNX export of the shipped checkpoint, checked by ONNX Runtime against PyTorch."""

import os
import re
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from panorama.geometry import STANDARD_12, redundant_limb_leads, resolve_views
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
             "mask": ~redundant_limb_leads([v.name for v in inputs])[None],  # as the synthesizer masks
             "q_views": synth.angles(queries)[None]}
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


def test_export_onnx_checks_itself_against_pytorch(exported, panorama, tmp_path):
    from export.onnx import check_parity, export_onnx
    from panorama import checkpoint
    from panorama.errors import BackendError
    from panorama.synth import DEFAULT_CHECKPOINTS

    r = panorama("export", "onnx", "--out", tmp_path / "m.onnx")
    assert r.returncode == 0, r.stderr
    err = float(re.search(r"wrote .*m.onnx: ONNX Runtime matches PyTorch within ([\d.e-]+) µV", r.stdout).group(1))
    assert 0 < err < 1.0
    # an export that is not of the model it claims (here: Stage I's, checked against Stage II) is refused
    other, _ = checkpoint.load(DEFAULT_CHECKPOINTS["calibrated"])
    with pytest.raises(BackendError, match=r"ONNX Runtime differs from PyTorch by [\d.]+ µV \(at most "
                       r"1 µV for fp32\): the export is refused"):
        check_parity(other, exported[0])
    before = (tmp_path / "m.onnx").read_bytes()

    def refuse(model, path):
        raise BackendError("refused by the check")

    with pytest.raises(BackendError, match="refused by the check"):
        export_onnx(DEFAULT_CHECKPOINTS["pretrained"], tmp_path / "m.onnx", verify=refuse)
    assert (tmp_path / "m.onnx").read_bytes() == before and sorted(tmp_path.iterdir()) == [tmp_path / "m.onnx"]


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

    with pytest.raises(ValueError, match="unknown backend 'tensorrt8'; choose one of torch, onnxruntime, tensorrt"):
        make_backend("tensorrt8", default_checkpoint())
    torch_backend = make_backend("torch", default_checkpoint())
    x = np.random.default_rng(1).standard_normal((1, 3, 800)).astype(np.float32) * 0.3
    views = Synthesizer.angles(resolve_views("I,II,V3"))[None]
    y = torch_backend.run(x, views, np.ones((1, 3), bool), Synthesizer.angles(resolve_views("V7"))[None])
    assert y.shape == (1, 1, 800) and np.isfinite(y).all()


def test_upsampling_rewrite_is_linear_interpolation():
    import torch
    import torch.nn.functional as F

    from export.onnx import upsample2

    x = torch.randn(3, 5, 17, dtype=torch.float64)
    want = F.interpolate(x, scale_factor=2.0, mode="linear", align_corners=False)
    assert torch.allclose(upsample2(x), want, atol=1e-12)


def test_export_leaves_the_loaded_model_usable():
    import torch

    from export.onnx import plain_copy
    from panorama import checkpoint
    from panorama.synth import default_checkpoint

    model, _ = checkpoint.load(default_checkpoint())
    args = (torch.randn(1, 3, 64) * 0.3, Synthesizer.angles(resolve_views("I,II,V3"))[None],
            torch.ones(1, 3, dtype=torch.bool), Synthesizer.angles(resolve_views("V7"))[None])
    args = tuple(torch.as_tensor(a) for a in args)
    with torch.no_grad():
        before = model(*args)
        plain = plain_copy(model)  # spectral norm folded in the copy only (a deep copy shared its class)
        assert torch.equal(model(*args), before)
        assert torch.allclose(plain(*args), before, atol=1e-6)


def test_fp16_export_keeps_float32_io_and_matches(exported, data_dir, tmp_path):
    from export.onnx import export_onnx
    from panorama.synth import default_checkpoint

    path = export_onnx(default_checkpoint(), tmp_path / "half.onnx", precision="fp16")
    proto = onnx.load(str(path))
    assert {p.key: p.value for p in proto.metadata_props}["precision"] == "fp16"
    f32 = onnx.TensorProto.FLOAT
    assert [i.type.tensor_type.elem_type for i in proto.graph.input] == [f32, f32, onnx.TensorProto.BOOL, f32]
    assert proto.graph.output[0].type.tensor_type.elem_type == f32
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer)
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # some CPU builds lack half kernels; the export itself is what is tested
        pytest.skip(f"ONNX Runtime cannot run the fp16 model here: {exc}")
    synth = Synthesizer.load()
    rec = read_record(data_dir / "ludb" / "ludb001")
    x = np.stack([rec.lead(n) for n in STANDARD_12])[:, :2000]  # ONNX Runtime runs half slowly on a CPU
    inputs, queries = resolve_views(",".join(STANDARD_12)), resolve_views("V2,V6,V7,V4R,120:45")
    err = np.abs(_run(sess, synth, x, inputs, queries) - synth(x, inputs, queries)).max()
    assert err < 5e-3  # mV: 5 µV (measured 0.6 µV; the geometry stays float32)


def test_cached_onnx_exports_once_per_checkpoint_version_and_precision(tmp_path, monkeypatch):
    from edge.backends.onnxruntime import OnnxRuntimeBackend
    from export.onnx import EXPORT_VERSION, cached_onnx, onnx_metadata
    from panorama import checkpoint
    from panorama.errors import BackendError
    from panorama.synth import default_checkpoint

    monkeypatch.setenv("PANORAMA_CACHE", str(tmp_path / "cache"))
    path = cached_onnx(default_checkpoint())
    sha = checkpoint.read_header(default_checkpoint())["sha256"]
    assert path == tmp_path / "cache" / "onnx" / f"{sha[:32]}-v{EXPORT_VERSION}-fp32.onnx"
    stamp = path.stat().st_mtime_ns
    assert cached_onnx(default_checkpoint()) == path and path.stat().st_mtime_ns == stamp  # not re-exported
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left
    assert cached_onnx(path) == path  # an exported model is used as it is
    backend = OnnxRuntimeBackend(path, threads=1)
    assert backend.run(np.zeros((1, 3, 100), np.float32), Synthesizer.angles(resolve_views("I,II,V3"))[None],
                       np.ones((1, 3), bool), Synthesizer.angles(resolve_views("V7"))[None]).shape == (1, 1, 100)
    for bad in (path.read_bytes()[:5000], b"\x00" * 4000):  # truncated, or not ONNX at all: exported again
        path.write_bytes(bad)
        assert cached_onnx(default_checkpoint()) == path and onnx_metadata(path)["model_sha256"] == sha
    other = tmp_path / "other.onnx"  # a whole export of another checkpoint put in its place: exported again
    _replace_metadata(path, other, model_sha256="0" * 64)
    other.replace(path)
    assert cached_onnx(default_checkpoint()) == path and onnx_metadata(path)["model_sha256"] == sha
    stale = path.parent / f".{path.name}.999.tmp.onnx"  # an hour-old temp file of a writer that died
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200,) * 2)
    path.unlink()
    cached_onnx(default_checkpoint())
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    (tmp_path / "blocker").write_text("")
    monkeypatch.setenv("PANORAMA_CACHE", str(tmp_path / "blocker"))
    with pytest.raises(BackendError, match=r"blocker/onnx is not writable.*PANORAMA_CACHE"):
        cached_onnx(default_checkpoint())


def _replace_metadata(src, dst, **values) -> None:
    proto = onnx.load(str(src))
    for p in proto.metadata_props:
        if p.key in values:
            p.value = values[p.key]
    onnx.save(proto, str(dst))


def test_export_onto_a_folder_says_so(tmp_path):
    from export.onnx import export_onnx
    from panorama.errors import BackendError
    from panorama.synth import default_checkpoint

    (tmp_path / "m.onnx").mkdir()
    with pytest.raises(BackendError, match=r"exporting .*: cannot write .*/m.onnx: it is a folder"):
        export_onnx(default_checkpoint(), tmp_path / "m.onnx")


def test_export_into_a_read_only_folder_says_so_and_leaves_what_was_there(tmp_path):
    from export.onnx import export_onnx
    from panorama.errors import BackendError
    from panorama.synth import default_checkpoint

    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "m.onnx").write_bytes(b"the previous export")
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("root writes to read-only folders")
        with pytest.raises(BackendError, match=r"exporting .*: cannot write .*ro/m.onnx: .*Permission denied"):
            export_onnx(default_checkpoint(), ro / "m.onnx")
        assert (ro / "m.onnx").read_bytes() == b"the previous export" and sorted(os.listdir(ro)) == ["m.onnx"]
    finally:
        ro.chmod(0o755)
