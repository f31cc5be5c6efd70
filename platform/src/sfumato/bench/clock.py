"""The CPU-time clock that `bench quality`'s races (class and --text) train on."""

from __future__ import annotations

import time

import numpy as np


def on_the_clock(trainer, feed, cpu_seconds: float, score_every: float, score) -> list[dict]:
    """Train `trainer` on `feed` for `cpu_seconds` of process CPU time (scoring off the clock);
    every `score_every` CPU seconds and at the end, `score(point)` with the point's cpu_s, steps,
    recent loss and wall_s returns the point to keep (its own figures added). A trainer with a
    `progress` attribute is told the share of its CPU time spent before each step."""
    points, spent, steps, losses, started = [], 0.0, 0, [], time.perf_counter()
    next_score = score_every
    while True:
        batch = next(feed)
        if hasattr(trainer, "progress"):
            trainer.progress = spent / cpu_seconds
        t0 = time.process_time()
        losses.append(trainer.step(batch))
        spent += time.process_time() - t0
        steps += 1
        if spent >= next_score or spent >= cpu_seconds:
            point = {
                "cpu_s": round(spent, 1),
                "steps": steps,
                "loss": round(float(np.mean(losses[-50:])), 4),
                "wall_s": round(time.perf_counter() - started, 1),
            }
            points.append(score(point))
            next_score += score_every
            if spent >= cpu_seconds:
                return points
