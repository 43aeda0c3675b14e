"""Interleaved timing, written once for the demo (``speed.py``) and the benchmarks
(``bench/common.py``), and the verdict a timing allows against a target.

The variants of one comparison are timed in interleaved rounds: each round runs a block
of calls of every variant in turn and records each block's time per call. A machine whose
load changes during the run then slows all variants alike, and the ratio of two variants
within one round compares like with like. Each round starts one variant later than the
previous one, so that no variant always runs right after the same other one (whose
caches and allocations it would inherit). A variant's time is the median of its rounds;
its spread is the interquartile range of the rounds (robust to one disturbed round on a
shared machine, and meaningful from five rounds up).

Verdict rule: PASS only when the whole spread meets the target, FAIL only when the whole
spread misses it, "within noise" when the spread straddles it: this run cannot tell. Only
FAIL counts as a failure (an exit status, a red line); "within noise" does not, whatever
side of the target its median falls on.
"""

import statistics
import time
from typing import NamedTuple

MIN_ROUNDS = 5  # fewer rounds give no meaningful spread


def sync_for(device):
    """A function that waits for the device's queued work (a no-op on the CPU)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def interleaved(calls, rounds, *, repeats=None, sync=lambda: None, budget_s=None,
                on_error=None):
    """{name: [seconds per call, one entry per round]} of the zero-argument callables in
    ``calls``, timed in ``rounds`` (at least MIN_ROUNDS) interleaved rounds.

    ``repeats``: {name: calls per block} (default one call). After MIN_ROUNDS rounds the
    timing stops early once ``budget_s`` seconds have passed, so that a busy machine cannot
    stretch a run without bound. A call that raises propagates, unless ``on_error(name,
    exception)`` is given: then that variant is reported to it and left out of the result.
    """
    repeats = repeats or {}
    samples = {name: [] for name in calls}
    start = time.perf_counter()
    for done in range(max(rounds, MIN_ROUNDS)):
        if done >= MIN_ROUNDS and budget_s is not None and time.perf_counter() - start > budget_s:
            break
        names = list(samples)
        first = done % len(names) if names else 0
        for name in names[first:] + names[:first]:
            count = repeats.get(name, 1)
            try:
                sync()
                t0 = time.perf_counter()
                for _ in range(count):
                    calls[name]()
                sync()
            except Exception as e:
                if on_error is None:
                    raise
                on_error(name, e)
                del samples[name]
                continue
            samples[name].append((time.perf_counter() - t0) / count)
    return samples


class Spread(NamedTuple):
    """The median of a timing's rounds and their interquartile range."""

    median: float
    lo: float
    hi: float
    rounds: int

    def scaled(self, factor):
        return Spread(self.median * factor, self.lo * factor, self.hi * factor, self.rounds)


def spread(samples):
    """The Spread of one variant's per-round samples (or of per-round ratios)."""
    if len(samples) < 2:
        return Spread(samples[0], samples[0], samples[0], len(samples))
    lo, median, hi = statistics.quantiles(samples, n=4, method="inclusive")
    return Spread(median, lo, hi, len(samples))


def ratio(numerator, denominator):
    """The Spread of ``numerator / denominator`` taken round by round: two variants' samples
    from the same interleaved rounds (e.g. eager time / fused time, a speed-up)."""
    if len(numerator) != len(denominator):
        raise ValueError(f"samples of different runs: {len(numerator)} and "
                         f"{len(denominator)} rounds")
    return spread([a / b for a, b in zip(numerator, denominator, strict=True)])


PASS, FAIL, NOISE = "PASS", "FAIL", "within noise"


def verdict(measured, target, at_most=False):
    """PASS, FAIL or "within noise" (see the module's rule) for a Spread against a target:
    at least ``target`` by default, at most it with ``at_most``."""
    if at_most:
        return PASS if measured.hi <= target else FAIL if measured.lo > target else NOISE
    return PASS if measured.lo >= target else FAIL if measured.hi < target else NOISE


def format_spread(measured, fmt="{:.3g}"):
    """``"<lo>-<hi>, <n> rounds"``: the text printed next to a median."""
    return (f"IQR {fmt.format(measured.lo)}-{fmt.format(measured.hi)}, {measured.rounds} "
            f"round{'s' * (measured.rounds != 1)}")
