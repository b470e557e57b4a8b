"""Effective model memorization (Gu et al. 2023, Definition 1) over nested training subsets.

    EMM_eps(P, M, T) = max_N { E[R_Mem(D, M, T)] >= 1 - eps  |  D ~ P, |D| = N }

Gu et al. 2023 (Section 2) estimates it by training the same model M with the same procedure T on a
series of training sets of growing size, measuring each memorization ratio R_Mem (the ratio
criterion, :mod:`tailforge.eval.memorization`), and interpolating between the two consecutive
sizes whose ratios straddle 1 - eps; eps = 0.1 throughout that paper. Its released code reports
EMM as the largest size whose ratio is still >= 90 %, interpolated; :func:`estimate_emm` does that
(linearly in N) and says when the sizes do not bracket it.

Our subsets are nested (``SPEC?n=N`` keeps the first N of one seeded permutation), which is what
Hypothesis 1 (Eq. 4) compares. Each size is one Ray task (one CPU, or one GPU when the cluster has
them) that trains a model, samples it and measures memorization, so the sizes train in parallel.

Options that change the training set, each written as a shard set the trainer reads:
- ``dummy``: Yoon et al. 2023 Hypothesis 2 / Appendix B.2: add K Gaussian-mixture dummy images (the ``gm``
  dataset at the same size and channels) as one extra class; samples are drawn only for the real
  classes and compared with the real training images.
- ``labels``: ``true`` (the dataset's classes), ``none`` (unconditional model), ``random`` (each
  image gets a uniformly random label among C classes) or ``unique`` (image i gets class i): Gu et
  al. 2023 Section 6, where random labels memorize like true ones and unique labels more.
- ``class_counts``: only the listed classes, CLASS:IMAGES each (a majority and a minority class, Yoon
  et al. 2023 Hypothesis 3); the per-class ratios of the samples generated for each class compare them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
import urllib.parse
from pathlib import Path
from typing import Any, Sequence

import torch

from tailforge.eval.config import EMMConfig, parse_class_counts
from tailforge.eval.results import tag_result
from tailforge.gen.core.device import default_device
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.core.files import config_dict, saved_result, write_json_atomic
from tailforge.gen.data.datasets import LabeledImages, load_dataset


def subset_spec(spec: str, n: int, subset_seed: int) -> str:
    """`spec` restricted to the first n images of its seeded training permutation (n = 0: all)."""
    head, _, query = spec.partition("?")
    options = urllib.parse.parse_qsl(query, keep_blank_values=True)
    if any(key in ("n", "subset_seed") for key, _ in options):
        raise ConfigError(f"dataset spec {spec!r} already sets n/subset_seed; EMM chooses the subsets itself")
    if n:
        options += [("n", str(n)), ("subset_seed", str(subset_seed))]
    return head + ("?" + urllib.parse.urlencode(options) if options else "")


def estimate_emm(sizes: Sequence[int], ratios: Sequence[float], epsilon: float = 0.1) -> dict[str, Any]:
    """Gu et al. 2023 Definition 1 estimated as in its Section 2: the largest size N_i whose ratio is
    >= 1 - eps and the next size N_{i+1} (ratio < 1 - eps) bracket EMM, interpolated linearly:

        EMM = N_i + (r_i - (1 - eps)) * (N_{i+1} - N_i) / (r_i - r_{i+1}).

    When no size reaches 1 - eps, EMM is below the smallest size; when the largest size still
    does, EMM is at least that size; both are reported as bounds (emm = None)."""
    if len(sizes) != len(ratios) or not sizes:
        raise ConfigError("estimate_emm needs one ratio per size")
    points = sorted(zip((int(n) for n in sizes), (float(r) for r in ratios)))
    target = 1.0 - epsilon
    result: dict[str, Any] = {"epsilon": epsilon, "threshold": target,
                              "monotone": all(a[1] >= b[1] for a, b in zip(points, points[1:]))}
    above = [i for i, (_, r) in enumerate(points) if r >= target]
    if not above:
        return {**result, "emm": None, "bracketed": False, "upper_size": points[0][0], "upper_ratio": points[0][1],
                "note": f"no size reaches ratio {target:g}: EMM < {points[0][0]}"}
    i = above[-1]
    if i == len(points) - 1:
        return {**result, "emm": None, "bracketed": False, "lower_size": points[-1][0], "lower_ratio": points[-1][1],
                "note": f"the largest size still has ratio >= {target:g}: EMM >= {points[-1][0]}"}
    (n0, r0), (n1, r1) = points[i], points[i + 1]
    emm = n0 + (r0 - target) * (n1 - n0) / (r0 - r1)
    return {**result, "emm": emm, "bracketed": True, "lower_size": n0, "lower_ratio": r0,
            "upper_size": n1, "upper_ratio": r1}


# --------------------------------------------------------------------------------------------
# One point of the study: training set -> model -> samples -> memorization ratio.


def write_labeled_shards(root: Path, data: LabeledImages, class_names: Sequence[str], *, job: str = "trainset",
                         shard_size: int = 1000) -> str:
    """Write an in-memory training set as a shard set (temp + rename per shard, records, manifest)
    and return its ``shards:`` spec, so the standard trainer reads modified training sets."""
    from tailforge.gen.data.shards.format import ShardRecord, encode_sample, plan_shards, sample_key
    from tailforge.gen.data.shards.write import save_record, write_manifest, write_shard

    root.mkdir(parents=True, exist_ok=True)
    records = []
    for spec in plan_shards(job, len(data), shard_size, seed=0):
        samples = (encode_sample(sample_key(job, i), data.images[i].permute(1, 2, 0).numpy(), int(data.labels[i]),
                                 {"source_key": data.keys[i]}) for i in spec.indices)
        started = time.perf_counter()
        sha256, size = write_shard(root, spec, samples)
        record = ShardRecord(name=spec.name, index=spec.index, start=spec.start, count=spec.count, sha256=sha256,
                             size_bytes=size, seconds=round(time.perf_counter() - started, 4), model_evals=0,
                             worker="emm")
        save_record(root, record)
        records.append(record)
    write_manifest(root, records, extra={"num_classes": len(class_names), "class_names": list(class_names),
                                         "flip_augment": data.info.flip_augment})
    return f"shards:{root}"


def training_set(config: EMMConfig, real: LabeledImages, run_dir: Path) -> tuple[str, int | None, list[int]]:
    """The spec the model trains on, the number of classes the model is conditioned on (None:
    unconditional) and the classes samples are drawn for: only those with training images, since
    a small random subset can miss a class, whose (untrained) embedding could not reproduce any
    training image and would only dilute the ratio; the dummy class is never sampled."""
    num_classes = real.info.num_classes
    if config.labels == "none":
        return real.info.spec, None, []
    if config.labels == "true" and not config.dummy:
        return real.info.spec, num_classes, sorted(set(real.labels.tolist()))
    if config.class_counts:  # the real images and labels, as a shard set of their own
        return write_labeled_shards(run_dir / "trainset", real, real.info.class_names), num_classes, \
            sorted(set(real.labels.tolist()))
    gen = torch.Generator().manual_seed(config.seed)
    if config.labels == "random":
        classes = config.random_classes or num_classes
        data = dataclasses.replace(real, labels=torch.randint(classes, (len(real),), generator=gen))
        names: list[str] = [f"random-{c}" for c in range(classes)]
        return (write_labeled_shards(run_dir / "trainset", data, names), classes,
                sorted(set(data.labels.tolist())))
    if config.labels == "unique":
        data = dataclasses.replace(real, labels=torch.arange(len(real)))
        return (write_labeled_shards(run_dir / "trainset", data, [f"image-{i}" for i in range(len(real))]),
                len(real), list(range(len(real))))
    # GM dummy images (Yoon et al. 2023 App. B.2) as one extra class after the real ones
    info = real.info
    dummy = load_dataset(f"gm?size={info.image_size}&channels={info.channels}&train={config.dummy}&seed={config.seed}")
    data = dataclasses.replace(real, images=torch.cat([real.images, dummy.images]),
                               labels=torch.cat([real.labels, torch.full((config.dummy,), num_classes)]),
                               keys=real.keys + dummy.keys)
    return (write_labeled_shards(run_dir / "trainset", data, [*info.class_names, "gm-dummy"]),
            num_classes + 1, sorted(set(real.labels.tolist())))


#: bumped when a run's result would change for the same settings (2: samples only for classes
#: that have training images), so results written by older code are recomputed, not reused
RESULT_VERSION = 4  # 3: the training budget in epochs or steps, and memorization at several snapshots;
# 4: each snapshot's per-sample replicate bits and per-class ratios


def class_subset(real: LabeledImages, counts: dict[int, int], seed: int) -> LabeledImages:
    """The first counts[c] images of each class c in a seeded permutation of `real` (Yoon et al. 2023
    Hypothesis 3's majority and minority classes), in permutation order; one line when a class has too few."""
    order = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))
    keep = []
    for cls, images in counts.items():
        members = order[real.labels[order] == cls]
        if len(members) < images:
            raise ConfigError(f"class_counts {cls}:{images}: {real.info.spec!r} has {len(members)} training images "
                              f"of class {cls}")
        keep.append(members[:images])
    return real.subset(torch.cat(keep).sort().values.numpy())


def training_steps(config: EMMConfig, num_images: int) -> int:
    """Optimizer steps of one size's run: the same epochs for every size (Gu et al. 2023 App. B), so
    a size of N images trains for ceil(epochs * N / batch) steps, or the same steps for every size."""
    if config.budget == "steps":
        return config.steps
    return max(1, math.ceil(config.epochs * num_images / config.batch_size))


def snapshot_steps(total: int, snapshots: int) -> list[int]:
    """The training steps at which memorization is measured: `snapshots` evenly spaced points ending
    at `total` (Gu et al. 2023 reports the highest ratio over its training snapshots)."""
    return sorted({max(1, math.ceil(total * k / snapshots)) for k in range(1, snapshots + 1)})


def _run_settings(config_json: dict[str, Any]) -> dict[str, Any]:
    """What one run depends on: every setting but the list of sizes (so a study with more or
    fewer sizes reuses the runs it shares with an earlier one)."""
    return {k: v for k, v in config_json.items() if k != "sizes"}


def run_point(config: EMMConfig, size: int, run_dir: str, device: str | None = None) -> dict[str, Any]:
    """Train on the size-`size` subset, sample `num_samples` images and measure their memorization
    ratio against the real training images. The result is written to RUN_DIR/result.json, and a
    re-run with the same config returns it without retraining (training itself also resumes
    from its checkpoints)."""
    from tailforge.eval.figures import save_png_atomic
    from tailforge.eval.memorization import memorization_stats, nearest_pairs_grid
    from tailforge.gen.diffusion.config import SamplingConfig
    from tailforge.gen.diffusion.samplers import balanced_labels, generate_batch
    from tailforge.gen.models.diffusion import load_diffusion_model
    from tailforge.train.config import DiffusionTrainConfig
    from tailforge.train.diffusion import train_diffusion

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    result_path = run / "result.json"
    saved = saved_result(result_path, _run_settings(config_dict(config)), "EMM run result", size=size,
                         result_version=RESULT_VERSION)
    if saved is not None:
        return saved
    device = default_device(device)
    real = load_dataset(subset_spec(config.dataset, size, config.subset_seed), "train")
    if config.class_counts:
        real = class_subset(real, parse_class_counts(config.class_counts), config.subset_seed)
    spec, model_classes, sample_classes = training_set(config, real, run)
    num_images = len(real) + (config.dummy if config.labels == "true" else 0)
    total = training_steps(config, num_images)
    train_config = DiffusionTrainConfig(dataset=spec, preset=config.preset, steps=total,
                                        batch_size=config.batch_size, lr=config.lr, seed=config.seed,
                                        class_conditional=model_classes is not None, keep_checkpoints=1)
    sampling = SamplingConfig(sampler=config.sampler, steps=config.sampling_steps)
    # per-class figures only where generated labels are the dataset's own classes
    per_class = config.labels == "true"
    snapshots, seconds = [], {"train": 0.0, "sample": 0.0, "measure": 0.0}
    for step in snapshot_steps(total, config.snapshots):
        # training to a later step resumes from the checkpoint of the earlier one (the learning
        # rate is constant after warmup), so the snapshots cost no more training than one run
        mark = time.perf_counter()
        train_diffusion(dataclasses.replace(train_config, steps=step), run / "model", device=device, progress=False)
        model = load_diffusion_model(run / "model", device)
        trained = time.perf_counter()
        images, labels = [], []
        for first in range(0, config.num_samples, 500):
            indices = list(range(first, min(first + 500, config.num_samples)))
            batch_labels = (torch.tensor(sample_classes)[balanced_labels(indices, len(sample_classes))]
                            if model_classes is not None else None)
            images.append(generate_batch(model, sampling, config.seed, indices, batch_labels))
            labels.append(batch_labels)
        images = torch.cat(images)
        sampled = time.perf_counter()
        stats, nn2 = memorization_stats(images, torch.cat(labels) if per_class else None, real, device=device)
        snapshots.append({"step": step, "epochs": round(step * config.batch_size / num_images, 2),
                          "memorization_ratio": stats["memorization_ratio"], "replicate": stats["replicate"],
                          "per_class": stats.get("per_class"), "memorization": stats})
        seconds = {"train": seconds["train"] + trained - mark, "sample": seconds["sample"] + sampled - trained,
                   "measure": seconds["measure"] + time.perf_counter() - sampled}
    save_png_atomic(nearest_pairs_grid(images, real.images, nn2), run / "nearest_pairs.png")
    final = snapshots[-1]
    result = tag_result("emm_run", {
        "config": config_dict(config), "size": size, "result_version": RESULT_VERSION,
        "sampled_classes": sample_classes, "num_train": len(real), "num_train_images": num_images,
        "dataset": real.info.spec, "train_spec": spec, "model_classes": model_classes,
        "training_steps": total, "training_epochs": round(total * config.batch_size / num_images, 2),
        "memorization_ratio": final["memorization_ratio"],
        "max_memorization_ratio": max(s["memorization_ratio"] for s in snapshots),
        "memorization": final["memorization"],
        "snapshots": [{k: v for k, v in s.items() if k != "memorization"} for s in snapshots],
        "nearest_pairs_png": "nearest_pairs.png", "device": device,
        "seconds": {k: round(v, 2) for k, v in seconds.items()}})
    write_json_atomic(result_path, result)
    return result


def run_name(size: int) -> str:
    """A run's folder under OUT/runs: nN, or nfull for the whole training split."""
    return f"n{size}" if size else "nfull"


def run_emm(config: EMMConfig, out: str | Path, *, address: str | None = None, in_process: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """Every size as a Ray task (or in this process), then EMM; writes OUT/emm.json."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    full = len(load_dataset(config.dataset, "train"))
    too_big = [n for n in config.sizes if n > full]
    if too_big:
        raise ConfigError(f"sizes {too_big} exceed the {full} training images of {config.dataset!r}")
    started = time.perf_counter()
    runs = {size: str(out / "runs" / run_name(size)) for size in config.sizes}
    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(runs), desc="EMM models", unit="model", disable=not progress)
    if in_process:
        for size, run_dir in runs.items():
            results.append(run_point(config, size, run_dir))
            bar.update(1)
    else:
        from tailforge.gen.jobs.ray import run_tasks

        for result in run_tasks(run_point, [(config, size, run_dir) for size, run_dir in runs.items()],
                                address=address):
            results.append(result)
            bar.update(1)
            bar.set_postfix(last=f"n={result['num_train']}: {result['memorization_ratio']:.3f}")
    bar.close()
    results.sort(key=lambda r: r["num_train"])
    points = [{"size": r["num_train"], "full": r["size"] == 0, "memorization_ratio": r["memorization_ratio"],
               "max_memorization_ratio": r["max_memorization_ratio"], "training_steps": r["training_steps"],
               "training_epochs": r["training_epochs"],
               "distinct_train_images_replicated": r["memorization"]["distinct_train_images_replicated"],
               "median_ratio_d1_d2": r["memorization"]["median_ratio_d1_d2"], "run": run_name(r["size"]),
               "seconds": r["seconds"]} for r in results]
    report = tag_result("emm", {
        "config": config_dict(config), "points": points,
        # Gu et al. 2023 report the highest ratio over training snapshots; the final one is kept too
        "emm": estimate_emm([p["size"] for p in points], [p["max_memorization_ratio"] for p in points], config.epsilon),
        "emm_final": estimate_emm([p["size"] for p in points], [p["memorization_ratio"] for p in points],
                                  config.epsilon),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "note": "wall_seconds counts only the runs this invocation computed; reused runs cost nothing"})
    write_json_atomic(out / "emm.json", report)
    return report


# --------------------------------------------------------------------------------------------
# `tailforge eval emm`


def parse_sizes(text: str) -> tuple[int, ...]:
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        if part == "full":
            sizes.append(0)
            continue
        try:
            sizes.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"sizes are integers or 'full', got {part!r}") from None
    return tuple(sizes)
