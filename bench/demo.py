"""`tailforge bench demo`: wall time and peak memory of the embedded default, fresh and cached.

The demo runs as a child process (`python -m tailforge demo`), twice into the same empty folder:
the first run does everything (models, shards, classifiers, evaluations, report), the second
reuses what the first left. Memory is sampled over the child's whole process tree (the driver,
the local Ray instance it starts and the Ray workers and actors under it). The memory figure is
the peak of the summed proportional set sizes (PSS: a page shared by n processes counts 1/n in
each, so the sum is what the tree holds in RAM). The peak of the summed resident set sizes is
reported next to it as an upper bound (shared pages, such as Ray's object store and the torch
libraries, count once per process there). RSS is cheap to read and is sampled every 0.2 s; PSS
needs a walk of each process's page tables (about 25 ms for a process that has imported torch), so
it is sampled every 5 s: sampled as often as RSS it took a core of the two and slowed the demo by
a third. The full benchmark uses the demo's defaults; --quick a reduced demo (few training steps
and samples) that checks the harness, not the goal. Installation time is not part of it (the
README gives `make install`'s).
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psutil

from tailforge.bench import benchmark

#: a demo run of about three minutes (mostly Ray and actor start-up) through every stage, Ray and evaluator
QUICK_ARGS = ("--diffusion-steps", "60", "--num-samples", "40", "--sampling-steps", "10",
              "--guidance-epochs", "1", "--classifier-epochs", "2", "--reference-epochs", "2",
              "--corruptions", "gaussian_noise,contrast", "--severities", "3")
GOAL_SECONDS, GOAL_GIB = 600.0, 4.0  # the performance issue's goals for the default run on the 2-core CPU


def _tree(process: psutil.Process) -> list[psutil.Process]:
    return [process, *process.children(recursive=True)]


def _summed(processes: list[psutil.Process], read: Callable[[psutil.Process], int]) -> int:
    """Sum of `read` over the processes still alive."""
    total = 0
    for proc in processes:
        try:
            total += read(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_measured(command: list[str], log: Path, rss_interval: float = 0.2, pss_every: int = 25) -> dict[str, Any]:
    """Run `command` (output to `log`): its wall seconds and the peak summed RSS (every `rss_interval`
    seconds) and PSS (every `pss_every`-th sample, and the first) of its process tree."""
    peak_pss = peak_rss = 0
    with log.open("w") as out:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        watched = psutil.Process(child.pid)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak_pss, peak_rss
            for count in itertools.count():
                if done.is_set():
                    return
                try:
                    processes = _tree(watched)
                except psutil.NoSuchProcess:
                    return
                peak_rss = max(peak_rss, _summed(processes, lambda p: p.memory_info().rss))
                if count % pss_every == 0:
                    peak_pss = max(peak_pss, _summed(processes, lambda p: p.memory_full_info().pss))
                done.wait(rss_interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = child.wait()
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
    if code != 0:
        raise RuntimeError(f"`{' '.join(command)}` exited with {code}; its output is in {log}")
    return {"seconds": round(seconds, 1), "peak_pss_gib": round(peak_pss / 2**30, 3),
            "peak_rss_sum_gib": round(peak_rss / 2**30, 3)}


@benchmark("demo", "wall time and peak memory (process tree) of `tailforge demo`, fresh and second run "
                   "(goals <= 10 min, <= 4 GiB on the 2-core CPU)")
def bench_demo(quick: bool, workdir: Path) -> dict[str, Any]:
    out = workdir / "demo-out"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "tailforge", "demo", "--out", str(out), *(QUICK_ARGS if quick else ())]
    fresh = run_measured(command, workdir / "fresh.log")
    stages = json.loads((out / "summary.json").read_text())["seconds"]  # before the second run rewrites it
    second = run_measured(command, workdir / "second.log")
    result: dict[str, Any] = {
        "command": " ".join(["tailforge", "demo", *(QUICK_ARGS if quick else ())]),
        "fresh_s": fresh["seconds"], "fresh_peak_pss_gib": fresh["peak_pss_gib"],
        "fresh_peak_rss_sum_gib": fresh["peak_rss_sum_gib"], "fresh_stage_seconds": stages,
        "second_s": second["seconds"], "second_peak_pss_gib": second["peak_pss_gib"],
        "second_peak_rss_sum_gib": second["peak_rss_sum_gib"],
        "second_over_fresh": round(second["seconds"] / fresh["seconds"], 4),
    }
    if not quick:
        result.update(goal_seconds_met=fresh["seconds"] <= GOAL_SECONDS and second["seconds"] <= GOAL_SECONDS,
                      goal_memory_met=max(fresh["peak_pss_gib"], second["peak_pss_gib"]) <= GOAL_GIB)
    return result
