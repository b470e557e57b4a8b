"""`tailforge bench NAME`: benchmarks as commands that write JSON and print a table.

A benchmark is a function ``(quick: bool, workdir: Path) -> dict`` registered with
:func:`benchmark`. Every figure it returns should be a ratio against a baseline measured in the same
run (same machine, model, batch and steps) plus the absolute figures. The harness adds the machine
description and writes ``{out}/{name}.json`` (``bench all`` writes one file with every result).
None of them is a timed test.
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

from tailforge.gen.core.files import write_json_atomic

Benchmark = Callable[[bool, Path], dict[str, Any]]
BENCHMARKS: dict[str, tuple[Benchmark, str]] = {}

#: Modules that register benchmarks when imported (each keeps its benchmark next to what it measures).
BENCHMARK_MODULES: list[str] = [".sampler", ".stream", ".lowdensity", ".guidance",
                                 ".reconstruct", ".diffaug", ".memorization",
                                 ".demo"]


def benchmark(name: str, description: str) -> Callable[[Benchmark], Benchmark]:
    def register(fn: Benchmark) -> Benchmark:
        BENCHMARKS[name] = (fn, description)
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


def run_benchmarks(names: list[str], *, quick: bool, out: Path) -> dict[str, Any]:
    registry = load_benchmarks()
    unknown = [n for n in names if n not in registry]
    if unknown:
        from tailforge.gen.core.errors import ConfigError
        raise ConfigError(f"unknown benchmark(s) {unknown}; available: {sorted(registry)}")
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "quick": quick, "results": {}}
    for name in names:
        fn, _ = registry[name]
        workdir = out / "work" / name
        workdir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        result = fn(quick, workdir)
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
