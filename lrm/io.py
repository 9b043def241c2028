"""Artifact I/O: safetensors + JSON, written atomically (temp file + rename)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist.") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is damaged, re-create it.") from None


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically (temp file + rename), one tensor at a time from where it lives
    (``write_tensors_streaming``: no device-side copy, dtypes kept, shared storage allowed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_tensors_streaming(tmp, tensors, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# safetensors' dtype names (https://github.com/huggingface/safetensors, format spec).
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
for _name, _st in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"), ("uint32", "U32"),
                   ("uint64", "U64")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _st
_WRITE_CHUNK = 256 << 20  # bytes per write() call


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous CPU tensor: a host copy of a device tensor (nothing is allocated on the device), the
    tensor itself when it is already a contiguous CPU tensor, else one CPU copy."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu", memory_format=torch.contiguous_format)
    return t.contiguous()


def write_tensors_streaming(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                            metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` as a safetensors file one tensor at a time; returns the file size in bytes.

    The header is computed from shapes and dtypes alone; then each tensor is copied to host memory (see
    ``_host_copy``), written and dropped before the next one, so saving a state that lives on a GPU costs one
    tensor of host memory and no device memory. Dtypes are kept as they are (a bf16 tensor is written as bf16).
    Tensors that share storage (tied weights, views) are written as independent copies, which safetensors'
    ``save_file`` refuses. Not atomic by itself: write into a temporary path and rename it (``save_tensors`` for
    small files, ``lrm.checkpoint.save_training_state`` for training states). Readable by ``load_tensors``.
    """
    for k, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"tensor {k!r} has dtype {t.dtype}, which safetensors cannot store; "
                            f"supported: {sorted(str(d) for d in _ST_DTYPES)}")
    # Larger elements first (as safetensors orders them) keeps every tensor's offset aligned to its element size.
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {}
    offset = 0
    for k in order:
        t = tensors[k]
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # pad so the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for k in order:
            if tensors[k].numel() == 0:
                continue
            host = _host_copy(tensors[k])
            buf = memoryview(host.reshape(-1).view(torch.uint8).numpy())
            for a in range(0, len(buf), _WRITE_CHUNK):
                f.write(buf[a:a + _WRITE_CHUNK])
            del host, buf  # free this tensor's host copy before the next one is made
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(head) + offset


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist.")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file ({e}); re-download or re-create it.") from None


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict (names, shapes, values), independent of file layout and device.

    float16 / bfloat16 tensors are hashed as their (exact) float32 values, so weights stored in half precision hash
    alike whether they are loaded in half precision or upcast to float32. Rounding float32 weights to bf16 / fp16
    changes them, and so changes the hash: a VAE loaded with ``dtype=torch.bfloat16`` from float32 weights is
    another VAE (its latents differ); load it in float32 and run it under bf16 autocast instead.
    """
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu()  # one tensor at a time on the host
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        t = t.contiguous().reshape(-1)  # flat: a channels_last (O, I, 1, 1) weight is "contiguous" with stride I
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(sd[k].shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames / new files in directory ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_records(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` of a CSV (header row, then one record per line) or JSONL file (one JSON object per
    non-blank line). A JSONL line that is not a JSON object raises ``ValueError`` naming ``path:line``."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        import csv

        with open(path, newline="") as fh:
            return list(enumerate(csv.DictReader(fh), 2))
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i} is not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{i} is not a JSON object")
        rows.append((i, obj))
    return rows
