"""glibc's malloc told to keep the memory that training and decoding free and allocate again."""

from __future__ import annotations


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
