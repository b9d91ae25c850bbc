"""Timing and memory: interleaved rounds, and the peak memory of one call.

Variants are timed round-robin, the order rotating every round, so that a
slow spell of a shared machine (or a GPU clocking down) falls on every variant
alike rather than on whichever ran last; ratios are then taken round by round
(see `report`). Each call runs after a garbage collection, outside the timer,
so one variant's garbage is not collected on another's clock.

Two clocks are read around every call: wall time, and the process's CPU time.
On a GPU only wall time means anything (the work is on the device). On a CPU
that other jobs share, wall time also counts the time the process waited for a
core, which is the neighbours' load rather than the variant's cost; with one
torch thread, CPU time is the work itself.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Timing", "time_interleaved", "peak_memory", "current_memory", "synchronize", "prepare_cpu_memory_tracking"]


@dataclass
class Timing:
    """Seconds of each timed repeat of one variant, on the chosen clock (and wall time)."""

    times: list[float]
    wall: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the repeats were."""
        return (max(self.times) - min(self.times)) / self.median if self.median else 0.0


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    calls: dict[str, tuple[Callable[[], object], Callable]],
    *,
    repeats: int,
    warmup: int,
    device: str,
    clock: str = "wall",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Timing]:
    """Time each ``name -> (fn, context)`` ``repeats`` times after ``warmup`` untimed rounds.

    ``context()`` is entered around each call, outside the timer (installing
    hooks, say). ``clock`` is ``"wall"`` or ``"cpu"`` (process CPU time); wall
    time is recorded either way.
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    walls: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            fn, context = calls[name]
            with context():
                gc.collect()
                synchronize(device)
                wall, cpu = time.perf_counter(), time.process_time()
                fn()
                synchronize(device)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if round_ >= warmup:
                times[name].append(cpu if clock == "cpu" else wall)
                walls[name].append(wall)
        if progress is not None:
            progress(f"round {round_ + 1}/{warmup + repeats}")
    return {name: Timing(times[name], walls[name]) for name in names}


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def prepare_cpu_memory_tracking() -> bool:
    """Make the process's resident size follow the live tensors, on Linux with glibc.

    glibc raises its mmap threshold as large blocks are freed and then keeps
    freed tensors in its heap, where they stay resident; a fixed 128 KiB
    threshold sends every tensor to its own mapping, returned on free. Returns
    whether peak tracking (``/proc/self/clear_refs``) is available.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident size (VmHWM)
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def current_memory(device: str) -> int:
    """Bytes in use now: CUDA memory allocated, or the process's resident size on CPU."""
    if device == "cuda":
        return torch.cuda.memory_allocated()
    return _status_kib("VmRSS") * 1024


def peak_memory(fn: Callable[[], object], device: str) -> int | None:
    """How many bytes above its starting point ``fn`` needed at its peak.

    CUDA: the allocator's peak. CPU: the peak resident size (reset through
    ``/proc/self/clear_refs``) above the resident size at the start, after
    freed memory is handed back; ``None`` where that is not available.
    """
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    start = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - start) * 1024
