"""Wall time and peak memory of a callable, on CPU (resident set size) or CUDA (allocator peak)."""
from __future__ import annotations

import os
import threading
import time

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn, device: str | torch.device = "cpu", poll_s: float = 0.002):
    """Run ``fn()``; return ``(result, seconds, peak_bytes)``.

    ``peak_bytes``: on CUDA ``torch.cuda.max_memory_allocated`` during the call; on CPU the peak
    resident set size above the level at the start of the call, sampled every ``poll_s`` seconds
    by a background thread (Linux ``/proc``; 0 where unavailable).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(dev)
        return out, time.perf_counter() - t0, torch.cuda.max_memory_allocated(dev)
    try:
        base = _rss_bytes()
    except OSError:
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0, 0
    peak = [base]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
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
    peak[0] = max(peak[0], _rss_bytes())
    return out, elapsed, peak[0] - base
