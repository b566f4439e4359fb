"""TensorRT engines from the ONNX export: one optimisation profile, built on the device that
runs them, kept in the engine cache (export/cache.py).

    Builder → network → OnnxParser → config (workspace limit, profile, timing cache)
            → build_serialized_network → EngineCache.store → Runtime.deserialize_cuda_engine

Precision: on TensorRT 10.x (JetPack 6 ships 10.3) FP16 is ``BuilderFlag.FP16`` on the
float32 ONNX (TensorRT may then run any layer in half). TensorRT 11 removed that flag and
types every network strongly, so there an fp16 engine is built from the fp16 ONNX export
(half inside; float32 inputs, outputs and geometry); on 10.x that export is built as a
strongly typed network, the one case where the creation flag is needed. fp32
engines clear TF32, which would otherwise round convolutions and matmuls to 10-bit mantissas
on Ampere and later GPUs (Jetson Orin is Ampere).

TensorRT and cuda-python are imported inside the functions that need them, so the profile
and the cache work (and are tested) without either.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from panorama.errors import BackendError
from panorama.model import DOWNSAMPLE

from .cache import EngineCache, EngineKey, atomic_write, file_sha256

log = logging.getLogger(__name__)

WORKSPACE_MIB = 1024


def _triple(name: str, value) -> tuple[int, int, int]:
    try:
        lo, opt, hi = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"profile {name}: expected MIN,OPT,MAX integers, got {value!r}") from None
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"profile {name}: need 1 <= MIN <= OPT <= MAX, got {lo},{opt},{hi}")
    return lo, opt, hi


@dataclass(frozen=True)
class Profile:
    """The input shapes an engine accepts, (min, opt, max) per dynamic axis. ``time`` is in
    samples at 500 Hz (multiples of 8: the encoder's stride); the defaults take 0.5 to 10.24 s,
    up to 32 windows, 12 leads and 16 views, and are tuned for 5 s × 12 leads → 8 views."""

    time: tuple[int, int, int] = (256, 2560, 5120)
    batch: tuple[int, int, int] = (1, 8, 32)
    leads: tuple[int, int, int] = (1, 12, 12)
    views: tuple[int, int, int] = (1, 8, 16)

    def __post_init__(self):
        for name in ("time", "batch", "leads", "views"):
            object.__setattr__(self, name, _triple(name, getattr(self, name)))
        bad = [v for v in self.time if v % DOWNSAMPLE]
        if bad:
            raise ValueError(f"profile time: {', '.join(map(str, bad))} not a multiple of {DOWNSAMPLE} samples")

    @staticmethod
    def parse_time(text: str) -> tuple[int, int, int]:
        """``"256,2560,5120"`` → (256, 2560, 5120)."""
        parts = text.split(",")
        if len(parts) != 3:
            raise ValueError(f"--profile wants MIN,OPT,MAX samples (e.g. 256,2560,5120), got {text!r}")
        return _triple("time", parts)

    def with_max(self, batch: int | None = None, leads: int | None = None, views: int | None = None) -> "Profile":
        """This profile with lower maxima (opt clipped to them): smaller engines, less memory."""
        def cap(triple, hi):
            return triple if hi is None else (min(triple[0], hi), min(triple[1], hi), hi)
        return Profile(self.time, cap(self.batch, batch), cap(self.leads, leads), cap(self.views, views))

    def shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shapes of x (B, L, T), in_views (B, L, 3), mask (B, L), q_views (B, Q, 3)."""
        def each(fn):
            return tuple(fn(i) for i in range(3))
        b, l, q, t = self.batch, self.leads, self.views, self.time
        return {"x": each(lambda i: (b[i], l[i], t[i])), "in_views": each(lambda i: (b[i], l[i], 3)),
                "mask": each(lambda i: (b[i], l[i])), "q_views": each(lambda i: (b[i], q[i], 3))}

    def describe(self) -> str:
        """Canonical text (part of the engine key)."""
        return ", ".join(f"{n} {'/'.join(map(str, getattr(self, n)))}" for n in ("batch", "leads", "views", "time"))

    def check(self, batch: int, leads: int, views: int, samples: int) -> None:
        """A clear error for a run outside the profile (TensorRT's own is an opaque log line)."""
        out = [f"{n} {v} (allowed {lo}..{hi})" for n, v, (lo, _, hi) in
               (("batch", batch, self.batch), ("leads", leads, self.leads), ("views", views, self.views),
                ("samples", samples, self.time)) if not lo <= v <= hi]
        if out:
            raise BackendError(f"input outside the engine's profile ({self.describe()}): {', '.join(out)}; "
                               "build an engine with a wider profile (panorama export tensorrt --profile/--max-*)")


# --- device and library identity -------------------------------------------------------------

def cudart():
    """cuda-python's runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime
    return runtime


def cuda_call(result):
    """Unpack a cuda-python call's (error, value...) tuple, raising on an error."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(getattr(err, "value", err)) != 0:
        raise BackendError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else tuple(rest) or None


def gpu_identity(device: int = 0) -> dict:
    """Name, compute capability and SM count of a CUDA device: cuda-python, else torch."""
    try:
        rt = cudart()
        prop = cuda_call(rt.cudaGetDeviceProperties(device))
        name = prop.name
        name = name.split(b"\0", 1)[0].decode() if isinstance(name, (bytes, bytearray)) else str(name)
        return {"gpu": name.strip(), "compute_capability": f"{prop.major}.{prop.minor}",
                "sm_count": int(prop.multiProcessorCount)}
    except ImportError:
        pass
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(device)
        return {"gpu": p.name, "compute_capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count}
    raise BackendError("cannot identify the CUDA GPU: install cuda-python (pip install cuda-python) "
                       "or a CUDA build of torch")


@functools.lru_cache(maxsize=None)
def trt_logger():
    """One logger for every builder and runtime (TensorRT warns when they differ)."""
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def fp16_from_onnx() -> bool:
    """True where FP16 must come from the ONNX itself (TensorRT ≥ 11: no BuilderFlag.FP16)."""
    import tensorrt as trt

    return not hasattr(trt.BuilderFlag, "FP16")


def onnx_precision(onnx: Path) -> str:
    """The precision an ONNX export records in its metadata (exports before it: fp32)."""
    from .onnx import onnx_metadata

    return onnx_metadata(onnx).get("precision", "fp32")


def check_onnx_precision(onnx: Path, precision: str, fp16_flag: bool) -> None:
    """An engine's precision must be what it says: fp16 comes from BuilderFlag.FP16 on the
    float32 export (TensorRT 10) or from the fp16 export (TensorRT 11), never silently fp32."""
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be fp32 or fp16, got {precision!r}")
    have = onnx_precision(onnx)
    if have == "fp16" and precision != "fp16":
        raise ValueError(f"{onnx} is an fp16 export; build it with --fp16 (or export the fp32 ONNX)")
    if precision == "fp16" and not fp16_flag and have != "fp16":
        raise ValueError(f"this TensorRT has no FP16 builder flag (TensorRT 11 and later): build fp16 "
                         f"engines from an fp16 export (panorama export onnx --precision fp16), not {onnx}")


def engine_key(onnx: Path, precision: str, profile: Profile, device: int = 0) -> EngineKey:
    import tensorrt as trt

    return EngineKey(tensorrt=trt.__version__, **gpu_identity(device), precision=precision,
                     profile=profile.describe(), onnx_sha256=file_sha256(onnx))


# --- build -------------------------------------------------------------------------------------

def build_engine(onnx: Path, precision: str, profile: Profile, timing_cache: Path | None = None,
                 workspace_mib: int = WORKSPACE_MIB) -> bytes:
    """Build a serialized engine from ``onnx``; minutes on a Jetson."""
    import tensorrt as trt

    fp16_flag = hasattr(trt.BuilderFlag, "FP16")
    check_onnx_precision(onnx, precision, fp16_flag)
    # strong typing is asked for only where it is needed: an fp16 export on TensorRT 10 (so its
    # float32 geometry stays float32). TensorRT 11 types every network strongly anyway.
    strong = fp16_flag and onnx_precision(onnx) == "fp16"
    logger = trt_logger()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strong else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx).read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        for e in errors:
            log.error("TensorRT ONNX parser: %s", e)
        raise BackendError(f"TensorRT could not parse {onnx}: " + " | ".join(errors or ["no detail"]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if hasattr(trt.BuilderFlag, "TF32"):  # fp32 means fp32: see the module docstring
        config.clear_flag(trt.BuilderFlag.TF32)
    if precision == "fp16" and fp16_flag and not strong:
        config.set_flag(trt.BuilderFlag.FP16)
    opt = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile.shapes().items():
        opt.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(opt)
    if timing_cache is not None:
        known = timing_cache.read_bytes() if timing_cache.is_file() else b""
        if not config.set_timing_cache(config.create_timing_cache(known), ignore_mismatch=False):
            log.warning("timing cache %s is from another device; starting a fresh one", timing_cache)
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build an engine from {onnx} ({precision}, {profile.describe()}); "
                           "its log above says why")
    if timing_cache is not None:
        atomic_write(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


# --- load (or build) through the cache ---------------------------------------------------------

@dataclass
class LoadedEngine:
    engine: object  # tensorrt.ICudaEngine
    runtime: object  # the Runtime must outlive its engines
    key: EngineKey
    path: Path
    built: bool  # False: loaded from the cache
    seconds: float  # to build and load, or to load
    notes: list[str] = field(default_factory=list)


def _timing_cache_path(cache: EngineCache, key: EngineKey) -> Path:
    # timing caches hold per-GPU, per-version measurements: one file per (TensorRT, GPU)
    tag = hashlib.sha256(f"{key.tensorrt}|{key.gpu}|{key.compute_capability}".encode()).hexdigest()[:16]
    return cache.dir / f"timing-{tag}.cache"


def get_engine(onnx: str | Path, cache_dir: str | Path | None = None, precision: str = "fp32",
               profile: Profile | None = None, device: int = 0, workspace_mib: int = WORKSPACE_MIB) -> LoadedEngine:
    """The engine for ``onnx`` on this GPU and TensorRT: loaded from the cache when a verified,
    compatible one is there, built (loudly) and stored otherwise. An engine TensorRT refuses to
    deserialize (another GPU or version that the key did not catch) is rebuilt too."""
    import tensorrt as trt

    onnx, profile = Path(onnx), profile or Profile()
    t0 = time.perf_counter()
    check_onnx_precision(onnx, precision, fp16_flag=hasattr(trt.BuilderFlag, "FP16"))
    cache = EngineCache(cache_dir)
    key = engine_key(onnx, precision, profile, device)
    runtime = trt.Runtime(trt_logger())
    found = cache.lookup(key)
    if found.hit:
        engine = runtime.deserialize_cuda_engine(found.data)
        if engine is not None:
            return LoadedEngine(engine, runtime, key, found.path, False, time.perf_counter() - t0)
        found.reason = "TensorRT refused to deserialize the cached engine (built for another GPU or version)"
    notes = [found.reason]
    with cache.lock(key):
        again = cache.lookup(key)  # another process may have built it while we waited for the lock
        if again.hit and (engine := runtime.deserialize_cuda_engine(again.data)) is not None:
            return LoadedEngine(engine, runtime, key, again.path, False, time.perf_counter() - t0, notes)
        log.warning("building a TensorRT engine (%s, %s) for %s on %s with TensorRT %s: %s. This takes "
                    "minutes (up to ~10 on a Jetson); it is cached in %s for the next start",
                    precision, profile.describe(), onnx.name, key.gpu, key.tensorrt, found.reason, cache.dir)
        t_build = time.perf_counter()
        data = build_engine(onnx, precision, profile, _timing_cache_path(cache, key), workspace_mib)
        build_s = time.perf_counter() - t_build
        path = cache.store(key, data, build_s)
        log.warning("built the TensorRT engine in %.0f s: %s", build_s, path)
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise BackendError(f"TensorRT cannot load the engine it just built ({path})")
    return LoadedEngine(engine, runtime, key, path, True, time.perf_counter() - t0, notes)
