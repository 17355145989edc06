"""glibc heap settings (``mallopt``) for the layer engine and block recovery, as nested scopes.

Two policies, each a context manager that restores what moecore had set before it (glibc
cannot be asked for its current settings, so this module remembers them):

* :func:`bounded_host_heap` (the engine, around a whole compression): every allocation of
  128 KiB or more is its own ``mmap``, so a finished layer's tensors go back to the OS at once
  and peak resident memory stays flat in depth.
* :func:`reusable_heap` (block recovery, around its Adam steps): no ``mmap`` at all, so the
  same temporaries of hundreds of MiB are reused from the heap instead of faulted in again
  (3.3x the step time at Qwen3-30B-A3B's shape without it, benchmarks/RESULTS.md §7d).

Outside every scope a process gets :data:`HEAP_RELEASED`: glibc's dynamic mmap threshold at
its maximum (32 MiB) and the trim threshold twice that, the state glibc's own heuristic reaches
in a process that frees large tensors.  Everything here is a no-op outside glibc.
"""
from __future__ import annotations

import contextlib
import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
#: the engine's mmap threshold: blocks of this size or more are their own mmap
HEAP_BOUND = 128 * 1024
#: (mmap threshold, trim threshold) outside every scope
HEAP_RELEASED = (32 << 20, 64 << 20)
#: glibc's default for M_MMAP_MAX
MMAP_MAX_DEFAULT = 65536

#: what moecore last set, per parameter (outside every scope: the released state)
_SET = {M_MMAP_THRESHOLD: HEAP_RELEASED[0], M_TRIM_THRESHOLD: HEAP_RELEASED[1], M_MMAP_MAX: MMAP_MAX_DEFAULT}


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 (not glibc: AttributeError)
        return libc
    except (OSError, AttributeError):
        return None


def trim() -> None:
    """Return the heap's free pages to the OS (``malloc_trim``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _apply(libc, values: dict[int, int]) -> None:
    for param, value in values.items():
        libc.mallopt(param, value)
        _SET[param] = value


@contextlib.contextmanager
def _scope(inside: dict[int, int]):
    """``inside`` for the block; then the settings before it, and the heap trimmed."""
    libc = _libc()
    if libc is None:
        yield
        return
    before = {param: _SET[param] for param in inside}
    _apply(libc, inside)
    try:
        yield
    finally:
        _apply(libc, before)
        libc.malloc_trim(0)


def bounded_host_heap():
    """Inside the block, every allocation of 128 KiB or more is served from its own mmap, so a
    freed layer's tensors go back to the OS at once.  glibc's default (a threshold that grows
    up to 32 MiB) keeps such blocks in the heap, and peak resident memory then creeps up with
    the number of layers through fragmentation alone.  On exit the settings before it come
    back: a 128 KiB bound left behind after :func:`moecore.compress` would make every later
    tensor allocation of the user's process an mmap and its page faults (the held-out
    evaluation after a compression took about twice the CPU time)."""
    return _scope({M_MMAP_THRESHOLD: HEAP_BOUND, M_TRIM_THRESHOLD: HEAP_BOUND})


def reusable_heap():
    """Inside the block every allocation comes from glibc's heap and freed blocks stay there
    for reuse (``M_MMAP_MAX`` 0: no mmap, whatever the size; ``M_TRIM_THRESHOLD`` 1 GiB); on
    exit the settings before it come back (the engine's bound inside a compression) and the
    heap is trimmed.  Block recovery's Adam steps allocate the same temporaries again and
    again: with every one an mmap they took 2.4x the CPU time on the bundled models and 3.3x
    at Qwen3-30B-A3B's shape, where they are hundreds of MiB (benchmarks/RESULTS.md §7d)."""
    return _scope({M_TRIM_THRESHOLD: 1 << 30, M_MMAP_THRESHOLD: 32 << 20, M_MMAP_MAX: 0})


def available_host_bytes() -> int | None:
    """Memory the kernel says a new allocation can get now (Linux ``MemAvailable``), else ``None``."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
