"""Timing of the sampling benchmark: a DDIM loop timed with CUDA events or ``perf_counter``, medians over
repeats, extrapolation when one loop does not fit the cell's budget."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------

class Clock:
    """Elapsed seconds of device work: CUDA events on CUDA, perf_counter (after the work) on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, start) -> float:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            ev.synchronize()
            return start.elapsed_time(ev) / 1e3
        return time.perf_counter() - start


def make_scheduler(steps: int):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    return sched


def device_timesteps(sched, device) -> list:
    """The schedule's timesteps as separate 0-d int64 tensors on ``device`` (copied once, before timing;
    separate storages so torch.compile sees the same input layout at every step)."""
    return [t.to(device).clone() for t in sched.timesteps]


@torch.no_grad()
def ddim_loop(denoise, sched, x, timesteps_dev, timesteps_cpu, n: int | None = None):
    """Run the first ``n`` (default all) DDIM steps from ``x``; returns the last latent."""
    n = len(timesteps_cpu) if n is None else n
    for i in range(n):
        eps = denoise(x, timesteps_dev[i])
        x = sched.step(eps, timesteps_cpu[i], x, eta=0.0).prev_sample
    return x


@dataclass
class Timing:
    sampling_s: float  # median seconds for one whole DDIM run of the batch (maybe extrapolated)
    step_s: float  # median seconds of one step (UNet + scheduler)
    repeats: int  # whole runs timed (0 when extrapolated)
    steps_timed: int
    extrapolated: bool


def time_sampling(denoise, x0, steps: int, device, max_seconds: float, repeats: int) -> Timing:
    """Time DDIM sampling within ``max_seconds`` (warm-up already done by the caller)."""
    clock = Clock(device)
    sched = make_scheduler(steps)
    ts_cpu = sched.timesteps
    ts_dev = device_timesteps(sched, device)
    # one step measured alone tells how much fits in the budget
    step_times = []
    for i in range(min(3, steps)):
        c = clock.start()
        ddim_loop(denoise, sched, x0, ts_dev[i:i + 1], ts_cpu[i:i + 1])
        step_times.append(clock.stop(c))
    step = statistics.median(step_times)
    whole_runs = min(repeats, int(max_seconds / max(step * steps, 1e-9)))
    if whole_runs >= 1:
        runs = []
        for _ in range(whole_runs):
            c = clock.start()
            ddim_loop(denoise, sched, x0, ts_dev, ts_cpu)
            runs.append(clock.stop(c))
        return Timing(statistics.median(runs), statistics.median(runs) / steps, whole_runs, whole_runs * steps, False)
    extra = max(0, min(steps, int(max_seconds / max(step, 1e-9))) - len(step_times))
    for i in range(extra):
        j = (len(step_times) + i) % steps
        c = clock.start()
        ddim_loop(denoise, sched, x0, ts_dev[j:j + 1], ts_cpu[j:j + 1])
        step_times.append(clock.stop(c))
    step = statistics.median(step_times)
    return Timing(step * steps, step, 0, len(step_times), True)


