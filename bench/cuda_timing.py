"""GPU time of one call, the way the kernel benches measure it (one helper for all of them)."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], calls: int, warmup: int = 3) -> float:
    """Median milliseconds of `fn` on the GPU over `calls` calls after `warmup` ones, each
    between two CUDA events (the host's launch time between calls is not counted)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
