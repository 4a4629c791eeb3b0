"""Give the heap's free pages back to the operating system after a burst of work.

CPython hands objects over 512 bytes (JSON-RPC responses, COPY buffers) to the C allocator,
and glibc keeps what they used once they are freed: after a catch-up the indexer's RSS stays
at its high-water mark although the memory is free. `malloc_trim(0)` returns those pages.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

__all__ = ["release_free_memory"]


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        # The process's own symbols: libc is among them on Linux, without a library search.
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None
    return trim


_TRIM = _malloc_trim()


def release_free_memory() -> bool:
    """Return free heap memory to the system; False where the C library cannot."""
    return _TRIM is not None and bool(_TRIM(0))
