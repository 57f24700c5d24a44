"""Feed one stage's calibration rows to ONNX Runtime's static quantiser and to TensorRT.

Both read the same files through ``StageBatches``: the rows of a stage and split, in stored
order, as graph feeds of the stage's static batch (``x`` float32, ``t`` float32, ``y`` int64).

- ``OrtCalibrationReader``: an ``onnxruntime.quantization.CalibrationDataReader`` with
  ``__len__``/``set_range`` so ``quantize_static`` can calibrate in strides
  (``extra_options={"CalibStridedMinMax": k}``): ONNX Runtime then keeps at most k batches of
  intermediate tensors at a time, for MinMax and for the histogram methods alike.
- ``tensorrt_calibrator``: a TensorRT ``IInt8MinMaxCalibrator`` (or entropy) over the same
  batches, with its calibration cache in a file. TensorRT is imported only when it is called;
  it was not available where this was written (the host side is tested, the device copies are not).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .store import CalibSet


class StageBatches:
    """Rows ``[start, end)`` (in batches) of one stage and split, as feed dicts."""

    def __init__(self, calib: CalibSet, stage_id: int, batch: int, split: str = "calib"):
        x, t, y = calib.arrays(stage_id, split)
        n = len(t) // batch * batch
        self.x, self.t, self.y, self.batch = x[:n], t[:n], y[:n], batch
        self.names = ("x", "t", "y")

    def __len__(self) -> int:
        return len(self.t) // self.batch

    def feed(self, i: int) -> dict:
        lo, hi = i * self.batch, (i + 1) * self.batch
        return {"x": self.x[lo:hi], "t": self.t[lo:hi].astype(np.float32), "y": self.y[lo:hi].astype(np.int64)}

    def __iter__(self):
        return (self.feed(i) for i in range(len(self)))


def _reader_base():
    from onnxruntime.quantization import CalibrationDataReader
    return CalibrationDataReader


class OrtCalibrationReader(_reader_base()):
    def __init__(self, calib: CalibSet, stage_id: int, batch: int, split: str = "calib"):
        self.batches = StageBatches(calib, stage_id, batch, split)
        self.start, self.end, self.pos = 0, len(self.batches), 0

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end, self.pos = start_index, min(end_index, len(self.batches)), start_index

    def rewind(self) -> None:
        self.pos = self.start

    def get_next(self):
        if self.pos >= self.end:
            return None
        self.pos += 1
        return self.batches.feed(self.pos - 1)


class HostDevice:
    """Where a calibrator puts a batch: ``put(name, array) -> pointer``. The TensorRT path
    uses cuda-python device buffers; tests use this host version."""

    def __init__(self):
        self.buffers = {}

    def put(self, name: str, array: np.ndarray) -> int:
        self.buffers[name] = np.ascontiguousarray(array)
        return self.buffers[name].ctypes.data


class CudaDevice:
    def __init__(self):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
        self.cudart, self.ptrs = cudart, {}

    def put(self, name: str, array: np.ndarray) -> int:
        a = np.ascontiguousarray(array)
        if name not in self.ptrs:
            err, ptr = self.cudart.cudaMalloc(a.nbytes)
            if int(err):
                raise RuntimeError(f"cudaMalloc failed: {err}")
            self.ptrs[name] = ptr
        (err,) = self.cudart.cudaMemcpy(self.ptrs[name], a.ctypes.data, a.nbytes,
                                        self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice)
        if int(err):
            raise RuntimeError(f"cudaMemcpy failed: {err}")
        return self.ptrs[name]


class CalibratorCore:
    """The host side of a TensorRT INT8 calibrator (the methods TensorRT calls)."""

    def __init__(self, calib: CalibSet, stage_id: int, batch: int, cache_file, device=None):
        self.batches = StageBatches(calib, stage_id, batch)
        self.pos, self.cache_file = 0, Path(cache_file)
        self.device = device if device is not None else HostDevice()

    def get_batch_size(self) -> int:
        return self.batches.batch

    def get_batch(self, names):
        if self.pos >= len(self.batches):
            return None
        feed = self.batches.feed(self.pos)
        self.pos += 1
        return [self.device.put(n, feed[n]) for n in names]

    def read_calibration_cache(self):
        return self.cache_file.read_bytes() if self.cache_file.is_file() else None

    def write_calibration_cache(self, cache) -> None:
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        self.cache_file.write_bytes(bytes(cache))


def tensorrt_calibrator(calib: CalibSet, stage_id: int, batch: int, cache_file, method: str = "minmax"):
    """A TensorRT INT8 calibrator over the stage's calibration rows (needs tensorrt + cuda-python)."""
    import tensorrt as trt

    base = {"minmax": trt.IInt8MinMaxCalibrator, "entropy": trt.IInt8EntropyCalibrator2}[method]

    class Calibrator(CalibratorCore, base):
        def __init__(self):
            base.__init__(self)
            CalibratorCore.__init__(self, calib, stage_id, batch, cache_file, CudaDevice())

    return Calibrator()
