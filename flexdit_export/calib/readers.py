"""Feed one stage's calibration rows to ONNX Runtime's static quantiser and to the held-out
error gates.

Both read the same files through ``StageBatches``: the rows of a stage and split, in stored
order, as graph feeds of the stage's static batch (``x`` float32, ``t`` float32, ``y`` int64).
TensorRT needs no calibrator of its own: it builds the QDQ graphs (int8-static, fp8) whose
scales came from these rows, as strongly typed networks.

- ``OrtCalibrationReader``: an ``onnxruntime.quantization.CalibrationDataReader`` with
  ``__len__``/``set_range`` so ``quantize_static`` can calibrate in strides
  (``extra_options={"CalibStridedMinMax": k}``): ONNX Runtime then keeps at most k batches of
  intermediate tensors at a time, for MinMax and for the histogram methods alike.
"""

from __future__ import annotations

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

    def get_next(self):
        if self.pos >= self.end:
            return None
        self.pos += 1
        return self.batches.feed(self.pos - 1)
