"""cluster.yaml against Ray's own launcher schema, a real `ray job submit` of a generation job
to a head started with `ray start --head` (the cluster way), checked shard by shard, and the loss
of a worker node of a real multi-node cluster in the middle of generation and of DiffAug training."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from tailforge.gen.data.shards.read import iter_samples
from tailforge.gen.data.shards.verify import verify_shard_set
from tailforge.gen.data.shards.write import load_records

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster_config():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_ray_launcher_schema(cluster_config):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cluster_config, schema)
    # Ray's own checks on top of the schema (node types, head type, worker bounds), after filling in
    # the provider's defaults exactly as `ray up` does before it contacts the cloud.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(cluster_config)
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_cluster_yaml_gpu_workers_autoscale_and_install_like_the_readme(cluster_config):
    nodes = cluster_config["available_node_types"]
    head = nodes[cluster_config["head_node_type"]]
    workers = [n for name, n in nodes.items() if name != cluster_config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert any(w["resources"].get("GPU", 0) >= 1 and w["max_workers"] > w["min_workers"] for w in workers)
    # torch pins first, exactly the Makefile's, then the package itself in editable mode
    pins = re.search(r"^TORCH_PINS := (.+)$", (REPO / "Makefile").read_text(), re.M).group(1).split()
    setup = cluster_config["setup_commands"]
    torch_step = next(i for i, c in enumerate(setup) if all(p in c for p in pins))
    package_step = next(i for i, c in enumerate(setup) if "pip install" in c and "-e " in c)
    assert torch_step < package_step


def test_cluster_yaml_keeps_dashboard_local_and_token_auth_on(cluster_config):
    head_start = " ".join(cluster_config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    everything = yaml.safe_dump(cluster_config)
    assert "RAY_AUTH_MODE=disabled" not in everything and "0.0.0.0" not in everything
    assert "~/.ray/auth_token" in cluster_config["file_mounts"]  # every node gets the cluster's token


def test_ray_job_submit_runs_generation_on_the_cluster(ray_head, tiny_model_dir, tmp_path):
    """The README's `ray job submit -- tailforge gen ...` against a real head: the job joins the
    cluster through $RAY_ADDRESS (set by the job server), runs two actors and writes verified shards."""
    working_dir = tmp_path / "job"  # README: --working-dir . (the repo); a small folder keeps the upload tiny
    working_dir.mkdir()
    (working_dir / "README").write_text("tailforge job\n")
    out = tmp_path / "shards"
    command = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head.dashboard,
               "--working-dir", str(working_dir), "--",
               "tailforge", "gen", "baseline", "--model", str(tiny_model_dir), "--num", "10", "--steps", "2",
               "--shard-size", "4", "--actors", "2", "--seed", "5", "--out", str(out), "--quiet"]
    result = subprocess.run(command, env=ray_head.env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", result.stdout + result.stderr)
    report = verify_shard_set(out)
    assert report["ok"], report["problems"]
    assert (report["samples"], report["shards"], report["unique_keys"]) == (10, 3, 10)
    keys = [s["key"] for s in iter_samples(out)]
    assert keys == [f"baseline-{i:09d}" for i in range(10)]
    workers = {r.worker for r in load_records(out).values()}
    assert len(workers) == 2  # two actors (two processes) wrote them: shards 0, 1 on one, 2 on the other


@pytest.mark.slow
def test_losing_a_worker_node_loses_no_sample_and_changes_no_byte(tiny_model_dir, tmp_path):
    """A head and a worker node of Ray's own multi-node test cluster (tests/node_loss.py, in a
    subprocess: the cluster cannot share a process with the suite's local Ray instance). The
    worker node, running one of the two actors, is removed in the middle of a generation job and
    of a DiffAug-served training run: Ray restarts the lost actor on the head and retries its
    tasks, and both runs end with exactly the bytes of the same runs without Ray."""
    script = Path(__file__).with_name("node_loss.py")
    result = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(tmp_path)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    # one actor per node when the node went (no CPU free), then the node was gone
    assert found["events"] == ["gen: 0 CPUs free before the worker node is removed", "gen: worker node removed",
                               "gen-stranded: 0 CPUs free before the worker node is removed",
                               "gen-stranded: worker node removed",
                               "train: 0 CPUs free before the worker node is removed", "train: worker node removed"]
    assert len(found["shards"]) == 6 and found["shards"] == found["reference_shards"]  # sha256 of every shard
    # no CPU left to restart the lost actor on: the survivor's backup copies finish the job, same bytes
    assert found["stranded_shards"] == found["reference_shards"]
    assert found["weights"] == found["reference_weights"]  # the classifier's final weights, bit for bit
