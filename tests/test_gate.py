"""The memorization gate at generation time (gen/jobs/gate.py): every kept sample's d1/d2 against
the training set, checked against scikit-learn's brute-force neighbours on the published PNGs;
complete shards; the same bytes whatever the batch size or actor count; the dropped counts in the
records and the manifest; gate off unchanged; and its refusals."""

from __future__ import annotations

import functools
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.neighbors import NearestNeighbors
from torch import nn

from tailforge.gen.core.errors import ConfigError
from tailforge.gen.core.files import config_dict
from tailforge.gen.core.images import uint8_to_float
from tailforge.gen.data.datasets import load_dataset
from tailforge.gen.data.shards.format import plan_shards
from tailforge.gen.data.shards.write import load_records
from tailforge.gen.diffusion.config import SamplingConfig
from tailforge.gen.diffusion.samplers import balanced_labels, generate_batch
from tailforge.gen.diffusion.schedules import sigmas_from_alphas_cumprod
from tailforge.gen.jobs import sources
from tailforge.gen.jobs.config import BaselineConfig
from tailforge.gen.jobs.gate import MAX_CANDIDATES_PER_SAMPLE, candidate_stride, replica_gate
from tailforge.gen.jobs.runner import run_config_job, run_job
from tailforge.gen.jobs.sources import BaselineSource
from tailforge.gen.models.diffusion import DiffusionModel, ModelMeta, load_diffusion_model

TRAIN = "digits?n=100"  # the training set the memorizing model copies (10 images a class, about)
NUM, SHARD = 50, 20
SAMPLING = SamplingConfig(sampler="ddim", steps=12)
UNET_NUM, UNET_SAMPLING = 24, SamplingConfig(sampler="ddim", steps=4)  # for the (slower) random-weight U-Net


class EmpiricalDenoiser(nn.Module):
    """The exact denoiser of the empirical distribution of `images` (per class): E[x0 | x, sigma]
    for x0 drawn uniformly from the images of the requested class. This is the optimum a diffusion
    model trained on those images approaches, and it can only reproduce them (Gu et al. 2023,
    Section 2): a model that has memorized exactly `images`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        super().__init__()
        self.memory = uint8_to_float(images).flatten(1).double()
        self.labels = labels
        train_sigmas = sigmas_from_alphas_cumprod(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000).double(), 0))
        self.register_buffer("train_sigmas", train_sigmas.float(), persistent=False)
        self.sigma_min, self.sigma_max = float(train_sigmas[0]), float(train_sigmas[-1])

    def forward(self, x, sigma, labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(len(x)).view(-1, 1)
        logits = -torch.cdist(x.flatten(1).double(), self.memory).square() / (2 * sigma.square())
        logits = logits.masked_fill(labels.view(-1, 1) != self.labels.view(1, -1), float("-inf"))
        return (logits.softmax(1) @ self.memory).view_as(x).to(x.dtype)


def memorizing_model(novel: int) -> DiffusionModel:
    """A model that has memorized the TRAIN images and `novel` test images: a sample copies either,
    so it is a replica of TRAIN about as often as TRAIN holds the images of its class."""
    train, test = load_dataset(TRAIN), load_dataset("digits", "test")
    images, labels = torch.cat([train.images, test.images[:novel]]), torch.cat([train.labels, test.labels[:novel]])
    meta = ModelMeta(image_size=8, channels=1, num_classes=10, class_names=tuple("0123456789"), dataset=TRAIN)
    return DiffusionModel(denoiser=EmpiricalDenoiser(images, labels), meta=meta, model_hash="empirical",
                          path=f"<memorized {TRAIN} + {novel} test images>")


def run_baseline(out, model_dir="memorizing", *, actors=0, batch_size=8, num=NUM, sampling=SAMPLING, **gate):
    config = BaselineConfig(model=str(model_dir), num=num, sampling=sampling, seed=5, shard_size=SHARD,
                            batch_size=batch_size, **gate)
    specs = plan_shards(config.job, config.num, config.shard_size, config.seed)
    return run_job(out, config_dict(config), specs, functools.partial(BaselineSource, config), actors=actors,
                   progress=False)


def read_samples(out, records):
    """Every published sample, in order: (key, uint8 HxW image, label, json)."""
    samples = []
    for record in records:
        with tarfile.open(out / record.name) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in sorted({name.rsplit(".", 1)[0] for name in members}):
            image = np.asarray(Image.open(io.BytesIO(members[f"{key}.png"])))
            samples.append((key, image, int(members[f"{key}.cls"]), json.loads(members[f"{key}.json"])))
    return samples


def sklearn_ratios(images: np.ndarray) -> np.ndarray:
    """d1 / d2 of each image against TRAIN by scikit-learn's brute-force search, pixels in [-1, 1]."""
    reference = uint8_to_float(load_dataset(TRAIN).images).flatten(1).double().numpy()
    queries = uint8_to_float(torch.from_numpy(images)).flatten(1).double().numpy()
    distances, _ = NearestNeighbors(n_neighbors=2, algorithm="brute").fit(reference).kneighbors(queries)
    return distances[:, 0] / distances[:, 1]


def tar_bytes(out, records):
    return [(out / r.name).read_bytes() for r in records]


def use_model(monkeypatch, model: DiffusionModel) -> None:
    """Sources load `model` whatever their model path (in this process only)."""
    monkeypatch.setattr(sources, "load_diffusion_model", lambda path, device=None: model)


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory):
    """The memorizing model's job without the gate, and with it at 1/3 at batch sizes 8 and 3."""
    out = tmp_path_factory.mktemp("gate")
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_model(monkeypatch, memorizing_model(novel=100))
        runs = (run_baseline(out / "ungated"), run_baseline(out / "gated", max_nn_ratio=1 / 3),
                run_baseline(out / "batch3", max_nn_ratio=1 / 3, batch_size=3))
    return out, *runs


def test_gate_keeps_no_replica_and_fills_every_shard(gated_run):
    out, _, gated, _ = gated_run
    samples = read_samples(out / "gated", gated)
    assert [r.count for r in gated] == [20, 20, 10]
    assert [key for key, *_ in samples] == [f"baseline-{i:09d}" for i in range(NUM)]
    assert [label for _, _, label, _ in samples] == [i % 10 for i in range(NUM)]  # the planned labels
    ratios = sklearn_ratios(np.stack([image[None] for _, image, _, _ in samples]))
    assert (ratios >= 1 / 3).all()
    assert np.allclose([meta["nn_ratio"] for *_, meta in samples], ratios, atol=1e-6)
    noise = [meta["noise_index"] for *_, meta in samples]
    stride = candidate_stride(NUM, 10)
    assert len(set(noise)) == NUM and all(n % stride == i for i, n in enumerate(noise))
    train_keys = set(load_dataset(TRAIN).keys)
    assert all(meta["nn_train_key"] in train_keys for *_, meta in samples)


def test_gate_replaces_exactly_the_replicas_and_counts_them(gated_run):
    out, ungated, gated, _ = gated_run
    plain, kept = read_samples(out / "ungated", ungated), read_samples(out / "gated", gated)
    replica = sklearn_ratios(np.stack([image[None] for _, image, _, _ in plain])) < 1 / 3
    assert 0 < replica.sum() < NUM  # the memorizing model copies some of its training images, not all
    refilled = np.array([meta["noise_index"] != meta["index"] for *_, meta in kept])
    assert (refilled == replica).all()  # a slot's first candidate is the ungated sample
    for (key, image, label, _), (key2, image2, label2, _), copy in zip(plain, kept, replica):
        assert key == key2 and label == label2 and (copy or (image == image2).all())
    records = load_records(out / "gated")
    dropped = [records[i].replicas_dropped for i in sorted(records)]
    assert all(d >= replica[i * SHARD:(i + 1) * SHARD].sum() for i, d in enumerate(dropped))
    manifest = json.loads((out / "gated" / "_info.json").read_text())
    assert manifest["memorization_gate"] == {"replicas_dropped": sum(dropped), "replicas_dropped_per_shard": dropped}
    assert manifest["splits"]["train"]["num_samples"] == NUM
    assert [r.model_evals for r in gated] == [(r.count + d) * SAMPLING.steps for r, d in zip(gated, dropped)]


def test_gated_shards_are_the_same_bytes_at_any_batch_size(gated_run):
    out, _, gated, batch3 = gated_run
    assert tar_bytes(out / "batch3", batch3) == tar_bytes(out / "gated", gated)


def test_gate_off_is_the_plain_job(tiny_model_dir, tmp_path):
    """No gate: the samples generate_batch makes for each index, no gate fields, no counts. A gate
    at 0 drops nothing: the same images, labels and json plus the ratio fields."""
    unet = {"num": UNET_NUM, "sampling": UNET_SAMPLING}
    records = run_baseline(tmp_path / "off", tiny_model_dir, **unet)
    samples = read_samples(tmp_path / "off", records)
    model = load_diffusion_model(tiny_model_dir)
    expected = generate_batch(model, UNET_SAMPLING, 5, list(range(UNET_NUM)), balanced_labels(range(UNET_NUM), 10))
    assert all((image == expected[i, 0].numpy()).all() for i, (_, image, _, _) in enumerate(samples))
    assert not any({"nn_ratio", "noise_index", "nn_train_key"} & meta.keys() for *_, meta in samples)
    assert all(r.replicas_dropped is None for r in records)
    assert "memorization_gate" not in json.loads((tmp_path / "off" / "_info.json").read_text())

    at_zero = run_baseline(tmp_path / "zero", tiny_model_dir, max_nn_ratio=0.0, train_dataset=TRAIN, **unet)
    gated = read_samples(tmp_path / "zero", at_zero)
    for (key, image, label, meta), (key2, image2, label2, meta2) in zip(samples, gated):
        assert key == key2 and label == label2 and (image == image2).all()
        assert meta2 == {**meta, "noise_index": meta["index"], "nn_ratio": meta2["nn_ratio"],
                         "nn_train_key": meta2["nn_train_key"]}
    assert [r.replicas_dropped for r in at_zero] == [0, 0]


def test_a_model_that_only_copies_cannot_fill_a_shard(monkeypatch, tmp_path):
    use_model(monkeypatch, memorizing_model(novel=0))
    with pytest.raises(ConfigError, match=rf"shard baseline-000000\.tar: \d+ of its 20 samples are still replicas .* "
                                          rf"after {20 * MAX_CANDIDATES_PER_SAMPLE} candidates"):
        run_baseline(tmp_path / "copies", max_nn_ratio=1 / 3)
    assert not list((tmp_path / "copies").glob("*.tar"))  # nothing of it was published


def test_the_training_set_is_the_models_unless_named(tiny_model_dir, tmp_path):
    model = load_diffusion_model(tiny_model_dir)  # its meta records "digits"
    assert len(replica_gate(0.3, None, model, NUM).train) == len(load_dataset("digits"))
    assert len(replica_gate(0.3, TRAIN, model, NUM).train) == 100
    assert replica_gate(None, None, model, NUM) is None
    unknown = DiffusionModel(model.denoiser, ModelMeta(image_size=8, channels=1, num_classes=10,
                                                       dataset=f"diffusers:{tiny_model_dir}"), "x", str(tiny_model_dir))
    with pytest.raises(ConfigError, match="does not record the dataset it was trained on.*--train-dataset"):
        replica_gate(0.3, None, unknown, NUM)
    with pytest.raises(ConfigError, match=r"training set 'mondrian\?size=16' has 1x16px images but the model .* 1x8px"):
        replica_gate(0.3, "mondrian?size=16", model, NUM)
    bad = BaselineConfig(model=str(tiny_model_dir), num=4, max_nn_ratio=0.3, train_dataset="nosuch")
    with pytest.raises(ConfigError, match="training set .*'nosuch'.* cannot be loaded"):
        run_config_job(tmp_path / "bad", bad, BaselineSource, bad.num, actors=0, progress=False)
    assert not (tmp_path / "bad").exists()  # refused before the job folder was made


def test_gate_threshold_is_a_ratio(tiny_model_dir):
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="max_nn_ratio"):
            BaselineConfig(model=str(tiny_model_dir), num=4, max_nn_ratio=bad)


def test_actor_pool_writes_the_same_gated_bytes(ray_session, tiny_model_dir, tmp_path):
    """A gate at 0.985 drops some of the random-weight model's samples (their ratios lie in 0.95-1)."""
    gate = {"max_nn_ratio": 0.985, "train_dataset": TRAIN, "num": UNET_NUM, "sampling": UNET_SAMPLING}
    pooled = run_baseline(tmp_path / "pool", tiny_model_dir, actors=2, **gate)
    local = run_baseline(tmp_path / "local", tiny_model_dir, actors=0, batch_size=3, **gate)
    assert sum(r.replicas_dropped for r in pooled) > 0
    assert tar_bytes(tmp_path / "pool", pooled) == tar_bytes(tmp_path / "local", local)
