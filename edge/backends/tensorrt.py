"""The TensorRT backend: the checkpoint's ONNX export (cached) built into an engine for this
GPU and TensorRT version (cached, see export/cache.py), run through cuda-python.

One execution context, reused (a context per request leaks memory: TensorRT#582); pinned host
and device buffers allocated once, at the profile's maximum shapes; one CUDA stream. Every
run copies the inputs in, sets the shapes, enqueues, copies the output back and waits. Runs
are serialised by a lock: one context cannot run two requests at once.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import numpy as np
import tensorrt as trt  # noqa: F401  (imported first: a missing TensorRT is the error to report)

from export.onnx import cached_onnx
from export.tensorrt import Profile, cuda_call, cudart, fp16_from_onnx, get_engine
from panorama.devices import cuda_index
from panorama.errors import BackendError
from panorama.model import DOWNSAMPLE

log = logging.getLogger(__name__)

_rt = cudart()  # ImportError here names the cuda package; make_backend turns it into advice


class _Buffer:
    """A pinned host array and a device allocation of the same size."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(shape)) * self.dtype.itemsize
        self.host_ptr = cuda_call(_rt.cudaMallocHost(self.nbytes))
        raw = (ctypes.c_byte * self.nbytes).from_address(int(self.host_ptr))
        self.host = np.frombuffer(raw, dtype=self.dtype)  # flat; viewed per call at the call's shape
        self.device = int(cuda_call(_rt.cudaMalloc(self.nbytes)))

    def free(self) -> None:
        cuda_call(_rt.cudaFree(self.device))
        cuda_call(_rt.cudaFreeHost(self.host_ptr))


def _device_index(device: str) -> int:
    return cuda_index(device, "the tensorrt backend")


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, ckpt: Path, device: str = "cuda", precision: str = "fp32", profile: Profile | None = None,
                 cache_dir: Path | None = None, warmup: int = 3):
        self.device = _device_index(device)
        cuda_call(_rt.cudaSetDevice(self.device))
        self.profile = profile or Profile()
        onnx_precision = "fp16" if precision == "fp16" and fp16_from_onnx() else "fp32"
        self.loaded = get_engine(cached_onnx(ckpt, onnx_precision), cache_dir, precision, self.profile, self.device)
        engine = self.loaded.engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError("TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = cuda_call(_rt.cudaStreamCreate())
        self._stream_handle = int(self.stream)
        largest = {name: shapes[2] for name, shapes in self.profile.shapes().items()}
        b, q, t = self.profile.batch[2], self.profile.views[2], self.profile.time[2]
        largest["y"] = (b, q, t)
        self.buffers = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            self.buffers[name] = _Buffer(largest[name], trt.nptype(engine.get_tensor_dtype(name)))
            self.context.set_tensor_address(name, self.buffers[name].device)  # fixed for the context's life
        self._lock = threading.Lock()
        rng = np.random.default_rng(0)
        b, l, q, t = self.profile.batch[1], self.profile.leads[1], self.profile.views[1], self.profile.time[1]
        views = np.stack([rng.uniform(10, 170, (b, l + q)), rng.uniform(-180, 180, (b, l + q)),
                          np.zeros((b, l + q))], -1).astype(np.float32)
        for _ in range(warmup):  # the first runs pay for lazy initialisation: not the first patient's
            self.run(np.zeros((b, l, t), np.float32), views[:, :l], np.ones((b, l), bool), views[:, l:])

    def run(self, x, in_views, mask, q_views) -> np.ndarray:
        t = x.shape[-1]
        # whole multiples of the encoder's stride, and at least the profile's shortest window
        padded = max(t + (-t) % DOWNSAMPLE, self.profile.time[0])
        if padded > t:
            x = np.concatenate([x, np.repeat(x[..., -1:], padded - t, axis=-1)], axis=-1)
        b, l, _ = x.shape
        q = q_views.shape[1]
        self.profile.check(b, l, q, padded)
        feeds = {"x": x, "in_views": in_views, "mask": mask, "q_views": q_views}
        with self._lock:
            cuda_call(_rt.cudaSetDevice(self.device))  # the current device is per thread
            h2d, d2h = _rt.cudaMemcpyKind.cudaMemcpyHostToDevice, _rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
            for name, value in feeds.items():
                buf = self.buffers[name]
                value = np.asarray(value, dtype=buf.dtype)
                buf.host[: value.size] = value.ravel()
                if not self.context.set_input_shape(name, value.shape):
                    raise BackendError(f"TensorRT refused shape {value.shape} for {name} "
                                       f"(profile {self.profile.describe()})")
                cuda_call(_rt.cudaMemcpyAsync(buf.device, buf.host_ptr, value.nbytes, h2d, self.stream))
            if not self.context.execute_async_v3(self._stream_handle):
                raise BackendError("TensorRT execution failed (see its log)")
            out = self.buffers["y"]
            shape = tuple(self.context.get_tensor_shape("y"))
            n = int(np.prod(shape)) * out.dtype.itemsize
            cuda_call(_rt.cudaMemcpyAsync(out.host_ptr, out.device, n, d2h, self.stream))
            cuda_call(_rt.cudaStreamSynchronize(self.stream))
            y = out.host[: n // out.dtype.itemsize].reshape(shape)[..., :t].copy()
        return y.astype(np.float32, copy=False)

    def close(self) -> None:
        """Free the buffers and the stream (the process exiting does the same)."""
        with self._lock:
            for buf in self.buffers.values():
                buf.free()
            self.buffers = {}
            cuda_call(_rt.cudaStreamDestroy(self.stream))
