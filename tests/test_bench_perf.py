"""Contracts of the benchmark helpers (the benchmarks themselves are commands, not timed tests)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from tailforge.bench import load_benchmarks
from tailforge.bench.demo import run_measured
from tailforge.bench.memorization import max_distance_difference, sklearn_nearest_two
from tailforge.bench.reconstruct import within_tolerance
from tailforge.bench.sampler import interleaved_seconds, median_ratio
from tailforge.eval.memorization import nearest_two


def test_every_issue_benchmark_is_registered():
    assert {"sampler", "ray", "stream", "lowdensity-cost", "guidance", "reconstruct", "diffaug",
            "memorization", "demo"} <= set(load_benchmarks())


def test_within_tolerance_is_relative_to_t_re():
    assert within_tolerance(0.29, 0.3) and within_tolerance(0.54, 0.5) and within_tolerance(1.05, 1.0)
    assert not within_tolerance(0.34, 0.3) and not within_tolerance(0.44, 0.5)


def test_median_ratio_pairs_each_round_with_itself():
    # per-round ratios 3, 2, 2: the median is 2, where the ratio of the best-of figures is 3 / 1
    assert median_ratio([3.0, 6.0, 6.0], [1.0, 3.0, 3.0]) == 2.0
    assert median_ratio([3.0, 1.0, 10.0], [1.0, 1.0, 1.0]) == 3.0


def test_interleaved_seconds_runs_every_function_once_per_round_after_a_warm_up():
    calls = []
    seconds = interleaved_seconds([lambda: calls.append("a"), lambda: calls.append("b")], 3)
    assert calls == ["a", "b"] * 4 and [len(s) for s in seconds] == [3, 3]


def test_our_nearest_two_matches_scikit_learn_brute_force():
    gen = torch.Generator().manual_seed(0)
    reference = torch.randint(0, 256, (300, 1, 8, 8), generator=gen, dtype=torch.uint8)
    copies = reference[:10].clone()
    copies[:, 0, 0, 0] ^= 1  # near copies: one pixel off by one grey level
    queries = torch.cat([torch.randint(0, 256, (50, 1, 8, 8), generator=gen, dtype=torch.uint8), copies])
    ours = nearest_two(queries, reference)
    distances, indices = sklearn_nearest_two(queries, reference)
    assert max_distance_difference(ours, distances) < 1e-5
    assert (indices[50:, 0] == np.arange(10)).all()  # a near copy's nearest image is its source


#: a child that holds 300 MB while its own child holds another 300 MB (both pages touched)
HOLD_300MB = "import numpy as np, time; a = np.ones(300 * 2**20, np.uint8); time.sleep(1.5)"
PARENT_AND_CHILD = (f"import subprocess, sys, numpy as np; p = subprocess.Popen([sys.executable, '-c', {HOLD_300MB!r}]); "
                    "a = np.ones(300 * 2**20, np.uint8); p.wait()")


def test_run_measured_sums_the_memory_of_the_whole_process_tree(tmp_path):
    measured = run_measured([sys.executable, "-c", PARENT_AND_CHILD], tmp_path / "log", rss_interval=0.05,
                            pss_every=2)
    assert 0.55 <= measured["peak_pss_gib"] <= measured["peak_rss_sum_gib"] < 1.5
    assert measured["seconds"] >= 1.5


def test_run_measured_names_the_log_of_a_failed_command(tmp_path):
    with pytest.raises(RuntimeError, match="exited with 3.*fail.log"):
        run_measured([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "fail.log")


# --------------------------------------------------------------------------- issue 18: quality-speed,
# cheaper evaluations, the GPU benchmark (toy sizes; the figures come from the commands)


@pytest.fixture(scope="module")
def conditional_toy_model(tmp_path_factory):
    """A random-weight class-conditional tiny model (10 classes), saved and loaded like a trained one."""
    from diffusers import DDPMScheduler

    from tailforge.gen.models.diffusion import ModelMeta, load_diffusion_model, save_diffusion_model
    from tailforge.gen.models.unet import build_unet

    folder = tmp_path_factory.mktemp("toy-model")
    torch.manual_seed(0)
    save_diffusion_model(folder, build_unet("tiny", image_size=8, channels=1, num_classes=10),
                         DDPMScheduler(num_train_timesteps=1000), ModelMeta(image_size=8, channels=1, num_classes=10))
    return load_diffusion_model(folder)


def test_every_issue_18_benchmark_is_registered():
    from tailforge.bench import BENCHMARK_OPTIONS

    assert {"quality-speed", "eval-speed", "gpu"} <= set(load_benchmarks())
    assert {"quality-speed", "gpu"} <= set(BENCHMARK_OPTIONS)


def test_frechet_draws_of_all_items_is_the_fidelity_frechet_distance():
    from tailforge.bench.quality_speed import frechet_difference, frechet_draws, frechet_interval
    from tailforge.eval.fidelity import frechet_distance_features, gaussian_statistics

    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(200, 5, generator=gen), torch.randn(150, 5, generator=gen) + 0.5
    stats = gaussian_statistics(real)
    assert frechet_draws(fake.double().numpy(), stats, np.arange(150))[0] == pytest.approx(
        frechet_distance_features(fake, real), rel=1e-9)
    interval = frechet_interval(fake.double().numpy(), stats, resamples=100)
    assert interval.low < interval.high and interval.items == 150
    same = frechet_difference(fake.double().numpy(), fake.double().numpy(), stats, resamples=100)
    assert same.estimate == 0 and same.low <= 0 <= same.high  # a set is not worse than itself


def test_labelled_unet_is_called_by_diffusers_the_way_our_sampler_calls_the_unet(conditional_toy_model):
    from tailforge.bench.quality_speed import LabelledUNet

    unet = conditional_toy_model.denoiser.eps_model.unet
    wrapped = LabelledUNet(unet)
    wrapped.labels = torch.arange(4) % 10
    x, t = torch.randn(4, 1, 8, 8), torch.tensor(500)
    with torch.no_grad():
        assert torch.equal(wrapped(x, t).sample, unet(x, t, class_labels=wrapped.labels).sample)
    assert wrapped.config is unet.config and wrapped.dtype == unet.dtype


def test_quality_speed_at_toy_size_gives_intervals_a_headline_and_a_plot(conditional_toy_model, tmp_path):
    from tailforge.bench.quality_speed import plot, quality_speed
    from tailforge.gen.core.files import json_text
    from tailforge.gen.models.accelerate import AccelerationConfig
    from tailforge.gen.models.classifiers import create_classifier

    torch.manual_seed(0)
    classifier = create_classifier("tinycnn", num_classes=10, in_chans=1).eval()
    real = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    result = quality_speed(conditional_toy_model, classifier, real, num=12, batch_size=8,
                           grids={"ddpm": [2, 4], "ddim": [2]}, reference_steps=4,
                           acceleration=AccelerationConfig(), resamples=20)
    assert [(r["sampler"], r["steps"], r["evals_per_sample"]) for r in result["rows"]] == [
        ("ddpm", 2, 2), ("ddpm", 4, 4), ("ddim", 2, 2)]
    for entry in [result["reference"], *result["rows"]]:
        fd = entry["frechet_distance"]
        assert fd["low"] <= fd["high"] and fd["items"] == 12 and entry["wall_s_per_sample"] > 0
    # our DDPM-4 and the pipeline's DDPM-4 run the same algorithm on the same weights and labels
    assert result["rows"][1]["not_worse_than_pipeline"]
    assert result["headline"]["fastest_matched"]["sampler"] in ("ddpm", "ddim")
    json_text(result)  # finite, serialisable
    plot(result, tmp_path / "qs.png")
    assert (tmp_path / "qs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_accelerated_models_are_copies_with_the_same_outputs(conditional_toy_model):
    from tailforge.gen.models.accelerate import AccelerationConfig, accelerate, channels_last

    model = conditional_toy_model
    fast = channels_last(model)
    weight = fast.denoiser.eps_model.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert model.denoiser.eps_model.unet.conv_in.weight.is_contiguous()  # the original is untouched
    x, sigma, labels = torch.randn(6, 1, 8, 8) * 3, torch.full((6,), 3.0), torch.arange(6)
    with torch.no_grad():
        assert (fast.denoiser(x, sigma, labels) - model.denoiser(x, sigma, labels)).abs().max() < 1e-5
    assert accelerate(model, AccelerationConfig()).model_hash == model.model_hash
    assert AccelerationConfig(channels_last=True, compile=True, threads=1).label() == "channels_last+compile+threads=1"


def test_acceleration_config_refuses_zero_threads():
    from tailforge.gen.core.errors import ConfigError
    from tailforge.gen.models.accelerate import AccelerationConfig

    with pytest.raises(ConfigError, match="threads"):
        AccelerationConfig(threads=0)


@pytest.mark.slow
def test_compiled_unet_matches_the_eager_one(conditional_toy_model):
    from tailforge.gen.models.accelerate import compiled

    fast = compiled(conditional_toy_model)
    x, sigma, labels = torch.randn(4, 1, 8, 8), torch.full((4,), 1.0), torch.arange(4)
    with torch.no_grad():
        assert (fast.denoiser(x, sigma, labels) - conditional_toy_model.denoiser(x, sigma, labels)).abs().max() < 1e-4


def test_with_threads_restores_the_thread_count():
    from tailforge.bench.eval_speed import with_threads

    before = torch.get_num_threads()
    seen = with_threads(1, torch.get_num_threads)()
    assert seen == 1 and torch.get_num_threads() == before


def test_top_operators_are_shares_of_the_profiled_call():
    from tailforge.bench.eval_speed import top_operators

    a = torch.randn(64, 64)
    ops = top_operators(lambda: (a @ a).relu(), count=3)
    shares = [op["share"] for op in ops]
    assert 0 < len(ops) <= 3 and all(0 <= share <= 1 for share in shares) and shares == sorted(shares, reverse=True)
    assert sum(shares) <= 1 + 1e-3 and ops[0]["op"] == "aten::mm"  # the product is nearly all of it


def test_peak_table_picks_the_most_specific_name_and_the_override_wins():
    from tailforge.bench.gpu import peak_bf16_tflops

    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_bf16_tflops("NVIDIA H200") == 989.0
    assert peak_bf16_tflops("NVIDIA H200", 800.0) == 800.0
    assert peak_bf16_tflops("Some Future Part") is None


def test_bench_gpu_refuses_on_a_cpu_with_one_line(monkeypatch, tmp_path):
    from tailforge.bench import BenchmarkUnavailable, run_benchmarks

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BenchmarkUnavailable, match="needs a CUDA device") as err:
        run_benchmarks(["gpu"], quick=True, out=tmp_path)
    assert "\n" not in str(err.value)


def test_bench_all_records_unavailable_benchmarks_and_goes_on(monkeypatch, tmp_path):
    from tailforge.bench import run_benchmarks
    from tailforge.bench.quality_speed import QualitySpeedOptions

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    missing = QualitySpeedOptions(model=str(tmp_path / "no-model"))
    results = run_benchmarks(["gpu", "quality-speed"], quick=True, out=tmp_path,
                             options={"quality-speed": missing})
    assert "needs a CUDA device" in results["results"]["gpu"]["unavailable"]
    assert "no-model" in results["results"]["quality-speed"]["unavailable"]
    assert (tmp_path / "all.json").is_file()


def test_bench_set_parses_options_by_their_fields_and_names_bad_ones():
    from tailforge.bench.quality_speed import QualitySpeedOptions
    from tailforge.cli.bench import benchmark_options
    from tailforge.gen.core.errors import ConfigError

    load_benchmarks()
    options = benchmark_options(["quality-speed"], ["model=elsewhere", "num_samples=64", "compile=false"])
    assert options["quality-speed"] == QualitySpeedOptions(model="elsewhere", num_samples=64, compile=False)
    with pytest.raises(ConfigError, match="takes \\['nonsense'\\]"):
        benchmark_options(["quality-speed"], ["nonsense=1"])
    with pytest.raises(ConfigError, match="num_samples"):
        benchmark_options(["quality-speed"], ["num_samples=0"])
    with pytest.raises(ConfigError, match="FIELD=VALUE"):
        benchmark_options(["quality-speed"], ["model"])
