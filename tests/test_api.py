"""The public Python API (tailforge.__all__): lazy import, and each function against the code path the
CLI and trainer run or an exact answer."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from scipy import stats as scipy_stats
from sklearn.metrics import accuracy_score
from torch import nn

import tailforge
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.core.images import uint8_to_float
from tailforge.gen.data.datasets import load_dataset
from tailforge.gen.data.shards.read import iter_samples
from tailforge.gen.methods.diffaug import DiffAugConfig, DiffAugEnsemble, augment_batch, load_denoiser
from tailforge.gen.models.diffusion import ModelMeta, save_diffusion_model
from tailforge.gen.models.unet import build_unet

FAST = {"steps": 3}  # sampler steps: enough for shapes and equalities, seconds on the CPU


def test_import_is_lazy_and_help_lists_the_api():
    code = ("import sys, pydoc, tailforge\n"
            "assert not {'torch', 'ray', 'diffusers'} & set(sys.modules), sorted(sys.modules)\n"
            "assert set(tailforge.__all__) <= set(dir(tailforge))\n"
            "print(pydoc.render_doc(tailforge, renderer=pydoc.plaintext))\n")
    text = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in tailforge.__all__:
        assert f"class {name}" in text or f"\n    {name}(" in text, name


def test_every_public_name_resolves_and_unknown_names_fail():
    for name in tailforge.__all__:
        assert getattr(tailforge, name).__doc__, name
    with pytest.raises(AttributeError):
        tailforge.no_such_name  # noqa: B018


@pytest.fixture(scope="module")
def unconditional_model_dir(tmp_path_factory):
    """An untrained unconditional 8x8 model folder (DiffAug-Ensemble needs one)."""
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("uncond_model")
    save_diffusion_model(folder, build_unet("tiny", image_size=8, channels=1, num_classes=None),
                         DDPMScheduler(num_train_timesteps=1000), ModelMeta(image_size=8, channels=1, num_classes=None))
    return folder


@pytest.fixture(scope="module")
def baseline_set(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("api_baseline")
    config = tailforge.BaselineConfig(model=str(tiny_model_dir), num=10, shard_size=4, batch_size=5,
                                      sampling=tailforge.SamplingConfig(**FAST))
    return out, tailforge.generate(config, out)


def test_sample_equals_the_baseline_job_and_ignores_batching(tiny_model_dir, baseline_set):
    out, result = baseline_set
    assert result.samples == 10 and [r.count for r in result.records] == [4, 4, 2]
    stored = sorted(iter_samples(out), key=lambda s: s["meta"]["index"])
    model = tailforge.load_diffusion_model(tiny_model_dir)
    images = tailforge.sample(model, 10, batch_size=3, **FAST)
    assert images.dtype == torch.uint8 and images.shape == (10, 1, 8, 8)
    assert torch.equal(images, torch.from_numpy(np.stack([s["image"] for s in stored])))
    assert [s["label"] for s in stored] == [i % 10 for i in range(10)]
    by_labels = tailforge.sample(str(tiny_model_dir), labels=[i % 10 for i in range(10)], **FAST)
    assert torch.equal(by_labels, images)


def test_sample_refuses_bad_requests(tiny_model_dir, unconditional_model_dir):
    model = tailforge.load_diffusion_model(tiny_model_dir)
    with pytest.raises(ConfigError, match="n >= 1"):
        tailforge.sample(model)
    with pytest.raises(ConfigError, match=r"labels must lie in \[0, 10\)"):
        tailforge.sample(model, labels=[3, 10])
    with pytest.raises(ConfigError, match="not both"):
        tailforge.sample(model, 2, sampling=tailforge.SamplingConfig(), steps=2)
    with pytest.raises(ConfigError, match="unconditional"):
        tailforge.sample(unconditional_model_dir, labels=[0])


def test_generate_reconstructs_at_t_re_zero_as_the_real_images(tiny_model_dir, tmp_path):
    config = tailforge.ReconstructConfig(model=str(tiny_model_dir), dataset="digits?n=12", t_re=0.0, shard_size=5)
    result = tailforge.generate(config, tmp_path / "t_re_0")
    real = load_dataset("digits?n=12", "train")
    stored = sorted(iter_samples(tmp_path / "t_re_0"), key=lambda s: s["meta"]["index"])
    assert result.samples == len(real) == len(stored)
    assert torch.equal(torch.from_numpy(np.stack([s["image"] for s in stored])), real.images)
    with pytest.raises(ConfigError, match="BaselineConfig"):
        tailforge.generate(tailforge.SamplingConfig(), tmp_path / "x")


def test_diffaug_module_matches_the_trainers_stage_in_both_value_ranges(unconditional_model_dir):
    images = uint8_to_float(load_dataset("digits?n=16", "train").images[:8])
    labels = torch.zeros(8, dtype=torch.long)
    config = DiffAugConfig(model=str(unconditional_model_dir), seed=5)
    denoiser, model = load_denoiser(config, "cpu")
    expected = [augment_batch(denoiser, model, config, images, labels, batch_index=k, batch_seed=0) for k in (0, 1)]
    module = tailforge.DiffAug(unconditional_model_dir, seed=5)
    first, second = module(images), module(images)  # calls count batches 0, 1, like the trainer's steps
    torch.testing.assert_close(first, expected[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(second, expected[1], atol=1e-4, rtol=0)
    assert not torch.equal(first, second)
    unit = tailforge.DiffAug(unconditional_model_dir, seed=5, value_range=(0, 1))
    torch.testing.assert_close(unit((images + 1) / 2, batch_index=1), (expected[1] + 1) / 2, atol=1e-4, rtol=0)


def test_diffaug_module_says_in_one_line_what_is_wrong(tiny_model_dir, unconditional_model_dir):
    module = tailforge.DiffAug(unconditional_model_dir, value_range=(0, 1))
    good = torch.rand(2, 1, 8, 8)
    cases = {"range": (good * 2 - 1, r"expects values in \[0, 1\].*value_range=\(-1\.0, 1\.0\)"),
             "channels": (torch.rand(2, 3, 8, 8), r"shape \[N, 1, 8, 8\].*got \[2, 3, 8, 8\]"),
             "rank": (torch.rand(1, 8, 8), r"got \[1, 8, 8\]"),
             "dtype": ((good * 255).to(torch.uint8), "float image tensors, got torch.uint8")}
    for name, (images, pattern) in cases.items():
        with pytest.raises(ConfigError, match=pattern) as err:
            module(images)
        assert "\n" not in str(err.value), name
    with pytest.raises(ConfigError, match="value_range"):
        tailforge.DiffAug(unconditional_model_dir, value_range=(0, 255))
    with pytest.raises(ConfigError, match="pass the batch's labels"):
        tailforge.DiffAug(tiny_model_dir)(good)
    conditional = tailforge.DiffAug(tiny_model_dir, value_range=(0, 1))(good, torch.tensor([1, 2]))
    assert conditional.shape == good.shape and 0 <= conditional.min() and conditional.max() <= 1


def test_diffaug_ensemble_converts_the_classifiers_value_range(unconditional_model_dir):
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # takes [-1, 1] images
    images = uint8_to_float(load_dataset("digits?n=16", "train").images[:6])
    model = tailforge.load_diffusion_model(unconditional_model_dir)
    reference = DiffAugEnsemble(classifier, model.denoiser, times=(0, 100, 300), seed=3).eval()(images)

    class UnitRange(nn.Module):  # the same classifier for a user whose images are in [0, 1]
        def __init__(self):
            super().__init__()
            self.inner = classifier

        def forward(self, x):
            return self.inner(x * 2 - 1)

    ensemble = tailforge.diffaug_ensemble(UnitRange(), model, value_range=(0, 1), times=(0, 100, 300), seed=3)
    log_probs = ensemble((images + 1) / 2)
    torch.testing.assert_close(log_probs, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(log_probs.exp().sum(1), torch.ones(6))
    with pytest.raises(ConfigError, match=r"expects values in \[0, 1\]"):
        ensemble(images)


def test_open_shards_exact_epochs_cover_every_sample_once_per_rank_split(tiny_model_dir, baseline_set, tmp_path):
    real_out, _ = baseline_set
    config = tailforge.BaselineConfig(model=str(tiny_model_dir), num=6, shard_size=3, seed=9, job="synthetic",
                                      sampling=tailforge.SamplingConfig(**FAST))
    tailforge.generate(config, tmp_path / "synthetic")
    sources = {str(real_out): 1.0, str(tmp_path / "synthetic"): 1.0}
    expected = sorted(s["key"] for root in sources for s in iter_samples(root))
    ranks = [tailforge.open_shards(sources, batch_size=4, resample=False, epochs=2, rank=r, world_size=2)
             for r in range(2)]
    for epoch in range(2):
        keys = []
        for stream in ranks:
            for batch in stream.at(epoch, epoch + 1):
                assert batch["images"].dtype == torch.uint8 and batch["images"].shape[1:] == (1, 8, 8)
                assert all(k.startswith(("baseline", "synthetic")[int(s)]) for k, s in
                           zip(batch["keys"], batch["source"]))
                keys += batch["keys"]
        assert sorted(keys) == expected  # 16 samples: 8 per rank, no padding, none twice
    resampled = tailforge.open_shards(sources, batch_size=4, epochs=3)
    assert len(resampled) == 3 * math.ceil(16 / 4)
    with pytest.raises(ConfigError, match="both rank and world_size"):
        tailforge.open_shards(sources, batch_size=4, rank=0)


def test_evaluate_accuracy_matches_scikit_learn_and_the_exact_binomial_interval():
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    data = load_dataset("digits?n=200", "train")
    result = tailforge.evaluate_accuracy(classifier, data.images, data.labels)
    predicted = classifier(uint8_to_float(data.images)).argmax(1)
    hits = int((predicted == data.labels).sum())
    ci = scipy_stats.binomtest(hits, len(data)).proportion_ci(method="exact")
    assert result.items == len(data)
    assert result.top1.estimate == pytest.approx(accuracy_score(data.labels, predicted))
    assert (result.top1.low, result.top1.high) == pytest.approx((ci.low, ci.high))
    assert len(result.per_class) == 10 and 0 <= result.ece <= 1


def test_evaluate_entropy_of_uniform_predictions_is_log_classes():
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    nn.init.zeros_(classifier[1].weight)
    nn.init.zeros_(classifier[1].bias)
    result = tailforge.evaluate_entropy(classifier, torch.zeros(5, 1, 8, 8), [0, 1, 1, 2, 2])
    assert result.mean_entropy == pytest.approx(math.log(4)) == pytest.approx(result.max_entropy)
    assert result.per_class[3] is None and result.items == 5


def test_evaluate_memorization_counts_copies_and_not_novel_images():
    train = load_dataset("digits?n=100", "train").images
    copies = train[[0, 5, 5, 9]]
    novel = torch.full((3, 1, 8, 8), 128, dtype=torch.uint8)  # flat grey: far from every digit
    result = tailforge.evaluate_memorization(torch.cat([copies, novel]), train)
    assert (result.replicates, result.distinct_train_images_replicated, result.items) == (4, 3, 7)
    assert result.ratio.estimate == pytest.approx(4 / 7) and result.ratio.low < 4 / 7 < result.ratio.high
    assert torch.all(result.d1_over_d2[:4] == 0) and torch.all(result.d1_over_d2[4:] > 1 / 3)
