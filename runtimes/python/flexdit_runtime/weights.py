"""A bundle's shared weight files, read once and handed to every stage session.

Format v2 stores each precision's weights once (``stages/weights.<precision>.bin``); every
stage graph references them as ONNX external data, and the manifest binds each graph
initializer to a tensor of the file. Left to itself, ONNX Runtime would read the file again for
every session (four stages: four copies in memory). Instead the runtime reads each file once,
checks its sha256 on the bytes it actually read, and gives every session the same buffers
through ``SessionOptions.add_initializer`` (ONNX Runtime uses a user-supplied initializer in
place, without copying it, and keeps it out of constant folding).
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np

from flexdit_bundle.manifest import Bundle, BundleError
from flexdit_bundle.spec import Artifact, WeightFile, WeightTensor
from flexdit_bundle.onnx_scan import ScanError, initializers

# numpy dtypes of the tensor table; bfloat16 has none in numpy, so such tensors are left to
# ONNX Runtime's own external-data loader (correct, just not shared in memory).
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8,
                "int32": np.int32, "int64": np.int64, "bool": np.bool_}


def checksum_mismatch(entry) -> BundleError:
    return BundleError(f"checksum mismatch for {entry.path}: the bundle was modified or truncated; "
                       "re-run flexdit-export convert")


def read_weight_file(bundle: Bundle, entry: WeightFile, verify: bool = True) -> np.ndarray:
    """The bytes of a shared weight file (manifest ``weights[]`` entry), read once; their size is
    always checked, their sha256 too unless the caller hashes them itself (``verify=False``)."""
    try:
        buf = np.fromfile(bundle.path(entry), dtype=np.uint8)
    except OSError as e:
        raise BundleError(f"cannot read weight file {entry.path}: {e}") from None
    if buf.size != entry.bytes or (verify and hashlib.sha256(buf).hexdigest() != entry.sha256):
        raise checksum_mismatch(entry)
    return buf


def _view(buf: np.ndarray, t: WeightTensor) -> np.ndarray:
    """Tensor ``t`` of the tensor table as a numpy view of the file's bytes (no copy)."""
    return buf[t.offset:t.offset + t.bytes].view(NUMPY_DTYPES[t.dtype]).reshape(t.shape)


class SharedWeights:
    """Lazily reads each weight file of ``bundle`` the first time a graph needs it; thread-safe
    (stage sessions may be created in parallel). ONNX Runtime runs on the bound buffers in place,
    so every session keeps the tensors it was given (``make_session``), whatever outlives what.
    Also holds what the stage engines of one loaded bundle share beside the buffers (``once``:
    one session for a graph several stages run)."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self._values: dict[str, list] = {}
        self._hashes: dict[str, threading.Thread] = {}
        self._bad: list[str] = []
        self._lock = threading.Lock()
        self._buffers: dict[str, np.ndarray] = {}
        self._once: dict = {}  # key -> [lock, made?, value]

    def _load(self, file_id: str) -> list:
        with self._lock:
            if file_id in self._values:
                return self._values[file_id]
            import onnxruntime as ort

            entry = self.bundle.weight_files[file_id]
            buf = read_weight_file(self.bundle, entry, verify=False)
            self._buffers[file_id] = buf
            # The sha256 of the bytes just read is computed while the stage sessions build (hashlib
            # releases the GIL); ``verify()`` joins it before any engine is handed out.
            def check(buf=buf, entry=entry):
                if hashlib.sha256(buf).hexdigest() != entry.sha256:
                    self._bad.append(entry)

            self._hashes[file_id] = threading.Thread(target=check, daemon=True)
            self._hashes[file_id].start()
            values = [None if t.dtype not in NUMPY_DTYPES else ort.OrtValue.ortvalue_from_numpy(_view(buf, t))
                      for t in entry.tensors]
            self._values[file_id] = values
            return values

    def verify(self) -> None:
        """Wait for the checksums of every weight file read so far; one line if any differs."""
        for thread in list(self._hashes.values()):
            thread.join()
        if self._bad:
            raise checksum_mismatch(self._bad[0])

    def check_bindings(self, artifact: Artifact) -> None:
        """Every binding of the manifest must name an initializer of the graph that references
        the same bytes of the same weight file with the same element type and shape (ONNX
        Runtime itself would accept a mismatched buffer and compute garbage)."""
        ref = artifact.weights
        entry = self.bundle.weight_files[ref.file]
        path = self.bundle.path(artifact)
        try:
            graph = initializers(path)
        except ScanError as e:
            raise BundleError(f"cannot read graph {artifact.path}: {e}") from None
        location = entry.path.rsplit("/", 1)[-1]
        for name, index in ref.bindings.items():
            t, g = entry.tensors[index], graph.get(name)
            if (g is None or g.dtype != t.dtype or tuple(g.dims) != t.shape or g.external.get("location") != location
                    or int(g.external.get("offset", 0)) != t.offset or int(g.external.get("length", -1)) != t.bytes):
                raise BundleError(f"{artifact.path}: the manifest binds initializer {name[:80]!r} to tensor {index} of "
                                  f"{entry.path}, which is not what the graph references; re-run flexdit-export convert")

    def bind(self, session_options, artifact: Artifact) -> list:
        """Add the shared tensors an artifact's graph uses to its session options; -> those
        ``OrtValue``s (each keeps its bytes alive: the session must hold them)."""
        ref = artifact.weights
        if not ref:
            return []
        self.check_bindings(artifact)
        values = self._load(ref.file)
        bound = []
        for name, index in ref.bindings.items():
            if values[index] is not None:
                session_options.add_initializer(name, values[index])
                bound.append(values[index])
        return bound

    def array(self, file_id: str, index: int) -> np.ndarray:
        """Tensor ``index`` of a weight file as a read-only numpy view of the bytes read once."""
        self._load(file_id)
        t = self.bundle.weight_files[file_id].tensors[index]
        if t.dtype not in NUMPY_DTYPES:
            raise BundleError(f"tensor {index} of {self.bundle.weight_files[file_id].path} is {t.dtype}, "
                              "which cannot be fed as a graph input")
        a = _view(self._buffers[file_id], t)
        a.flags.writeable = False
        return a

    def once(self, key, make):
        """``make()`` the first time ``key`` is asked for, its result ever after; thread-safe (the
        stage engines that share one session open in parallel). Lives as long as the weights."""
        with self._lock:
            slot = self._once.setdefault(key, [threading.Lock(), False, None])
        with slot[0]:
            if not slot[1]:
                slot[2], slot[1] = make(), True
            return slot[2]

    @property
    def resident_bytes(self) -> int:
        """Bytes of weight files read so far (each once, whatever the number of stages)."""
        return sum(self.bundle.weight_files[f].bytes for f in self._values)
