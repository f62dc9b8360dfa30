"""Wall time and peak memory of a callable, on CPU (resident set size) or CUDA (allocator peak)."""
from __future__ import annotations

import ctypes
import os
import threading
import time

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]


def _heap_reader():
    """Bytes currently allocated through malloc (glibc ``mallinfo2``: in-use heap + mmapped chunks),
    which, unlike the resident set size, falls again when tensors are freed; RSS as a fallback."""
    try:
        libc = ctypes.CDLL(None)
        fn = libc.mallinfo2
        fn.restype = _MallInfo2

        def read() -> int:
            m = fn()
            return int(m.uordblks + m.hblkhd)

        read()
        return read
    except (AttributeError, OSError):
        return _rss_bytes


def measure(fn, device: str | torch.device = "cpu", poll_s: float = 0.002):
    """Run ``fn()``; return ``(result, seconds, peak_bytes)``.

    ``peak_bytes``: on CUDA ``torch.cuda.max_memory_allocated`` during the call; on CPU the peak of
    malloc'd bytes in use above the level at the start of the call (glibc ``mallinfo2``, else the
    resident set size), sampled every ``poll_s`` seconds by a background thread, so allocations
    that live shorter than ``poll_s`` can be missed.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(dev)
        return out, time.perf_counter() - t0, torch.cuda.max_memory_allocated(dev)
    read = _heap_reader()
    try:
        base = read()
    except OSError:
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0, 0
    peak = [base]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], read())
            stop.wait(poll_s)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    t0 = time.perf_counter()
    try:
        out = fn()
    finally:
        elapsed = time.perf_counter() - t0
        stop.set()
        th.join()
    peak[0] = max(peak[0], read())
    return out, elapsed, peak[0] - base
