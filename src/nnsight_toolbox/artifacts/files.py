"""Reading and writing adapter files safely: JSON and safetensors, never pickle.

Every reader raises an error that names the file and says what was wrong with
it, so a caller can validate a whole artifact before touching any state.
A tensor file's safetensors header is read and checked (against the file's
size, and by the caller against what the sidecar or config says) before any
tensor data is read, so a hostile or oversized file is refused by name.

A save replaces the whole directory, never one file at a time: two renames of
files cannot be made atomic together, and a tensor file beside the other
save's sidecar is neither adapter. `replace_directory` writes the new files
into a fresh sibling directory and swaps it in::

    1. write   <parent>/.<name>.incoming-<uuid>/   every file, flushed to disk
    2. rename  <name>  ->  .<name>.previous         (only if <name> exists)
    3. rename  .<name>.incoming-<uuid>  ->  <name>
    4. delete  .<name>.previous

A rename is atomic on POSIX, so at every moment ``<name>`` is the complete old
directory, the complete new one, or (between 2 and 3) absent while the old one
waits complete in ``.<name>.previous``. Readers go through `saved_directory`,
which reads ``.<name>.previous`` in that last case; the next save of the same
directory (or the interrupted save's own clean-up) renames it back, or deletes
it once ``<name>`` is the new one. Other files in the directory are carried over
to the new one (hard links where the file system allows, else copies).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "require_directory",
    "require_file",
    "read_json",
    "read_tensors",
    "sha256_hex",
    "replace_directory",
    "saved_directory",
    "TensorInfo",
    "read_header",
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


def aside_path(directory: Path) -> Path:
    """Where `replace_directory` keeps the old ``directory`` while the new one is renamed in."""
    return directory.parent / f".{directory.name}.previous"


def saved_directory(directory: str | os.PathLike) -> Path:
    """The directory to read a saved artifact from: ``directory``, or, if a save of it
    was interrupted between its two renames, the complete old copy it left aside.

    Examples:
        >>> saved_directory("adapters/mlp")
        PosixPath('adapters/mlp')
    """
    directory = Path(directory)
    if directory.exists():
        return directory
    real = Path(os.path.realpath(directory))  # a symlink's target is what a save swaps
    return aside_path(real) if aside_path(real).is_dir() else directory


def replace_directory(directory: str | os.PathLike, files: dict[str, bytes], what: str) -> Path:
    """Make ``directory`` hold ``files`` (``name -> bytes``), replacing the whole directory at once.

    An interruption at any point (an exception, a KeyboardInterrupt, a crash,
    a full disk) leaves ``directory`` readable, through `saved_directory`, as
    either its complete old contents or the complete new ones; see the module
    docstring for the steps. Files in ``directory`` not named in ``files`` are
    kept. ``what`` names the call, for errors (``"`lora.save`"``).

    Examples:
        >>> replace_directory("adapters/mlp", {"note.txt": b"hello"}, "`save`")
        PosixPath('adapters/mlp')
    """
    given = directory = Path(directory)
    if directory.is_symlink():  # swap the directory it points to, and keep the link
        directory = Path(os.path.realpath(directory))
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"`{directory}` is a file; {what} needs a directory to write into.")
    _refuse_working_directory(directory, what)
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(directory, stale=True)  # an earlier save was interrupted: finish or undo it first
    staging = directory.parent / f".{directory.name}.incoming-{uuid.uuid4().hex}"
    staging.mkdir()
    aside = aside_path(directory)
    try:
        if directory.is_dir():
            shutil.copymode(directory, staging)
            _carry_over(directory, staging, skip=set(files))
        for name, data in files.items():
            _write_durably(staging / name, data)
        _fsync_directory(staging)
        if directory.exists():
            os.rename(directory, aside)
        os.rename(staging, directory)
        _fsync_directory(directory.parent)
    finally:
        # Runs on success and on any interruption: puts the old copy back if the
        # new one did not land, deletes it if it did, and drops the staging copy.
        recover_directory(directory)
        shutil.rmtree(staging, ignore_errors=True)
    return given


def recover_directory(directory: Path, *, stale: bool = False) -> None:
    """Finish an interrupted `replace_directory`: ``directory`` is either the new copy
    (delete the old one left aside) or missing (rename the old one back).

    With ``stale``, also delete staging copies that a crashed save left behind.
    """
    aside = aside_path(directory)
    if aside.exists() or aside.is_symlink():
        if directory.exists() or directory.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(aside, directory)
    if stale:
        for leftover in directory.parent.glob(f".{_glob_escape(directory.name)}.incoming-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _refuse_working_directory(directory: Path, what: str) -> None:
    """Swapping the working directory (or a folder above it) would leave the process in a deleted folder."""
    if not directory.exists():
        return
    cwd = Path.cwd().resolve()
    target = directory.resolve()
    if target == cwd or target in cwd.parents:
        raise ValueError(
            f"{what} replaces the directory `{directory}` as a whole, so that an interrupted save "
            f"leaves the old adapter loadable, but it is the working directory (or holds it). "
            f"Save into a subdirectory instead, e.g. `adapter/`."
        )


def _carry_over(old: Path, new: Path, skip: set[str]) -> None:
    """Give ``new`` every entry of ``old`` except ``skip``: hard links where possible, copies otherwise."""
    for entry in os.scandir(old):
        if entry.name in skip or _is_old_temp(entry.name, skip):
            continue
        source, target = Path(entry.path), new / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(source), target)
        elif entry.is_dir():
            shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(source, target)


def _is_old_temp(name: str, written: set[str]) -> bool:
    """A temporary file left by the one-file-at-a-time writer of earlier versions."""
    return name.endswith(".tmp") and any(name.startswith(f".{w}.") for w in written)


def _link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    try:
        os.link(source, target)
    except OSError:  # no hard links here (another file system, FAT, some network mounts)
        shutil.copy2(source, target)


def _write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file and flush it to disk, so a crash cannot leave the rename without the bytes."""
    with open(path, "xb") as stream:  # `open` honours the umask, unlike mkstemp
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())


def _fsync_directory(directory: Path) -> None:
    """Flush a directory's entries (its renames) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: safetensors dtype codes and their sizes in bytes.
_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
#: safetensors' own limit on the JSON header.
MAX_HEADER_BYTES = 100_000_000
#: A sidecar or PEFT config is a few kB (a set's sidecar about 300 bytes per adapter).
MAX_JSON_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it, read without its data.

    Attributes:
        dtype: The torch dtype, or ``None`` for a code torch has no dtype for.
        code: The safetensors dtype code (``"F32"``, ``"BF16"``, ...).
        shape: The shape.
    """

    dtype: torch.dtype | None
    code: str
    shape: tuple[int, ...]

    def is_floating_point(self) -> bool:
        return self.dtype is not None and self.dtype.is_floating_point


def read_header(path: Path, *, allow_short: bool = False) -> dict[str, TensorInfo]:
    """The tensors ``path`` holds, from its safetensors header alone: no tensor data is read.

    The header must parse and describe exactly the bytes after it: a file
    larger than that is refused by name before anything else is read (a
    sparse or padded file would otherwise be read whole into memory). A file
    shorter than that is truncated; with ``allow_short`` it is let through for
    a checksum to refuse with its own message.

    Examples:
        >>> lora.save("adapters/mlp")
        >>> read_header(Path("adapters/mlp/interventions.safetensors"))["0.WA"].shape
        (32, 8)
    """
    size = path.stat().st_size

    def damaged(why: str) -> ValueError:
        return ValueError(
            f"`{path}` is not a readable safetensors file ({why}). "
            f"It is truncated or damaged; write it again from the adapter."
        )

    with open(path, "rb") as stream:
        prefix = stream.read(8)
        if len(prefix) < 8:
            raise damaged(f"it is {size} bytes, shorter than the 8-byte header length")
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise damaged(f"its header claims {length} bytes, but the file is {size} bytes")
        raw = stream.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise damaged(f"its header is not valid JSON: {type(error).__name__}") from None
    if not isinstance(header, dict):
        raise damaged("its header is not a JSON object")
    infos, data_end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        code = entry.get("dtype") if isinstance(entry, dict) else None
        well_formed = (
            code in _ITEMSIZE
            and isinstance(shape, list)
            and all(type(n) is int and n >= 0 for n in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(n) is int and n >= 0 for n in offsets)
        )
        if not well_formed or offsets[1] - offsets[0] != math.prod(shape) * _ITEMSIZE[code]:
            raise damaged(f"its header entry for `{name}` is malformed: {entry!r:.200}")
        infos[name] = TensorInfo(_TORCH_DTYPES.get(code), code, tuple(shape))
        data_end = max(data_end, offsets[1])
    expected = 8 + length + data_end
    if size > expected:
        raise ValueError(
            f"`{path}` is {size} bytes, but its safetensors header describes {expected} bytes "
            f"({len(infos)} tensor(s)); it was refused unread. The file is damaged or padded "
            f"(or not the file it claims to be); write it again from the adapter."
        )
    if size < expected and not allow_short:
        raise damaged(f"it is {size} bytes, but its header describes {expected}")
    return infos


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or a `ValueError` naming the file.

    Refuses a file over `MAX_JSON_BYTES` unread, and nesting too deep for Python's parser.
    """
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ValueError(
            f"`{path}` is {size} bytes, more than the {MAX_JSON_BYTES} a config or sidecar can "
            f"need; it was refused unread. The file is damaged or not the one it claims to be."
        )
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"`{path}` is not valid JSON ({error}). The file is damaged; write it again.") from error
    except RecursionError:
        raise ValueError(
            f"`{path}` nests its JSON too deeply for Python's parser; a config or sidecar is "
            f"a flat object of fields. The file is damaged or hostile; write it again."
        ) from None
    if not isinstance(value, dict):
        raise ValueError(f"`{path}` should hold a JSON object, but holds a {type(value).__name__}.")
    return value


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
