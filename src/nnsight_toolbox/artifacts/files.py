"""Reading and writing adapter files safely: JSON and safetensors, never pickle.

Every reader raises an error that names the file and says what was wrong with
it, so a caller can validate a whole artifact before touching any state.
Writers replace each file atomically (a temporary file, then ``os.replace``),
so an interrupted save never leaves a half-written file under the final name.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "require_directory",
    "require_file",
    "read_json",
    "read_tensors",
    "sha256_hex",
    "write_atomically",
    "check_finite",
    "tensor_bytes",
    "is_number",
]


def require_directory(directory: str | os.PathLike, what: str, hint: str) -> Path:
    """``directory`` as a Path, or a `FileNotFoundError` saying what was expected there."""
    path = Path(directory)
    if not path.is_dir():
        found = "a file" if path.exists() else "nothing"
        raise FileNotFoundError(f"Expected {what} in the directory `{path}`, but found {found} there. {hint}")
    return path


def require_file(path: Path, what: str, hint: str) -> Path:
    """``path``, or a `FileNotFoundError` naming it and what it should hold."""
    if not path.is_file():
        present = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
        raise FileNotFoundError(
            f"`{path}` is missing: it should hold {what}. The directory holds {present or 'no files'}. {hint}"
        )
    return path


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or a `ValueError` naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"`{path}` is not valid JSON ({error}). The file is damaged; write it again.") from error
    if not isinstance(value, dict):
        raise ValueError(f"`{path}` should hold a JSON object, but holds a {type(value).__name__}.")
    return value


def read_tensors(path: Path, data: bytes | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path`` (or of its bytes ``data``), on the CPU.

    safetensors parses a JSON header and raw buffers and never unpickles, so a
    hostile file cannot run code; a truncated or damaged one is refused here.
    """
    from safetensors.torch import load

    if data is None:
        data = path.read_bytes()
    try:
        return load(data)
    except Exception as error:  # safetensors raises its own error types for every malformation
        raise ValueError(
            f"`{path}` is not a readable safetensors file ({type(error).__name__}: {error}). "
            f"It is truncated or damaged; write it again from the adapter."
        ) from error


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of ``data`` as hex: the checksum a sidecar keeps of its tensor file."""
    return hashlib.sha256(data).hexdigest()


def tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """``tensors`` serialised as a safetensors file (contiguous CPU copies)."""
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata)


def write_atomically(directory: Path, files: dict[str, bytes]) -> None:
    """Write each ``name -> bytes`` into ``directory``: to a temporary file first,
    then renamed over the final name, so no reader ever sees half a file."""
    directory.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[str, Path]] = []
    try:
        for name, data in files.items():
            temp = directory / f".{name}.{uuid.uuid4().hex}.tmp"  # `open` honours the umask, unlike mkstemp
            staged.append((name, temp))
            with open(temp, "xb") as stream:
                stream.write(data)
        for name, temp in staged:
            os.replace(temp, directory / name)
    finally:
        for _, temp in staged:
            temp.unlink(missing_ok=True)


def check_finite(tensor: torch.Tensor, name: str, where: str | Path) -> None:
    """A `ValueError` naming where the tensor is from (a file) when it holds NaN or Inf."""
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"`{where}`: tensor `{name}` holds {bad} NaN or infinite value(s). The adapter "
            f"diverged in training, or the file is damaged; it would break every output it touches."
        )


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
