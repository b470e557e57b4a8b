"""Few-step multistep ODE solvers with the samplers' one signature (gen.diffusion.samplers).

    sample_x(denoiser, x, sigmas, *, labels=None, rng=None, callback=None) -> x0

Both solve the probability-flow ODE in its data-prediction form, in sigma-space (x = x0 + sigma eps)
with the log-SNR lambda = -log(sigma) as the time variable (for a VP model alpha_t / sigma_vp,t =
1 / sigma). Integrating the linear part exactly (the exponential integrator of Lu et al. 2022,
"DPM-Solver++", Sec. 4) turns every step from sigma into sigma_next into

    x_next = (sigma_next / sigma) x + (1 - sigma_next / sigma) D

with D the denoised estimate for a first-order step; that is DDIM at eta = 0 (Song et al. 2021,
Eq. 12; :func:`~tailforge.gen.diffusion.samplers.ddim_step`). The higher-order solvers below replace D by a
combination of the current and earlier denoised estimates, so each is :func:`ddim_step` on that
combination; both are deterministic (``rng`` is accepted for the common signature and not used) and
make one denoiser call per step. The last step into sigma = 0 is first order (diffusers'
``final_sigmas_type="zero"`` / ``lower_order_final``): lambda is infinite there and the step returns
the denoised estimate itself.

* :func:`sample_dpmpp_2m`: DPM-Solver++(2M), Lu et al. 2022, Algorithm 2 (the multistep
  second-order data-prediction update), as diffusers' ``DPMSolverMultistepScheduler(
  algorithm_type="dpmsolver++", solver_order=2)`` with its default midpoint solver type.
* :func:`sample_unipc`: UniPC-bh2 of order 2 (Zhao et al. 2023, "UniPC", Sec. 3, with
  B(h) = e^h - 1): the UniP-2 predictor followed, after the next denoiser call, by the UniC
  corrector, which re-uses that call (no extra evaluation), as diffusers'
  ``UniPCMultistepScheduler`` defaults. With B(h) = e^h - 1 UniP-2 equals DPM-Solver++(2M);
  what UniPC adds is the corrector.

Both run on any descending grid ending in 0: the model's own timesteps ("schedule" in the sampler
registry) or the Karras et al. 2022 Eq. 5 grid ("karras").

Low-density guidance (Sehwag et al. 2022, Algorithm 1, gen.methods.lowdensity) supports neither.
Algorithm 1 is an ancestral step: it adds Sigma_theta (the step's posterior std) times the
normalized loss gradients to the mean of a single step, and gen.methods.lowdensity folds that shift
into the one denoised estimate the step is affine in (``StepRule``). A multistep solver's step
depends on the denoised estimates of earlier steps as well, so a shift folded into one estimate
would be carried, rescaled, into the next steps' extrapolations and corrector, and the update would
no longer be Algorithm 1's; its registry entries therefore carry no ``step_rule``, and asking for
guidance with them is refused with one line naming the samplers that support it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tailforge.gen.diffusion.denoiser import Denoiser
from tailforge.gen.diffusion.samplers import Callback, Rng, _report, _sigma_batch, ddim_step


def _first_order_step(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """The exponential-integrator step of the module docstring: DDIM at eta = 0."""
    return ddim_step(x, denoised, sigma, sigma_next, None)


def _log_snr_step(sigma: float, sigma_next: float) -> float:
    """h = lambda_next - lambda, with lambda = -log(sigma): the step size in log-SNR (> 0)."""
    return math.log(sigma / sigma_next)


def dpmpp_2m_denoised(denoised: Tensor, previous: Tensor, h: float, h_previous: float) -> Tensor:
    """The denoised estimate DPM-Solver++(2M) steps with (Lu et al. 2022, Algorithm 2):

        D = (1 + 1 / (2 r)) denoised - 1 / (2 r) previous,   r = h_previous / h

    the first-order term plus half the backward difference (denoised - previous) / r, so that the
    step of the module docstring is second order in h."""
    r = h_previous / h
    return denoised + (denoised - previous) / (2 * r)


def unic_denoised(last: Tensor, new: Tensor, h: float, before: Tensor | None = None,
                  h_before: float | None = None) -> Tensor:
    """The denoised estimate the UniC-bh2 corrector re-takes the last step with (Zhao et al. 2023,
    Sec. 3.2; B(h) = e^h - 1, data prediction, as diffusers' ``multistep_uni_c_bh_update``).

    The last step went from sigma_s to sigma_t (log-SNR step h) with the estimate ``last`` at sigma_s;
    ``new`` is the denoiser's estimate at the predicted point at sigma_t. Without ``before`` (the
    last step was first order) the correction is UniC-1, rho = 1/2:

        D = last + 1/2 (new - last)

    With ``before``, the estimate one step earlier (log-SNR step ``h_before`` before sigma_s), it is
    UniC-2: r = -h_before / h, D1 = (before - last) / r and (rho_1, rho_2) solves UniC's order
    conditions (Zhao et al. 2023, Sec. 3.2: R_p(h) rho = g_p(h) / B(h)) for p = 2,
    [[1, 1], [r, 1]] rho = (b_1, b_2) with b_k = k! z phi_{k+1}(z) / B(z) at z = -h
    (phi_1(z) = (e^z - 1) / z, phi_{k+1}(z) = (phi_k(z) - 1/k!) / z, B(z) = e^z - 1):

        D = last + rho_1 D1 + rho_2 (new - last)
    """
    if before is None:
        return last + 0.5 * (new - last)
    z = -h  # data prediction integrates in -lambda (diffusers' `hh = -h if predict_x0`)
    b_z = math.expm1(z)
    phi_2 = (b_z / z - 1) / z
    phi_3 = (phi_2 - 0.5) / z
    b_1, b_2 = z * phi_2 / b_z, 2 * z * phi_3 / b_z
    r = -h_before / h
    rho_1, rho_2 = (b_1 - b_2) / (1 - r), (b_2 - r * b_1) / (1 - r)
    return last + rho_1 * (before - last) / r + rho_2 * (new - last)


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, labels: Tensor | None = None,
                    rng: Rng = None, callback: Callback = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): the first step and the last one into sigma = 0
    are first order, every other step uses :func:`dpmpp_2m_denoised` with the previous step's estimate."""
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    levels = sigmas.tolist()  # the step-size coefficients are scalars: one device sync, not one per step
    previous, h_previous = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, _sigma_batch(sigma, x), labels)
        if levels[i + 1] == 0:
            x = denoised
        else:
            h = _log_snr_step(levels[i], levels[i + 1])
            estimate = denoised if previous is None else dpmpp_2m_denoised(denoised, previous, h, h_previous)
            x = _first_order_step(x, estimate, sigma, sigma_next)
            previous, h_previous = denoised, h
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_unipc(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, labels: Tensor | None = None,
                 rng: Rng = None, callback: Callback = None) -> Tensor:
    """UniPC-bh2, order 2 (Zhao et al. 2023, Sec. 3: UniP-2 and UniC-p in turn): at each step the
    denoiser's estimate at the predicted point first corrects that point (:func:`unic_denoised`, no
    extra call), then the UniP-2 predictor (equal to :func:`dpmpp_2m_denoised` for B(h) = e^h - 1)
    takes the next step from the corrected point. Warm-up and final steps are first order, as in
    diffusers (``lower_order_final``); the estimate at the uncorrected point is the one kept, as there."""
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    levels = sigmas.tolist()
    history: list[tuple[Tensor, float]] = []  # (denoised, log-SNR step that led away from it), newest last
    x_last = x  # the point the last step started from (before its predictor), for the corrector
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, _sigma_batch(sigma, x), labels)
        if history:  # UniC: re-take the last step from x_last with the corrected estimate
            (last, h_last) = history[-1]
            before, h_before = history[-2] if len(history) > 1 else (None, None)
            corrected = unic_denoised(last, denoised, h_last, before, h_before)
            x = _first_order_step(x_last, corrected, sigmas[i - 1], sigma)
        if levels[i + 1] == 0:
            x_next = denoised
        else:
            h = _log_snr_step(levels[i], levels[i + 1])
            # UniP-2 needs one earlier estimate; the step before the final one is second order as well
            # (diffusers: order min(2, steps left), and the final step is first order anyway)
            estimate = denoised if not history else dpmpp_2m_denoised(denoised, history[-1][0], h, history[-1][1])
            x_next = _first_order_step(x, estimate, sigma, sigma_next)
            history = [*history[-1:], (denoised, h)]
        x_last, x = x, x_next
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x
