"""Fault injection: generation actors and drivers killed (SIGKILL) at random points.

Each trial runs `tailforge gen baseline` as a driver process joined to a `ray start --head` cluster
(the `ray_head` fixture), kills one of its GenerateActor processes after a random number of shards
(Ray restarts it and redoes its shard), kills the driver itself later, sometimes kills another
actor of the second driver, and lets a second run of the same command resume. The final set must
hold exactly the requested samples, unique keys, hashes that verify, and the same bytes as an
uninterrupted run with the same seed.

CI runs TAILFORGE_FAULT_TRIALS=1 trial (the default); the README's figure comes from
`TAILFORGE_FAULT_TRIALS=10 TAILFORGE_FAULT_REPORT=fault-trials.json pytest -s tests/test_faults.py`
(the report lists each trial's kill points).
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tailforge.gen.core.files import config_dict
from tailforge.gen.data.shards.format import RECORDS_DIR, plan_shards
from tailforge.gen.data.shards.read import iter_samples
from tailforge.gen.data.shards.verify import verify_shard_set
from tailforge.gen.data.shards.write import load_records
from tailforge.gen.diffusion.config import SamplingConfig
from tailforge.gen.jobs.config import BaselineConfig
from tailforge.gen.jobs.runner import run_job
from tailforge.gen.jobs.sources import BaselineSource

TRIALS = int(os.environ.get("TAILFORGE_FAULT_TRIALS", "1"))
NUM, SHARD, BATCH, STEPS, SEED = 32, 4, 4, 25, 11
SHARDS = NUM // SHARD


def payloads(root):
    return {s["key"]: (s["image"].tobytes(), s["label"], json.dumps(s["meta"], sort_keys=True))
            for s in iter_samples(root, verify=True)}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """The uninterrupted run (in-process) that every faulted run must reproduce byte for byte."""
    root = tmp_path_factory.mktemp("reference")
    config = BaselineConfig(model=str(tiny_model_dir), num=NUM, sampling=SamplingConfig(sampler="ddpm", steps=STEPS),
                            seed=SEED, shard_size=SHARD, batch_size=BATCH)
    records = run_job(root, config_dict(config), plan_shards(config.job, NUM, SHARD, SEED),
                      functools.partial(BaselineSource, config), actors=0, progress=False)
    return [r.sha256 for r in records], payloads(root)


def actor_processes(head):
    found = []
    for proc in head.processes():
        try:
            if " ".join(proc.cmdline()).startswith("ray::GenerateActor"):
                found.append(proc)
        except Exception:  # the process ended while we looked
            pass
    return found


def recorded(out: Path) -> int:
    folder = out / RECORDS_DIR
    return len(list(folder.glob("*.json"))) if folder.is_dir() else 0


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def start_driver(head, model_dir, out):
    command = [sys.executable, "-m", "tailforge", "gen", "baseline", "--model", str(model_dir), "--num", str(NUM),
               "--steps", str(STEPS), "--sampler", "ddpm", "--shard-size", str(SHARD), "--batch-size", str(BATCH),
               "--seed", str(SEED), "--actors", "2", "--address", head.address, "--out", str(out), "--quiet"]
    return subprocess.Popen(command, env=head.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_an_actor(head, rng, driver, out, after_records: int) -> dict | None:
    """SIGKILL one GenerateActor once `after_records` shards are recorded (plus a random delay)."""
    wait_for(lambda: driver.poll() is not None or (recorded(out) >= after_records and actor_processes(head)),
             240, f"{after_records} records and a live actor")
    time.sleep(rng.uniform(0.0, 0.6))
    actors = actor_processes(head)
    if driver.poll() is not None or not actors:
        return None
    victim = rng.choice(actors)
    victim.send_signal(signal.SIGKILL)
    return {"pid": victim.pid, "records_before": recorded(out)}


def run_trial(trial: int, head, model_dir, out: Path) -> dict:
    rng = random.Random(1000 + trial)
    # Start from a quiet cluster so every GenerateActor we see belongs to this trial's driver.
    wait_for(lambda: not actor_processes(head), 120, "actors of the previous trial to exit")
    events: dict = {"trial": trial}
    driver = start_driver(head, model_dir, out)
    events["actor_kill"] = kill_an_actor(head, rng, driver, out, after_records=rng.randrange(0, SHARDS // 2))
    kill_at = rng.randrange(SHARDS // 2, SHARDS - 1)
    wait_for(lambda: driver.poll() is not None or recorded(out) >= kill_at, 240, f"{kill_at} records")
    time.sleep(rng.uniform(0.0, 0.4))
    events["driver_killed"] = driver.poll() is None
    events["records_at_driver_kill"] = recorded(out)
    driver.send_signal(signal.SIGKILL)
    driver.communicate(timeout=60)
    # The same command again: resumes from the records. Half the trials kill one of its actors too
    # (after the first driver's actors are gone, so the victim is the second driver's); the others
    # start it at once, racing actors of the dead driver that may still be finishing a shard.
    second_kill = rng.random() < 0.5
    if second_kill:
        wait_for(lambda: not actor_processes(head), 120, "the killed driver's actors to exit")
    driver = start_driver(head, model_dir, out)
    if second_kill:
        events["second_actor_kill"] = kill_an_actor(head, rng, driver, out, after_records=recorded(out) + 1)
    _, stderr = driver.communicate(timeout=600)
    assert driver.returncode == 0, stderr[-3000:]
    return events


@pytest.mark.timeout(3600)
def test_killed_actors_and_drivers_lose_and_duplicate_nothing(ray_head, tiny_model_dir, reference, tmp_path):
    shas, reference_payloads = reference
    outcomes = []
    for trial in range(TRIALS):
        out = tmp_path / f"trial-{trial}"
        events = run_trial(trial, ray_head, tiny_model_dir, out)
        report = verify_shard_set(out)  # every record's sha256 against the bytes, keys unique, counts
        assert report["ok"], (events, report["problems"])
        assert (report["samples"], report["unique_keys"], report["shards"]) == (NUM, NUM, SHARDS), events
        records = load_records(out)
        assert [records[i].sha256 for i in sorted(records)] == shas, events  # same bytes as the uninterrupted run
        assert payloads(out) == reference_payloads, events
        events["writers"] = len({r.worker for r in records.values()})
        outcomes.append(events)
    assert any(e["actor_kill"] for e in outcomes), outcomes  # at least one actor really died mid-job
    summary = {"trials": TRIALS, "passed": len(outcomes),
               "actor_kills": sum(bool(e["actor_kill"]) + bool(e.get("second_actor_kill")) for e in outcomes),
               "driver_kills": sum(e["driver_killed"] for e in outcomes), "outcomes": outcomes}
    report_path = Path(os.environ.get("TAILFORGE_FAULT_REPORT", tmp_path / "fault-trials.json"))
    report_path.write_text(json.dumps(summary, indent=2))
    print("\nfault trials:", json.dumps({k: v for k, v in summary.items() if k != "outcomes"}))
