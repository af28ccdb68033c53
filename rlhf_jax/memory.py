"""Peak memory of a stage: the process's resident-set high-water mark, reset at the stage's start.

Linux keeps the peak RSS of a process (``VmHWM`` in ``/proc/self/status``); writing ``5`` to
``/proc/self/clear_refs`` resets it to the current RSS, so stages run one after another in one
process (the pipeline) each get their own peak. Elsewhere (macOS, no procfs) the peak falls back to
``resource.getrusage``'s ``ru_maxrss``, the peak since the process started, and says so.

    with memory.PeakRSS() as peak:
        run_stage()
    print(peak.gib, peak.exact)
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import pathlib
import resource
import sys
from collections.abc import Iterator

_STATUS = pathlib.Path("/proc/self/status")
_CLEAR_REFS = pathlib.Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Current resident set size in bytes (None where procfs is absent)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak() -> bool:
    """Reset the peak RSS to the current RSS. False where the OS does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    """Peak RSS in bytes since the last :func:`reset_peak` (or since the process started)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)  # bytes on macOS, KiB on Linux


class PeakRSS:
    """Context manager measuring the peak RSS of its block (``bytes``, ``gib``).

    ``exact`` is False when the peak could not be reset at the start, so the figure is the
    process's peak so far, which may belong to an earlier stage."""

    def __init__(self):
        self.bytes = 0
        self.exact = False

    def __enter__(self) -> "PeakRSS":
        release_freed_host_memory()  # start from live memory, not from heap an earlier stage freed but kept
        self.exact = reset_peak()
        return self

    def __exit__(self, *exc) -> None:
        self.bytes = peak_bytes()

    @property
    def gib(self) -> float:
        return self.bytes / 2**30

    def as_dict(self) -> dict[str, float | bool]:
        return {"peak_rss_gib": round(self.gib, 3), "peak_rss_exact": self.exact}


def release_freed_host_memory() -> bool:
    """Return freed heap memory to the OS (glibc ``malloc_trim(0)``): after host copies of the weights
    are dropped (loading, then placing on devices), glibc keeps their pages and the RSS stays up by
    hundreds of MB. False where there is no glibc (the call is then a no-op)."""
    import gc

    gc.collect()
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters (malloc.h)


def _mallopt(*settings: tuple[int, int]) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = hasattr(libc, "mallopt")
    for param, value in settings if ok else ():
        ok = bool(libc.mallopt(param, value)) and ok
    return ok


@contextlib.contextmanager
def reusing_freed_host_memory() -> Iterator[bool]:
    """Inside the block, blocks freed on the calling thread stay in its heap for the next allocations (glibc
    ``mallopt``: ``M_MMAP_MAX`` 0, large blocks come from the heap instead of a ``mmap`` of their own;
    ``M_TRIM_THRESHOLD`` -1, ``free`` never hands the heap's top back to the OS). Yields whether the allocator
    took the settings (False without glibc, or with ``RLHF_JAX_HOST_MALLOC=system``: a no-op).

    For a loop that runs one compiled step many times on CPU (:func:`rlhf_jax.trainer.train_loop`): XLA:CPU
    allocates the temporaries of each run as one block (141 MiB for the embedded model's reward-model step,
    1.4 GiB for SmolLM2's), which glibc maps afresh and unmaps when it is freed, so at every step the kernel
    faults in and zeroes every page of it again (36k minor faults per tiny reward-model step, ~1/3 of its time).
    Kept, the block is reused with no fault. Only the calling thread's arena is served this way (a thread arena
    maps any block over 64 MiB whatever the settings), hence :func:`rlhf_jax.runtime.setup` runs CPU computations
    on the calling thread. On leaving, large blocks are mapped again (above 32 MiB, the limit glibc's own
    adaptive threshold reaches) and the freed heap goes back to the OS (:func:`release_freed_host_memory`).
    Not for the RL loop: each of its programs runs once per iteration, between others whose freed temporaries
    would then stay resident (PPO on SmolLM2 peaked 0.3-0.4 GiB higher with the setting on, no faster)."""
    ok = os.environ.get("RLHF_JAX_HOST_MALLOC", "reuse") != "system" and _mallopt((_M_MMAP_MAX, 0),
                                                                                  (_M_TRIM_THRESHOLD, -1))
    try:
        yield ok
    finally:
        if ok:
            _mallopt((_M_MMAP_MAX, 65536), (_M_MMAP_THRESHOLD, 32 * 2**20), (_M_TRIM_THRESHOLD, 64 * 2**20))
            release_freed_host_memory()
