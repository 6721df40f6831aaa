"""Timing and peak-memory probes for CPU runs.

Time: ``time.perf_counter`` around one call; a case reports the median of a few repeats after a
warm-up, with the two sides interleaved (A, B, A, B, ...) so slow phases of a noisy machine hit both.

Peak memory: the process's resident-set high-water mark. Linux resets ``VmHWM`` to the current
RSS when ``5`` is written to ``/proc/self/clear_refs``; the peak of one call is then
``VmHWM after - VmRSS before``. tracemalloc does not see torch's allocations, and torch has no
CPU allocator statistics, so this is the number that means "how much more RAM did this need".
Two things keep it honest: glibc is told to serve every allocation above 64 KiB with ``mmap``
(returned to the kernel on free, so memory freed earlier cannot be silently reused and hide a
peak), and ``malloc_trim(0)`` runs before each probe. These settings slow allocation a little, so
:func:`prepare_memory_probes` is called after the timings.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 64 * 1024
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")

MEMORY_METHOD = (
    "peak RSS: VmHWM reset through /proc/self/clear_refs, minus VmRSS before the call, median of 3 probes; "
    "glibc mmap threshold 64 KiB and malloc_trim(0) before each probe"
)


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_medians(
    calls: dict[str, tuple[Callable[[], None], Callable[[], object]]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per named ``(reset, call)``; ``reset`` runs untimed before each call.

    Every name gets ``warmup`` untimed rounds first, then the names take turns for ``repeats`` rounds.
    """
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(warmup + repeats):
        for name, (reset, call) in calls.items():
            reset()
            seconds = timed(call)
            if round_index >= warmup:
                samples[name].append(seconds)
    return {name: statistics.median(values) for name, values in samples.items()}


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in {_STATUS}")


def memory_probes_available() -> bool:
    """True when the high-water mark can be reset here (Linux with a writable clear_refs)."""
    try:
        _CLEAR_REFS.write_text("5")
        _status_kib("VmHWM")
    except (OSError, RuntimeError):
        return False
    return True


def prepare_memory_probes() -> None:
    """Switch glibc to mmap for allocations above 64 KiB (see the module docstring).

    Also freezes the objects alive now (modules, imported libraries) out of the garbage collector's
    reach, so the full collection before each probe only walks what was created since.
    """
    gc.collect()
    gc.freeze()
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def peak_bytes(fn: Callable[[], object]) -> int:
    """Extra resident memory at the peak of one call of ``fn`` (what it returns is kept until the end)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    _CLEAR_REFS.write_text("5")
    before = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    return max(0, peak - before) * 1024
