"""The TensorRT engine file format of a bundle (readable without TensorRT).

A TensorRT plan runs only with the TensorRT version that built it and on GPUs of the compute
capability it was built for, so every engine in a bundle is wrapped in a small header:

    b"FLXTRT01" | uint32 little-endian header length | header JSON (utf-8) | TensorRT plan

The header records ``tensorrt_version``, ``compute_capability`` ("8.9"), ``precision``,
``strongly_typed``, ``source_sha256`` (the ONNX graph it was built from) and ``cache_key``.
``check_engine`` refuses an engine built for another TensorRT version or GPU with one line
that names the rebuild command.
"""

from __future__ import annotations

import json
import struct

from .manifest import BundleError

MAGIC = b"FLXTRT01"
REBUILD = "flexdit-export engines {bundle} --force"
NOT_INSTALLED = ("TensorRT is not installed (pip install tensorrt cuda-python, with an NVIDIA GPU and driver); "
                 "TensorRT engines cannot be {what} on this machine")


def write_engine(path, header: dict, plan: bytes) -> None:
    blob = json.dumps(header, sort_keys=True).encode()
    with open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(blob)) + blob)
        f.write(plan)


def read_header(path) -> tuple[dict, int]:
    """-> (header, byte offset of the plan)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + 4)
            if len(head) < len(MAGIC) + 4 or head[:len(MAGIC)] != MAGIC:
                raise BundleError(f"{path} is not a flexdit TensorRT engine (bad header); rebuild it with "
                                  "flexdit-export engines")
            (n,) = struct.unpack("<I", head[len(MAGIC):])
            header = json.loads(f.read(n).decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"cannot read TensorRT engine {path}: {e}") from None
    return header, len(MAGIC) + 4 + n


def check_engine(header: dict, env: dict, where: str, bundle="BUNDLE") -> None:
    """Refuse an engine this machine cannot run: one line, with the rebuild command."""
    if env.get("tensorrt_version") is None:
        raise BundleError(NOT_INSTALLED.format(what="run") + f" ({where}); run the ONNX graphs with --backend onnx")
    if env.get("compute_capability") is None:
        raise BundleError(f"no NVIDIA GPU found (nvidia-smi): cannot run TensorRT engine {where}; "
                          "use --backend onnx")
    built = (header.get("tensorrt_version"), header.get("compute_capability"))
    have = (env["tensorrt_version"], env["compute_capability"])
    if built != have:
        raise BundleError(f"TensorRT engine {where} was built with TensorRT {built[0]} for compute capability {built[1]}, "
                          f"but this machine has TensorRT {have[0]} and compute capability {have[1]}; engines are "
                          f"specific to both: rebuild them here with `{REBUILD.format(bundle=bundle)}` "
                          "(or run the ONNX graphs with --backend onnx)")
