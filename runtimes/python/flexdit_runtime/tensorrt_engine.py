"""Run a bundle's TensorRT engines: the machine's TensorRT/GPU environment and a runner.

The engine file format and the compatibility check are part of the bundle contract
(``flexdit_bundle.engine_header``). ``TensorRTSession`` follows the TensorRT 10 Python API
(``deserialize_cuda_engine``, ``set_tensor_address``, ``execute_async_v3``) with device memory
from cuda-python. Neither TensorRT nor a GPU was available where this was written: that class is
unverified; the header format and the checks around it are tested.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np

from flexdit_bundle.engine_header import NOT_INSTALLED, check_engine, read_header
from flexdit_bundle.manifest import Bundle, BundleError
from flexdit_bundle.spec import Artifact, Stage

from .settings import RuntimeSettings
from .stage_engine import StageEngine


def tensorrt_version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt.__version__


def compute_capability(device: int = 0) -> str | None:
    """'major.minor' of GPU ``device`` from nvidia-smi (no CUDA binding needed), or None."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    return lines[device] if out.returncode == 0 and len(lines) > device else None


def environment() -> dict:
    return {"tensorrt_version": tensorrt_version(), "compute_capability": compute_capability()}


def _cuda():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise BundleError("TensorRT engines need cuda-python for device memory (pip install cuda-python)") from None
    return cudart


def _ok(result):
    err, *rest = result
    if int(err) != 0:
        raise BundleError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


class TensorRTSession:
    """One engine with static shapes; ``run(names, feeds)`` like an ONNX Runtime session.
    Unverified here (no TensorRT, no GPU)."""

    def __init__(self, path, header_offset: int):
        import tensorrt as trt

        cudart = _cuda()
        self._cudart, self._trt = cudart, trt
        plan = Path(path).read_bytes()[header_offset:]
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BundleError(f"TensorRT could not deserialize {path}; rebuild it with flexdit-export engines")
        self.context = self.engine.create_execution_context()
        self.stream = _ok(cudart.cudaStreamCreate())
        self.buffers = {}
        self.io = ({}, {})  # ({input name: (dtype, shape)}, {output name: (dtype, shape)})
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            nbytes = int(np.prod(shape)) * dtype.itemsize
            ptr = _ok(cudart.cudaMalloc(nbytes))
            self.context.set_tensor_address(name, ptr)
            self.buffers[name] = (ptr, shape, dtype, nbytes, is_input)
            self.io[0 if is_input else 1][name] = (dtype.name, list(shape))

    def run(self, names, feeds: dict):
        cudart = self._cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        keep = []  # host copies stay alive until the stream syncs
        for name, (ptr, shape, dtype, nbytes, is_input) in self.buffers.items():
            if is_input:
                host = np.ascontiguousarray(feeds[name], dtype=dtype).reshape(shape)
                _ok(cudart.cudaMemcpyAsync(ptr, host.ctypes.data, nbytes, h2d, self.stream))
                keep.append(host)
        if not self.context.execute_async_v3(int(self.stream)):
            raise BundleError("TensorRT execution failed")
        outs = []
        for name in names:
            ptr, shape, dtype, nbytes, _ = self.buffers[name]
            host = np.empty(shape, dtype)
            _ok(cudart.cudaMemcpyAsync(host.ctypes.data, ptr, nbytes, d2h, self.stream))
            outs.append(host)
        _ok(cudart.cudaStreamSynchronize(self.stream))
        return [o.astype(np.float32) for o in outs]


def open_engine(path, where: str, bundle="BUNDLE", env: dict | None = None) -> TensorRTSession:
    header, offset = read_header(path)
    check_engine(header, env if env is not None else environment(), where, bundle)
    return TensorRTSession(path, offset)


class TensorRTStageEngine(StageEngine):
    """A stage's TensorRT engine (unverified, like ``TensorRTSession``). One execution context
    and one set of device buffers per engine, so calls are serialised."""

    kind = "tensorrt"
    devices = ("cuda",)

    @classmethod
    def library(cls) -> str | None:
        return None if tensorrt_version() else NOT_INSTALLED.format(what="run")

    @classmethod
    def preflight(cls, bundle: Bundle, stage: Stage, artifact: Artifact, settings: RuntimeSettings) -> None:
        """The engine's header against this machine's TensorRT and GPU (the library included)."""
        check_engine(read_header(bundle.path(artifact))[0], environment(), artifact.path, bundle.root)

    @classmethod
    def on_device(cls, bundle: Bundle, device: str, settings: RuntimeSettings, probes: dict,
                  explicit: bool) -> RuntimeSettings:
        if device == "cpu":
            raise BundleError("--device cpu: TensorRT engines run on a GPU only (use --backend onnx)")
        return super().on_device(bundle, device, settings, probes, explicit)

    def __init__(self, stage: Stage, artifact: Artifact, session: TensorRTSession):
        super().__init__(stage, artifact)
        self.session = session
        self._lock = threading.Lock()
        self.check_graph_io(*session.io)

    @classmethod
    def open(cls, bundle: Bundle, stage: Stage, artifact: Artifact, settings: RuntimeSettings, weights) -> "TensorRTStageEngine":
        return cls(stage, artifact, open_engine(bundle.path(artifact), artifact.path, bundle.root))

    def _run(self, feeds: dict) -> np.ndarray:
        with self._lock:
            return self.session.run([self.output_name], feeds)[0]
