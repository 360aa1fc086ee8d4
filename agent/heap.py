"""Keep glibc from handing freed chunk-sized blocks back to the kernel while streaming.

Sending a result chunk still allocates a few short-lived 1 MiB objects that the agent
cannot avoid (websockets masks each client frame into a fresh ``bytes``, RFC 6455
§5.3); receiving one, the reference control plane allocates a few more (its socket
reads of up to 1 MiB + 64 KiB, websockets' frame buffer and its unmasked copy). With
glibc's defaults such a block is freed back to the kernel (``brk`` shrink or
``munmap``) and the next one faults its 256 pages in again: profiled at about half
of the agent's event-loop time while streaming 1 GiB. Raising the mmap and trim
thresholds keeps those blocks in the heap for reuse; both processes call
:func:`keep_freed_blocks` once. The cost is bounded: at most :data:`TRIM_THRESHOLD`
bytes of free heap stay resident (the bench's RSS growth goal is under 32 MiB).

A no-op where the C library has no ``mallopt`` (musl, macOS): nothing is wrong there,
only slower.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import structlog

log = structlog.get_logger(__name__)

# glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 4 * 1024 * 1024  # above the 1 MiB (+ header) blocks of one chunk
TRIM_THRESHOLD = 16 * 1024 * 1024

_done = False


def keep_freed_blocks() -> bool:
    """Set the thresholds once per process; True when the C library took them."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not _done:
        log.info("malloc_thresholds_refused")
    return _done
