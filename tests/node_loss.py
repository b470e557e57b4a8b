"""Node loss on a real multi-node Ray cluster (tests/test_cluster.py runs this in a subprocess:
Ray's test cluster cannot share a process with the suite's local Ray instance).

``python tests/node_loss.py MODEL_DIR WORK_DIR`` starts ``ray.cluster_utils.Cluster``: a head node
(2 CPUs) and a worker node (1 CPU), each with its own raylet and object store. It runs

  (a) a generation job (run_job, 2 actors) and removes the worker node once the first shard is
      recorded, and
  (b) a DiffAug-served classifier training run (train_classifier, diffaug_actors=2) on a fresh
      worker node, removed after the first epoch (batches of the second are in flight then),

and prints one JSON line: what both runs produced (shard sha256s, final classifier weights'
sha256) next to the same runs without Ray (generation with actors=0, in-process DiffAug).

Placement: every actor asks for CPU // actors = 1 CPU. While the job's actors start, a blocker
actor pinned to the head holds one of its CPUs, so one actor lands on each node; the blocker is
released right before the worker node goes, so the survivor has room for Ray to restart the lost
actor there (as an autoscaler's replacement node would give it). A third run keeps the blocker:
the lost actor cannot be restarted, and the job finishes on the survivor's backup tasks.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tailforge.gen.core.files import config_dict, file_sha256
from tailforge.gen.data.shards.format import plan_shards
from tailforge.gen.diffusion.config import SamplingConfig
from tailforge.gen.jobs import runner
from tailforge.gen.jobs.config import BaselineConfig
from tailforge.gen.jobs.sources import BaselineSource
from tailforge.gen.models.classifiers import CLASSIFIER_WEIGHTS
from tailforge.train.classifier import train_classifier
from tailforge.train.config import ClassifierTrainConfig

OBJECT_STORE = 80 * 1024**2


@ray.remote(num_cpus=1)
class Blocker:
    def ready(self) -> bool:
        return True


def generate(model_dir: str, out: Path, actors: int) -> dict[str, str]:
    config = BaselineConfig(model=model_dir, num=12, sampling=SamplingConfig(sampler="ddpm", steps=2), seed=7,
                            shard_size=2, batch_size=2)
    specs = plan_shards(config.job, config.num, config.shard_size, config.seed)
    runner.run_job(out, config_dict(config), specs, functools.partial(BaselineSource, config), actors=actors,
                   manifest_extra={"num_classes": 10, "class_names": list("0123456789")}, progress=False)
    return {p.name: file_sha256(p) for p in sorted(out.glob("*.tar"))}


def train(model_dir: str, out: Path, actors: int, report=None) -> str:
    config = ClassifierTrainConfig(dataset="digits?n=64", model="tinycnn", batch_size=16, loader_workers=0,
                                   shuffle_buffer=32, epochs=2, diffaug=model_dir, diffaug_actors=actors)
    train_classifier(config, out, progress=False, report=report)
    return file_sha256(out / CLASSIFIER_WEIGHTS)


def add_worker(cluster: Cluster):
    node = cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
    cluster.wait_for_nodes()
    return node


def hold_a_head_cpu(head_id: str):
    blocker = Blocker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head_id, soft=False)).remote()
    ray.get(blocker.ready.remote())
    return blocker


def lose_the_worker(cluster: Cluster, worker, blocker, events: list[str], what: str, *, release: bool = True) -> None:
    # every CPU of both nodes is taken (the blocker and one actor per node) before the node goes;
    # release=False keeps the blocker, so the lost actor cannot be restarted anywhere
    events.append(f"{what}: {ray.available_resources().get('CPU', 0):g} CPUs free before the worker node is removed")
    if release:
        ray.kill(blocker)
    cluster.remove_node(worker)
    events.append(f"{what}: worker node removed")


def main(model_dir: str, work: Path) -> None:
    result = {"events": []}
    result["reference_shards"] = generate(model_dir, work / "gen-reference", actors=0)
    result["reference_weights"] = train(model_dir, work / "train-reference", actors=0)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": OBJECT_STORE,
                                                            "include_dashboard": False})
    try:
        worker = add_worker(cluster)
        ray.init(address=cluster.address, log_to_driver=False)
        head_id = cluster.head_node.node_id
        events = result["events"]

        blocker = hold_a_head_cpu(head_id)
        save_record = runner.save_record

        def save_then_lose_the_worker(root, record):
            save_record(root, record)
            if "gen: worker node removed" not in events:
                lose_the_worker(cluster, worker, blocker, events, "gen")

        runner.save_record = save_then_lose_the_worker
        result["shards"] = generate(model_dir, work / "gen", actors=2)

        # (a') the same, but no CPU is left for Ray to restart the lost actor on: the survivor
        # takes backup copies of the stranded shards (gen/jobs/ray.py `_drain`)
        worker = add_worker(cluster)
        blocker = hold_a_head_cpu(head_id)

        def save_then_strand_an_actor(root, record):
            save_record(root, record)
            if "gen-stranded: worker node removed" not in events:
                lose_the_worker(cluster, worker, blocker, events, "gen-stranded", release=False)

        runner.save_record = save_then_strand_an_actor
        result["stranded_shards"] = generate(model_dir, work / "gen-stranded", actors=2)
        runner.save_record = save_record
        ray.kill(blocker)

        worker = add_worker(cluster)
        blocker = hold_a_head_cpu(head_id)

        def after_epoch(entry):
            if entry["epoch"] == 1:
                lose_the_worker(cluster, worker, blocker, events, "train")

        result["weights"] = train(model_dir, work / "train", actors=2, report=after_epoch)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
