"""TensorRT engines: the engine cache and the profile (always: plain files, no TensorRT), and
build-and-run parity against PyTorch (only where TensorRT and a CUDA GPU are present).

The cache tests store arbitrary bytes as "engines": they test the cache, not TensorRT.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest

from export.cache import EngineCache, EngineKey, atomic_write, default_engine_dir
from export.tensorrt import Profile
from panorama.errors import BackendError

KEY = EngineKey(tensorrt="10.3.0", gpu="Orin (nvgpu)", compute_capability="8.7", sm_count=8,
                precision="fp16", profile=Profile().describe(), onnx_sha256="ab" * 32)


# --- the key ---------------------------------------------------------------------------------

def test_digest_is_stable_and_every_field_changes_it():
    assert KEY.digest == EngineKey(**vars(KEY)).digest
    assert KEY.digest == "f38c61fa1b2830ba5f226de360b76a79"  # golden: a change here orphans every cached engine
    changed = {"tensorrt": "10.4.0", "gpu": "NVIDIA H100", "compute_capability": "9.0", "sm_count": 16,
               "precision": "fp32", "profile": Profile(batch=(1, 1, 1)).describe(), "onnx_sha256": "cd" * 32}
    digests = {replace(KEY, **{k: v}).digest for k, v in changed.items()}
    assert len(digests) == len(changed) and KEY.digest not in digests


def test_a_miss_names_the_field_that_differs(tmp_path):
    cache = EngineCache(tmp_path)
    cache.store(KEY, b"engine for 10.3", 1.0)
    found = cache.lookup(replace(KEY, tensorrt="10.4.0"))
    assert not found.hit
    assert "no cached engine" in found.reason and "tensorrt '10.3.0' (cached) vs '10.4.0' (wanted)" in found.reason
    assert cache.lookup(KEY).data == b"engine for 10.3"


def test_sidecar_holds_the_key_and_the_engine_hash(tmp_path):
    cache = EngineCache(tmp_path)
    path = cache.store(KEY, b"\x00engine bytes\xff", 12.5)
    assert path == tmp_path / f"{KEY.digest}.engine"
    meta = json.loads((tmp_path / f"{KEY.digest}.json").read_text())
    assert meta["key"] == vars(KEY)
    assert meta["engine_bytes"] == 14 and len(meta["engine_sha256"]) == 64
    assert meta["build_seconds"] == 12.5 and meta["panorama_version"] and meta["built_at"].endswith("Z")


def test_a_sidecar_whose_key_differs_is_refused_with_the_field(tmp_path):
    cache = EngineCache(tmp_path)
    cache.store(KEY, b"x" * 100, 1.0)
    sidecar = tmp_path / f"{KEY.digest}.json"
    meta = json.loads(sidecar.read_text())
    meta["key"]["precision"] = "fp32"  # edited, or written by a buggy version
    sidecar.write_text(json.dumps(meta))
    found = cache.lookup(KEY)
    assert not found.hit and found.reason.startswith("key mismatch: precision 'fp32' (cached)")


# --- integrity and atomicity -----------------------------------------------------------------

def test_truncated_or_corrupted_engines_are_detected(tmp_path):
    cache = EngineCache(tmp_path)
    engine = cache.store(KEY, bytes(range(256)) * 40, 1.0)
    engine.write_bytes(bytes(range(256)) * 20)
    assert "truncated: 5120 bytes, sidecar says 10240" in cache.lookup(KEY).reason
    engine.write_bytes(bytes(range(255, -1, -1)) * 40)  # same size, other bytes
    assert "corrupt" in cache.lookup(KEY).reason
    engine.unlink()
    assert "missing" in cache.lookup(KEY).reason
    (tmp_path / f"{KEY.digest}.json").write_text("{not json")
    assert "unreadable or corrupt" in cache.lookup(KEY).reason


def test_a_crash_while_writing_leaves_no_partial_files(tmp_path, monkeypatch):
    cache = EngineCache(tmp_path)
    real_replace = os.replace

    def dies(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", dies)
    with pytest.raises(OSError, match="disk full"):
        cache.store(KEY, b"engine", 1.0)
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".lock"]  # nothing, not even a temp file

    # dies between the engine and its sidecar: the engine is there, the entry is not complete
    calls = []

    def second_dies(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_dies)
    with pytest.raises(OSError, match="power cut"):
        cache.store(KEY, b"engine", 1.0)
    assert (tmp_path / f"{KEY.digest}.engine").is_file()
    found = cache.lookup(KEY)
    assert not found.hit and "no cached engine" in found.reason


def test_stale_temp_files_are_ignored_and_swept(tmp_path):
    cache = EngineCache(tmp_path)
    stale = tmp_path / f".{KEY.digest}.engine.abc123.tmp"
    stale.write_bytes(b"half an engine")
    fresh = tmp_path / f".{KEY.digest}.json.def456.tmp"
    fresh.write_bytes(b"{")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    assert not cache.lookup(KEY).hit
    cache.store(KEY, b"whole engine", 1.0)
    assert cache.lookup(KEY).data == b"whole engine"
    assert not stale.exists() and fresh.exists()  # a fresh one may be another writer's


def test_atomic_write_replaces_whole(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write(target, b"old")
    atomic_write(target, b"new contents")
    assert target.read_bytes() == b"new contents" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_an_unwritable_cache_dir_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(BackendError, match=r"not-a-dir/engines is not writable.*PANORAMA_CACHE"):
        EngineCache(blocker / "engines")
    monkeypatch.setenv("PANORAMA_CACHE", str(blocker))
    assert default_engine_dir() == blocker / "engines"
    with pytest.raises(BackendError, match="PANORAMA_CACHE"):
        EngineCache()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_cache_dir_is_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(BackendError, match="is not writable"):
        EngineCache(ro)


HOLD = """
import json, sys, time
from export.cache import EngineCache, EngineKey
cache = EngineCache(sys.argv[1])
with cache.lock(EngineKey(**json.loads(sys.argv[3]))):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_the_build_lock_keeps_a_second_process_out(tmp_path):
    cache = EngineCache(tmp_path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "1.5", json.dumps(vars(KEY))], cwd=root,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with pytest.raises(BackendError, match="locked by another process"):
            with cache.lock(KEY, timeout=0.3):
                pass
        assert time.monotonic() - t0 < 1.2
        with cache.lock(KEY, timeout=10):  # the holder finishes; the waiter gets it
            pass
    finally:
        holder.wait(timeout=10)
    with cache.lock(replace(KEY, precision="fp32"), timeout=0):  # other keys never wait
        pass


# --- the profile -----------------------------------------------------------------------------

def test_profile_defaults_and_shapes():
    p = Profile()
    s = p.shapes()
    assert s["x"] == ((1, 1, 256), (8, 12, 2560), (32, 12, 5120))
    assert s["in_views"] == ((1, 1, 3), (8, 12, 3), (32, 12, 3))
    assert s["mask"] == ((1, 1), (8, 12), (32, 12))
    assert s["q_views"] == ((1, 1, 3), (8, 8, 3), (32, 16, 3))
    assert p.describe() == "batch 1/8/32, leads 1/12/12, views 1/8/16, time 256/2560/5120"
    with pytest.raises(Exception):
        p.batch = (1, 1, 1)  # frozen: a profile is part of an engine's key


def test_profile_parsing_and_limits():
    assert Profile.parse_time("512,2560,5120") == (512, 2560, 5120)
    p = Profile(time=Profile.parse_time("512,2560,5120")).with_max(batch=4, views=8)
    assert p.batch == (1, 4, 4) and p.views == (1, 8, 8) and p.leads == (1, 12, 12)


@pytest.mark.parametrize("text, message", [
    ("256,2560", "MIN,OPT,MAX"),
    ("256,2560,5004", "5004 not a multiple of 8"),
    ("2560,256,5120", "MIN <= OPT <= MAX"),
    ("0,256,5120", "MIN <= OPT <= MAX"),
    ("a,b,c", "integers"),
])
def test_profile_errors_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        Profile(time=Profile.parse_time(text))


def test_profile_check_names_the_profile():
    p = Profile()
    p.check(1, 12, 8, 5000)
    with pytest.raises(BackendError, match=r"views 20 \(allowed 1\.\.16\).*panorama export tensorrt"):
        p.check(1, 12, 20, 5000)
    with pytest.raises(BackendError, match=r"batch 1/8/32.*samples 6000"):
        p.check(1, 12, 8, 6000)


# --- without TensorRT ------------------------------------------------------------------------

def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.skipif(_has("tensorrt"), reason="TensorRT is installed here")
def test_tensorrt_backend_without_tensorrt_names_the_package():
    from edge.backends import make_backend
    from panorama.synth import default_checkpoint

    with pytest.raises(BackendError, match=r"backend 'tensorrt' needs tensorrt.*JetPack"):
        make_backend("tensorrt", default_checkpoint())


def test_export_tensorrt_checks_its_arguments_first(tmp_path, capsys):
    from panorama_cli import main

    def export(*args):
        code = main(["export", "tensorrt", "--onnx", str(tmp_path / "m.onnx"), *args])
        return code, capsys.readouterr().err

    code, err = export("--profile", "250,2560,5120")
    assert code == 2 and "250 not a multiple of 8" in err
    code, err = export("--max-batch", "0")
    assert code == 2 and "profile batch" in err
    code, err = export()
    assert code == 2 and "no ONNX file" in err
    if not _has("tensorrt"):
        (tmp_path / "m.onnx").write_bytes(b"")
        code, err = export()
        assert code == 2 and "TensorRT is not installed" in err


# --- with TensorRT and a GPU: build, cache, run, parity ----------------------------------------

def _needs_gpu():
    pytest.importorskip("tensorrt")
    pytest.importorskip("cuda")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")


SMALL = Profile(time=(256, 2560, 5120), batch=(1, 1, 2), leads=(1, 12, 12), views=(1, 8, 8))


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("precision, tol_uv", [("fp32", 1.0), ("fp16", 50.0)])
def test_tensorrt_matches_pytorch(precision, tol_uv, tmp_path, monkeypatch):
    _needs_gpu()
    from edge.backends.tensorrt import TensorRTBackend
    from panorama.geometry import STANDARD_12, redundant_limb_leads, resolve_views
    from panorama.synth import Synthesizer, default_checkpoint

    monkeypatch.setenv("PANORAMA_CACHE", str(tmp_path))
    backend = TensorRTBackend(default_checkpoint(), precision=precision, profile=SMALL)
    assert backend.loaded.built
    synth = Synthesizer.load()
    rng = np.random.default_rng(3)
    x = np.cumsum(rng.standard_normal((12, 4000)), axis=1).astype(np.float32) * 0.02  # smooth, mV-sized
    inputs, queries = resolve_views(",".join(STANDARD_12)), resolve_views("V2,V6,V7,V4R,120:45")
    want = synth(x, inputs, queries)
    keep = ~redundant_limb_leads([v.name for v in inputs])[None]  # as the synthesizer masks
    got = backend.run(x[None], synth.angles(inputs)[None], keep, synth.angles(queries)[None])[0]
    assert np.abs(got - want).max() * 1000 < tol_uv
    with pytest.raises(BackendError, match="outside the engine's profile"):
        backend.run(x[None], synth.angles(inputs)[None], np.ones((1, 12), bool),
                    np.repeat(synth.angles(queries)[None], 2, axis=1))
    backend.close()

    again = TensorRTBackend(default_checkpoint(), precision=precision, profile=SMALL, warmup=0)
    assert not again.loaded.built and again.loaded.seconds < 5
    again.close()
