"""How training and decoding get their memory: glibc's malloc told to keep what they free and
allocate again, and torch's allocator asked for huge pages."""

from __future__ import annotations

import os


def keep_freed_memory(one_arena: bool = False) -> None:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it.

    A training step allocates and frees the same large buffers every time. By default
    glibc hands big blocks back to the system and has to fault fresh, zeroed pages in
    for the next step; keeping them (trim threshold 1 GiB, mmap threshold at its 32 MiB
    maximum) spares those page faults, in training and in decoding large batches. A
    no-op where glibc is absent.

    Args:
        one_arena: let all threads share the main arena, whose freed memory these
            settings keep: for decoding with worker threads (``decode.workers``), whose
            own arenas would hand memory back after every pass. Not for training, whose
            fp32 steps ran slower with one arena (docs/performance.md).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
        libc.mallopt(m_mmap_threshold, 32 << 20)
        libc.mallopt(m_trim_threshold, 1 << 30)
        if one_arena:
            libc.mallopt(m_arena_max, 1)
    except (OSError, AttributeError):
        pass


def ask_for_huge_pages() -> None:
    """Have torch back its CPU tensors of 2 MiB and more with transparent huge pages.

    With ``THP_MEM_ALLOC_ENABLE=1`` torch's CPU allocator marks each such block
    ``MADV_HUGEPAGE``, so where the kernel's THP mode is ``madvise`` or ``always`` it maps
    them in 2 MiB pages: a training step's large temporaries (the output layer's
    (512, V) chunks, the feed-forward activations) then cost fewer page faults (about
    85% fewer a step) and TLB misses; training runs took 8% less time with it, though
    single profiles were within their noise (docs/performance.md). torch reads the
    variable once, at its first CPU allocation, so this has to run before any tensor is
    made; a value already in the environment is kept (``THP_MEM_ALLOC_ENABLE=0`` turns it
    off).
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def set_up_training_memory() -> None:
    """A training process's memory settings, ``keep_freed_memory`` (main arenas as they are)
    and ``ask_for_huge_pages``: for ``train.py`` and the benchmarks that train as it does.
    Call it before the first tensor is made."""
    keep_freed_memory()
    ask_for_huge_pages()
