"""Few-step solvers (DPM-Solver++(2M), UniPC): every step against diffusers' schedulers on the same
model outputs, accuracy and order on a Gaussian with its exact denoiser, reconstruction with them,
and the one-line refusal of low-density guidance."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
from test_samplers import MU, STD, GaussianEps, exact_sigma_denoiser

from tailforge.gen.core.errors import ConfigError
from tailforge.gen.diffusion.config import SAMPLERS, SamplerSpec
from tailforge.gen.diffusion.denoiser import DenoiserWrapper, EpsDenoiser
from tailforge.gen.diffusion.samplers import sample_ddim, sample_euler, sampler_sigmas
from tailforge.gen.diffusion.schedules import alphas_cumprod, spaced_timesteps
from tailforge.gen.methods.lowdensity import step_rule
from tailforge.gen.methods.reconstruct import reconstruct
from tailforge.gen.models.unet import build_unet

_SOLVERS = "tailforge.gen.diffusion.solvers"
#: the registry entries of the solvers (gen/diffusion/config.py SAMPLERS): name -> (function, grid)
SOLVER_SPECS = (
    SamplerSpec("dpmpp-2m", f"{_SOLVERS}:sample_dpmpp_2m", "schedule", 1),
    SamplerSpec("dpmpp-2m-karras", f"{_SOLVERS}:sample_dpmpp_2m", "karras", 1),
    SamplerSpec("unipc", f"{_SOLVERS}:sample_unipc", "schedule", 1),
    SamplerSpec("unipc-karras", f"{_SOLVERS}:sample_unipc", "karras", 1),
)
SOLVER_NAMES = [spec.name for spec in SOLVER_SPECS]
#: the first-order sampler on the same grid, which the solvers must beat at equal steps
FIRST_ORDER = {"schedule": sample_ddim, "karras": sample_euler}


@pytest.fixture(autouse=True)
def registered_solvers(monkeypatch):
    """The solvers' entries, added to SAMPLERS where the registry does not hold them yet; where it
    does, they must be these. (Only the registry dict is patched: SamplingConfig's check reads its
    names once, so these tests do not build a SamplingConfig for them.)"""
    for spec in SOLVER_SPECS:
        if spec.name in SAMPLERS:
            assert SAMPLERS[spec.name] == spec
        else:
            monkeypatch.setitem(SAMPLERS, spec.name, spec)


class ExactGaussianDenoiser(DenoiserWrapper):
    """E[x0 | x0 + sigma n] for x0 ~ N(MU, STD^2) at any sigma (the Karras grid's sigmas are not on
    the DDPM schedule, where GaussianEps is exact), with the linear schedule's attributes."""

    def forward(self, x, sigma, labels=None):
        return exact_sigma_denoiser(x, torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0]))


@pytest.fixture(scope="module")
def exact_denoiser():
    ac = alphas_cumprod("linear")
    return ExactGaussianDenoiser(EpsDenoiser(GaussianEps(ac), ac))


class ReplayEps:
    """A denoiser that answers its k-th call with the k-th recorded epsilon, x0_hat = x - sigma eps:
    the model outputs diffusers' scheduler was given, at our own x and sigma."""

    def __init__(self, eps: list[torch.Tensor]):
        self.eps, self.sigmas = eps, []

    def __call__(self, x, sigma, labels=None):
        self.sigmas.append(float(sigma[0]))
        return x - sigma.view(-1, 1, 1, 1) * self.eps[len(self.sigmas) - 1]


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("steps", [1, 2, 10, 20])
def test_solver_trajectory_equals_diffusers(name, steps):
    spec = SAMPLERS[name]
    scheduler_class, kwargs = (
        (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2})
        if name.startswith("dpmpp") else (UniPCMultistepScheduler, {}))
    scheduler = scheduler_class(num_train_timesteps=1000, beta_schedule="linear", timestep_spacing="trailing",
                                use_karras_sigmas=spec.grid == "karras", **kwargs)
    scheduler.set_timesteps(steps)
    torch.manual_seed(0)
    unet = build_unet("tiny", image_size=8, channels=1, num_classes=10).eval()
    denoiser = EpsDenoiser(lambda x, t, labels: None, scheduler.alphas_cumprod)  # only its sigma grid is used
    sigmas = sampler_sigmas(name, denoiser, steps)
    torch.testing.assert_close(sigmas, scheduler.sigmas, rtol=1e-5, atol=0)
    if spec.grid == "schedule":
        assert denoiser.sigma_to_t(sigmas[:-1]).long().tolist() == scheduler.timesteps.tolist()

    # diffusers' loop on the VP x_t, recording the model outputs and every step's result
    labels = torch.arange(4)
    x_vp = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    sample, eps_seen, expected = x_vp, [], []
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps_seen.append(unet(sample, t.expand(4), class_labels=labels).sample)
            sample = scheduler.step(eps_seen[-1], t, sample).prev_sample
            expected.append(sample)

    # ours in sigma-space on the same outputs: x = x_vp / sqrt(alpha_bar) = x_vp * sqrt(1 + sigma^2)
    replay, ours = ReplayEps(eps_seen), []
    spec.sample_fn()(replay, x_vp * (1 + sigmas[0] ** 2).sqrt(), sigmas, labels=labels,
                     callback=lambda step: ours.append(step["x"] / (1 + step["sigma_next"] ** 2).sqrt()))
    assert replay.sigmas == pytest.approx(sigmas[:-1].tolist(), rel=1e-6)
    scale = max(float(x.abs().max()) for x in expected)  # the untrained U-Net's x0_hat reach hundreds
    for i, (a, b) in enumerate(zip(ours, expected, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6 * scale, msg=f"step {i} of {steps}")


def exact_answer(x, sigmas):
    """What a chain on `sigmas` returns for x0 ~ N(MU, STD^2) with no integration error: the
    probability-flow ODE's exact flow x = MU + sqrt(STD^2 + sigma^2) z from sigmas[0] to the last
    positive sigma, then the final step's exact denoised estimate."""
    s0, last = float(sigmas[0]), float(sigmas[-2])
    z = (x - MU) / math.sqrt(STD**2 + s0**2)
    return MU + STD**2 / math.sqrt(STD**2 + last**2) * z


def chain_factor(fn, denoiser, sigmas):
    """a of the affine map x -> MU + a (x - MU) a chain computes on the Gaussian (every step is
    linear in x for the exact denoiser, so one point measures it, in float64)."""
    x = torch.full((1, 1), MU + 1.0, dtype=torch.float64)
    return float(fn(denoiser, x, sigmas.double()) - MU)


def relative_error(fn, denoiser, sigmas):
    """|a / a_exact - 1|: the chain's integration error against :func:`exact_answer`."""
    return abs(chain_factor(fn, denoiser, sigmas) / float(exact_answer(torch.tensor(MU + 1.0), sigmas) - MU) - 1)


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("steps", [10, 20])
def test_solver_beats_the_first_order_sampler_at_equal_steps(exact_denoiser, name, steps):
    spec = SAMPLERS[name]
    sigmas = sampler_sigmas(name, exact_denoiser, steps)
    ours = relative_error(spec.sample_fn(), exact_denoiser, sigmas)
    first_order = relative_error(FIRST_ORDER[spec.grid], exact_denoiser, sigmas)
    assert ours < first_order / 2, (ours, first_order)


@pytest.mark.parametrize("name", ["dpmpp-2m-karras", "unipc-karras"])
def test_solver_is_at_least_second_order(exact_denoiser, name):
    # On the Karras grid every step shrinks with the step count (the model's own trailing grid keeps
    # a last step of fixed log-SNR ratio, so its error does not show the order). Doubling the steps
    # divides a p-th order error by about 2^p: > 3 for order >= 2 (UniPC's corrector adds one),
    # while Euler's first-order error only halves (checked too, so the test can tell them apart).
    errors = {fn: [relative_error(fn, exact_denoiser, sampler_sigmas(name, exact_denoiser, steps))
                   for steps in (20, 40)] for fn in (SAMPLERS[name].sample_fn(), sample_euler)}
    (ours_20, ours_40), (euler_20, euler_40) = errors.values()
    assert ours_20 / ours_40 > 3 and euler_20 / euler_40 < 2.5, errors


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_solver_reproduces_gaussian_moments(exact_denoiser, name):
    # Tolerances: 4 standard errors of a mean (STD / sqrt(N)) and of a standard deviation (about
    # STD / sqrt(2 N)) over N independent values, plus, for the std, the chain's own bias against
    # N(MU, STD^2), which at 50 steps is under 1 % (checked first; at 10-20 steps it is 1-5 % on
    # this Gaussian, which the tests against the exact answer above cover without sampling error).
    # The mean has no bias: every step maps x - MU linearly.
    sample = SAMPLERS[name].sample_fn()
    sigmas = sampler_sigmas(name, exact_denoiser, 50)
    exact_factor = STD / math.sqrt(STD**2 + float(sigmas[0]) ** 2)  # the ODE's flow from sigmas[0] to 0
    assert abs(chain_factor(sample, exact_denoiser, sigmas) / exact_factor - 1) < 0.01
    rng = torch.Generator().manual_seed(1)
    x = MU + math.sqrt(STD**2 + float(sigmas[0]) ** 2) * torch.randn(4000, 16, generator=rng)
    out = sample(exact_denoiser, x, sigmas)
    count = out.numel()
    assert abs(out.mean().item() - MU) < 4 * STD / math.sqrt(count)
    assert abs(out.std().item() - STD) < 4 * STD / math.sqrt(2 * count) + 0.01 * STD, out.std().item()


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_reconstruction_with_solver_is_the_exact_flow_of_the_diffused_image(exact_denoiser, name):
    # Yamaguchi & Fukuda 2023 Algorithm 1 with an ODE solver: x0 diffused to t, then the chain from t
    # back to 0; on the Gaussian its exact answer is known given the forward noise, which is the first
    # draw of the sample's generator (gen.methods.reconstruct)
    t, steps, seed = 300, 20, 3
    x0 = MU + STD * torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    out = reconstruct(exact_denoiser, x0, t, sampler=name, steps=steps, rng=torch.Generator().manual_seed(seed))
    sigmas = sampler_sigmas(name, exact_denoiser, steps, t_max=t - 1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    expected = exact_answer(x0 + sigmas[0] * noise, sigmas)
    first_order = FIRST_ORDER[SAMPLERS[name].grid](exact_denoiser, x0 + sigmas[0] * noise, sigmas)
    error, first_order_error = (float((y - expected).abs().max()) for y in (out, first_order))
    # within a tenth of the data's std for every value, and at most half the first-order sampler's error
    assert error < 0.1 * STD and error < first_order_error / 2, (error, first_order_error)
    if SAMPLERS[name].grid == "schedule":
        assert spaced_timesteps(1000, steps, t_max=t - 1)[0] == t - 1


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_solvers_count_one_evaluation_per_step_and_take_no_noise(exact_denoiser, name):
    steps, calls = 12, []

    def counting(x, sigma, labels=None):
        calls.append(1)
        return exact_denoiser(x, sigma, labels)

    sigmas = sampler_sigmas(name, exact_denoiser, steps)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    first = SAMPLERS[name].sample_fn()(counting, x, sigmas, rng=torch.Generator().manual_seed(1))
    second = SAMPLERS[name].sample_fn()(counting, x, sigmas, rng=torch.Generator().manual_seed(2))
    assert len(calls) == 2 * SAMPLERS[name].evals(steps) == 2 * steps
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_low_density_guidance_refuses_solvers_in_one_line(name):
    with pytest.raises(ConfigError) as err:
        step_rule(name, {})
    message = str(err.value)
    assert "\n" not in message and repr(name) in message and "ddpm or ddim" in message

