"""Memorization of the training set by a diffusion model (Gu et al. 2023; Yoon et al. 2023; Sehwag et al. 2022 Section 5).

Ratio criterion (Yoon et al. 2023 Section 3.1, validated in its Appendix D; adopted by Gu et al. 2023 Section 2):
a generated image W is a replicate of the training set S when

    ||W - NN1(W, S)||_2  <  1/3 * ||W - NN2(W, S)||_2

with NN1 / NN2 its nearest and second-nearest training images in L2. As in both papers' released
code it is measured in pixel space (flattened images; here floats in [-1, 1], which only scales
both distances and leaves the ratio unchanged). The memorization ratio is the fraction of
generated images that are replicates (Gu et al. 2023's R_Mem).

The criterion and its exact nearest neighbours are gen/methods/replicas.py's (shared with the memorization
gate at generation time, gen/jobs/gate.py): every generated image is compared
with every training image in chunks (on the GPU when present), and the best candidates are
re-ranked with distances recomputed in float64 from the image differences, so near-duplicates
(the case the criterion is about) are not blurred by float32 cancellation in ||a||^2 + ||b||^2 - 2ab.

Sehwag et al. 2022 Section 5's check works in a classifier's feature space instead: if generated images were
memorized, their nearest-neighbour distance to the training set would be much smaller than that of
held-out real images; and (its Fig. 9) the classes of their 5 nearest real neighbours.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tailforge.eval.config import MemorizationConfig
from tailforge.eval.figures import image_grid, save_png_atomic
from tailforge.eval.neighbors import knn
from tailforge.eval.results import tag_result
from tailforge.eval.stats import encode_bits
from tailforge.gen.core.device import default_device
from tailforge.gen.core.errors import ConfigError, DatasetError
from tailforge.gen.core.files import write_json_atomic
from tailforge.gen.data.datasets import LabeledImages, load_dataset
from tailforge.gen.methods.replicas import NearestTwo, nearest_two, ratio_criterion


def _quantiles(values: Tensor, qs=(0.05, 0.25, 0.5, 0.75, 0.95)) -> dict[str, float]:
    v = values.double()
    return {f"q{int(q * 100):02d}": float(v.quantile(q)) for q in qs} if len(v) else {}


def memorization_stats(generated: Tensor, generated_labels: Tensor | None, train: LabeledImages, *,
                       pairs: int = 24, device: str | None = None) -> tuple[dict[str, Any], NearestTwo]:
    """Ratio criterion of every generated image against the training images: the memorization
    ratio, the number of distinct training images replicated (Yoon et al. 2023 Fig. 5b), per-class ratios
    (Yoon et al. 2023 Section 3.3), the distribution of d1/d2, and the closest pairs."""
    nn2 = nearest_two(generated, train.images, device=device)
    ratio = nn2.ratio
    replicate = ratio_criterion(nn2.d1, nn2.d2)
    replicated_train = torch.unique(nn2.i1[replicate])
    nearest_label = train.labels[nn2.i1]
    counts, edges = np.histogram(ratio.clamp(max=1.0).numpy(), bins=20, range=(0.0, 1.0))
    stats: dict[str, Any] = {
        "criterion": "d1 < d2 / 3, L2 in pixel space (Yoon et al. 2023 Sec. 3.1)",
        "num_generated": int(len(generated)),
        "num_train": int(len(train)),
        "memorization_ratio": float(replicate.double().mean()),
        "replicates": int(replicate.sum()),
        "distinct_train_images_replicated": int(len(replicated_train)),
        "fraction_train_replicated": float(len(replicated_train) / len(train)),
        "ratio_d1_d2": _quantiles(ratio),
        "median_ratio_d1_d2": float(ratio.double().median()),
        "d1": {"mean": float(nn2.d1.mean()), **_quantiles(nn2.d1)},
        "ratio_histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        "replicate": encode_bits(replicate),  # per generated image, in order: the ratio criterion holds
    }
    if generated_labels is not None:
        stats["nearest_train_same_class"] = float((nearest_label == generated_labels).double().mean())
        per_class = []
        for c in range(train.info.num_classes):
            members = generated_labels == c
            if not members.any():
                continue
            rep = replicate[members]
            per_class.append({
                "class": c, "name": train.info.class_names[c], "generated": int(members.sum()),
                "train_images": int((train.labels == c).sum()),
                "memorization_ratio": float(rep.double().mean()),
                "distinct_train_images_replicated": int(len(torch.unique(nn2.i1[members][rep]))),
            })
        stats["per_class"] = per_class
        # samples requested for a class the training set lacks cannot be copies of that class
        present = torch.zeros(train.info.num_classes, dtype=torch.bool)
        present[train.labels] = True
        stats["generated_for_classes_without_training_images"] = int((~present[generated_labels]).sum())
    order = nn2.d1.argsort()[:pairs]
    stats["closest_pairs"] = [{"generated": int(i), "train_key": train.keys[int(nn2.i1[i])], "d1": float(nn2.d1[i]),
                               "d2": float(nn2.d2[i]), "ratio": float(ratio[i])} for i in order]
    return stats, nn2


def nearest_pairs_grid(generated: Tensor, train: Tensor, nn2: NearestTwo, count: int = 24):
    """Image grid of the `count` generated images closest to the training set: each generated
    image (top of a pair) above its nearest training image (Yoon et al. 2023 Fig. 3; Sehwag et al. 2022 Fig. 8)."""
    order = nn2.d1.argsort()[:count]
    ncols = min(12, len(order))
    tiles = []
    for start in range(0, len(order), ncols):
        block = order[start:start + ncols]
        tiles += [generated[block], train[nn2.i1[block]]]
        if len(block) < ncols:  # pad the last row pair so pairs stay aligned in columns
            pad = torch.full((ncols - len(block), *generated.shape[1:]), 255, dtype=torch.uint8)
            tiles[-2], tiles[-1] = torch.cat([tiles[-2], pad]), torch.cat([tiles[-1], pad])
    return image_grid(torch.cat(tiles), ncols)


def feature_nn_distances(classifier: torch.nn.Module, generated: Tensor, generated_labels: Tensor | None,
                         train: LabeledImages, heldout: LabeledImages, k: int = 5) -> dict[str, Any]:
    """Sehwag et al. 2022 Section 5: nearest-neighbour distance to the training set in the classifier's
    embedding space, for generated images and for held-out real images. Memorized samples would
    sit much closer to the training set than held-out real data does. Also (its Fig. 9) how many
    of each generated image's `k` nearest training images share its class."""
    from tailforge.gen.models.classifiers import embed

    train_f = embed(classifier, train.images)
    generated_nn = knn(embed(classifier, generated), train_f, k)
    gen_d, gen_i = generated_nn.distances.numpy(), generated_nn.indices.numpy()
    held_d = knn(embed(classifier, heldout.images), train_f, k).distances.numpy()
    out = {
        "space": "classifier embedding (forward_head pre_logits), L2",
        "generated_nn_distance": {"mean": float(gen_d[:, 0].mean()), "median": float(np.median(gen_d[:, 0]))},
        "heldout_nn_distance": {"mean": float(held_d[:, 0].mean()), "median": float(np.median(held_d[:, 0]))},
        "num_heldout": int(len(heldout)),
    }
    out["generated_over_heldout_mean"] = out["generated_nn_distance"]["mean"] / max(out["heldout_nn_distance"]["mean"], 1e-12)
    if generated_labels is not None:
        same = (train.labels.numpy()[gen_i] == generated_labels.numpy()[:, None]).mean(1)
        out[f"knn{k}_same_class_fraction"] = float(same.mean())
    return out


def evaluate_memorization(samples: LabeledImages, train: LabeledImages, out: str | Path, *,
                          classifier: torch.nn.Module | None = None, heldout: LabeledImages | None = None,
                          pairs: int = 24, config: dict[str, Any] | None = None,
                          device: str | None = None) -> dict[str, Any]:
    """Measure `samples` against `train`, write OUT/memorization.json and OUT/nearest_pairs.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if samples.images.shape[1:] != train.images.shape[1:]:
        raise ConfigError(f"generated images are {tuple(samples.images.shape[1:])}, training images "
                          f"{tuple(train.images.shape[1:])}: compare against the dataset the model was trained on")
    started = time.perf_counter()
    labels = samples.labels if samples.info.num_classes == train.info.num_classes else None
    stats, nn2 = memorization_stats(samples.images, labels, train, pairs=pairs, device=device)
    for pair in stats["closest_pairs"]:
        pair["generated_key"] = samples.keys[pair.pop("generated")]
    report = tag_result("memorization", {"config": config or {}, **stats})
    if classifier is not None and heldout is not None:
        report["feature_space"] = feature_nn_distances(classifier, samples.images, labels, train, heldout)
    elif classifier is not None:
        report["feature_space"] = {"absent": "the dataset has no held-out (test) split to compare with"}
    report["seconds"] = round(time.perf_counter() - started, 3)
    save_png_atomic(nearest_pairs_grid(samples.images, train.images, nn2, pairs), out / "nearest_pairs.png")
    report["nearest_pairs_png"] = "nearest_pairs.png"
    write_json_atomic(out / "memorization.json", report)
    return report


# --------------------------------------------------------------------------------------------
# `tailforge eval memorization`


def _generate_shards(config: MemorizationConfig, root: Path, *, actors: int | None, address: str | None,
                     progress: bool) -> Path:
    """Run a baseline generation job with the model into `root` (resumable, on the actor pool)."""
    from tailforge.gen.diffusion.config import SamplingConfig
    from tailforge.gen.jobs.config import BaselineConfig
    from tailforge.gen.jobs.runner import run_generation

    job = BaselineConfig(model=config.model, num=config.num, seed=config.seed, job="memorization",
                         sampling=SamplingConfig(sampler=config.sampler, steps=config.steps))
    run_generation(root, job, actors=actors, address=address, progress=progress)
    return root


def run_memorization(config: MemorizationConfig, out: str | Path, *, device: str | None = None,
                     actors: int | None = None, address: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Generate (with a model) or read the samples, measure them, write OUT/memorization.json."""
    from tailforge.gen.core.files import config_dict

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = Path(config.shards) if config.shards else _generate_shards(config, out / "samples", actors=actors,
                                                                         address=address, progress=progress)
    samples = load_dataset(f"shards:{shards}", "train")
    # the data the model was trained on: the training split (all images of a folder with no split)
    train = load_dataset(config.dataset, "train")
    classifier, heldout = None, None
    if config.classifier:
        from tailforge.gen.models.classifiers import load_classifier

        classifier, _ = load_classifier(config.classifier, device or default_device())
        try:
            heldout = load_dataset(config.dataset, "test")
        except DatasetError:
            heldout = None
    return evaluate_memorization(samples, train, out, classifier=classifier, heldout=heldout, pairs=config.pairs,
                                 config={**config_dict(config), "samples": str(shards)}, device=device)
