"""`tailforge bench NAME`: benchmarks as commands that write JSON and print a table.

A benchmark is a function ``(quick: bool, workdir: Path) -> dict`` registered with
:func:`benchmark`. Every figure it returns should be a ratio against a baseline measured in the same
run (same machine, model, batch and steps) plus the absolute figures. The harness adds the machine
description and writes ``{out}/{name}.json`` (``bench all`` writes one file with every result).
None of them is a timed test.

One registered with an ``options`` class (a frozen config dataclass: what it measures, e.g. which
trained model) is called ``(quick, workdir, options)``, the options coming from ``tailforge bench
NAME --set FIELD=VALUE``. A benchmark whose prerequisites are absent here (a CUDA device, a
trained model) raises :class:`BenchmarkUnavailable`: one line when it was asked for by name, an
``unavailable`` entry in the results of ``bench all``.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

from tailforge.gen.core.errors import ConfigError
from tailforge.gen.core.files import write_json_atomic

Benchmark = Callable[..., dict[str, Any]]
BENCHMARKS: dict[str, tuple[Benchmark, str]] = {}
#: the options class of each benchmark that takes one
BENCHMARK_OPTIONS: dict[str, type] = {}

#: Modules that register benchmarks when imported (each keeps its benchmark next to what it measures).
BENCHMARK_MODULES: list[str] = [".sampler", ".stream", ".lowdensity", ".guidance",
                                 ".reconstruct", ".diffaug", ".memorization",
                                 ".demo", ".quality_speed", ".eval_speed", ".gpu", ".gate"]


class BenchmarkUnavailable(ConfigError):
    """What a benchmark needs is not on this machine (the message names it and how to provide it)."""


def benchmark(name: str, description: str, options: type | None = None) -> Callable[[Benchmark], Benchmark]:
    def register(fn: Benchmark) -> Benchmark:
        BENCHMARKS[name] = (fn, description)
        if options is not None:
            BENCHMARK_OPTIONS[name] = options
        return fn

    return register


def load_benchmarks() -> dict[str, tuple[Benchmark, str]]:
    for module in BENCHMARK_MODULES:
        importlib.import_module(module, package=__package__)
    return BENCHMARKS


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_benchmarks(names: list[str], *, quick: bool, out: Path,
                   options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run `names` in turn; ``options`` maps a benchmark's name to its options instance (the
    options class's defaults where absent)."""
    registry = load_benchmarks()
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ConfigError(f"unknown benchmark(s) {unknown}; available: {sorted(registry)}")
    options = options or {}
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "quick": quick, "results": {}}
    for name in names:
        fn, _ = registry[name]
        workdir = out / "work" / name
        workdir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        extra = [options.get(name) or BENCHMARK_OPTIONS[name]()] if name in BENCHMARK_OPTIONS else []
        try:
            result = fn(quick, workdir, *extra)
        except BenchmarkUnavailable as err:
            if len(names) == 1:
                raise
            result = {"unavailable": str(err)}
        result["bench_seconds"] = round(time.perf_counter() - started, 2)
        results["results"][name] = result
        print_table(name, result)
    target = out / ("all.json" if len(names) > 1 else f"{names[0]}.json")
    write_json_atomic(target, results)
    print(f"\nwrote {target}")
    return results


def print_table(name: str, result: dict[str, Any]) -> None:
    print(f"\n== {name}")
    for key, value in result.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, (dict, list)):
            value = json.dumps(value)
        print(f"  {key:<40} {value}")
