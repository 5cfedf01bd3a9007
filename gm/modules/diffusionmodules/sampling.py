"""Samplers (after k-diffusion, with sgm's classes and configs). The loop runs on the host over a
batch-uniform sigma schedule of python floats; each step calls the (graph-compiled) denoiser
`denoiser(x, sigma, cond) -> D(x, sigma)` with x a Tensor [B, ...] and sigma a float32 Tensor [B].

Each sampler's `steps` generator reads like its algorithm and yields (x, denoised) per step; the
shared `__call__` adds the noise scaling, progress bar and `on_step` callback around it.
"""
import math

import numpy as np

from mindspore import Tensor
from tqdm import tqdm

from gm.util import default, instantiate_from_config

from .sampling_utils import get_ancestral_step, linear_multistep_coeff, randn_like_fn, to_d, to_neg_log_sigma, to_sigma

DEFAULT_GUIDER = {"target": "gm.modules.diffusionmodules.guiders.IdentityGuider"}


class BaseDiffusionSampler:
    def __init__(self, discretization_config, num_steps=None, guider_config=None, verbose=False):
        self.num_steps = num_steps
        self.discretization = instantiate_from_config(discretization_config)
        self.guider = instantiate_from_config(default(guider_config, DEFAULT_GUIDER))
        self.verbose = verbose

    def __call__(self, denoiser, x, cond, uc=None, num_steps=None, noise_fn=None, on_step=None):
        """Sample from unit-variance noise `x` (a Tensor [B, ...]).

        cond / uc: conditioning dicts for the denoiser (uc defaults to cond); noise_fn(x) -> N(0, I) like x
        for the stochastic samplers (default: unseeded numpy, see `randn_like_fn(seed)`); on_step(info)
        is called after each step with info = {i, num_steps, sigma, x, denoised}.
        """
        num_steps = default(num_steps, self.num_steps)
        if num_steps is None:
            raise ValueError("give num_steps to the sampler's constructor or call")
        sigmas = [float(s) for s in self.discretization(num_steps)]
        uc = default(uc, cond)
        noise_fn = default(noise_fn, randn_like_fn())
        # unit-variance noise -> the first noise level, as sgm (variance 1 + sigma^2, the DDPM-like prior)
        x = x * math.sqrt(1.0 + sigmas[0] ** 2)

        def model(x, sigma):
            return self.denoise(x, denoiser, sigma, cond, uc)

        n = len(sigmas) - 1
        steps = self.steps(model, x, sigmas, noise_fn)
        if self.verbose:
            steps = tqdm(steps, total=n, desc=f"Sampling with {type(self).__name__} for {n} steps")
        for i, (x, denoised) in enumerate(steps):
            if on_step is not None:
                on_step({"i": i, "num_steps": n, "sigma": sigmas[i], "x": x, "denoised": denoised})
        return x

    def denoise(self, x, denoiser, sigma, cond, uc):
        s = Tensor(np.full((x.shape[0],), sigma, np.float32))
        denoised = denoiser(*self.guider.prepare_inputs(x, s, cond, uc))
        return self.guider(denoised, s).astype(x.dtype)

    def steps(self, model, x, sigmas, noise_fn):
        """Yield (x, denoised) after each step from sigmas[i] to sigmas[i + 1]."""
        raise NotImplementedError


class EDMSampler(BaseDiffusionSampler):
    """Karras et al. (2022) alg. 2: optional "churn" raises sigma to sigma_hat = sigma (1 + gamma) with
    fresh noise, then an ODE step sigma_hat -> next sigma (Euler, or Heun in the subclass)."""

    def __init__(self, *args, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = s_churn, s_tmin, s_tmax, s_noise

    def steps(self, model, x, sigmas, noise_fn):
        n = len(sigmas) - 1
        for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
            gamma = min(self.s_churn / n, 2**0.5 - 1) if self.s_tmin <= sigma <= self.s_tmax else 0.0
            sigma_hat = sigma * (gamma + 1.0)
            if gamma > 0:
                x = x + noise_fn(x) * self.s_noise * (sigma_hat**2 - sigma**2) ** 0.5
            denoised = model(x, sigma_hat)
            d = to_d(x, sigma_hat, denoised)
            dt = next_sigma - sigma_hat
            x = self.possible_correction_step(x + d * dt, x, d, dt, next_sigma, model)
            yield x, denoised

    def possible_correction_step(self, euler_step, x, d, dt, next_sigma, model):
        return euler_step


class EulerEDMSampler(EDMSampler):
    pass


class HeunEDMSampler(EDMSampler):
    def possible_correction_step(self, euler_step, x, d, dt, next_sigma, model):
        if next_sigma == 0:
            return euler_step  # the last step to sigma 0 stays Euler (saves a network evaluation)
        d_new = to_d(euler_step, next_sigma, model(euler_step, next_sigma))
        return x + (d + d_new) / 2.0 * dt


class AncestralSampler(BaseDiffusionSampler):
    """Steps down to sigma_down, then adds fresh noise of std sigma_up to reach the next sigma."""

    def __init__(self, *args, eta=1.0, s_noise=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.eta, self.s_noise = eta, s_noise

    def ancestral_step(self, x, next_sigma, sigma_up, noise_fn):
        if next_sigma > 0:
            x = x + noise_fn(x) * self.s_noise * sigma_up
        return x


class EulerAncestralSampler(AncestralSampler):
    def steps(self, model, x, sigmas, noise_fn):
        for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
            sigma_down, sigma_up = get_ancestral_step(sigma, next_sigma, eta=self.eta)
            denoised = model(x, sigma)
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
            x = self.ancestral_step(x, next_sigma, sigma_up, noise_fn)
            yield x, denoised


class DPMPP2SAncestralSampler(AncestralSampler):
    """DPM-Solver++(2S) (Lu et al. 2022) with ancestral noise: a midpoint step in t = -log sigma."""

    def steps(self, model, x, sigmas, noise_fn):
        for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
            sigma_down, sigma_up = get_ancestral_step(sigma, next_sigma, eta=self.eta)
            denoised = model(x, sigma)
            if sigma_down == 0:
                x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)  # Euler to 0: x = denoised
            else:
                t, t_next = to_neg_log_sigma(sigma), to_neg_log_sigma(sigma_down)
                h = t_next - t
                s = t + 0.5 * h
                x_2 = (to_sigma(s) / sigma) * x - math.expm1(-0.5 * h) * denoised
                denoised_2 = model(x_2, to_sigma(s))
                x = (sigma_down / sigma) * x - math.expm1(-h) * denoised_2
            x = self.ancestral_step(x, next_sigma, sigma_up, noise_fn)
            yield x, denoised


class DPMPP2MSampler(BaseDiffusionSampler):
    """DPM-Solver++(2M) (Lu et al. 2022): second order from the previous step's denoised estimate."""

    def steps(self, model, x, sigmas, noise_fn):
        old_denoised, h_last = None, None
        for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
            denoised = model(x, sigma)
            if next_sigma == 0:
                x = denoised  # the exponential-integrator step to sigma 0 lands on D
            else:
                h = to_neg_log_sigma(next_sigma) - to_neg_log_sigma(sigma)
                denoised_d = denoised
                if old_denoised is not None:
                    r = h_last / h
                    denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
                x = (next_sigma / sigma) * x - math.expm1(-h) * denoised_d
                h_last = h
            old_denoised = denoised
            yield x, denoised


class LinearMultistepSampler(BaseDiffusionSampler):
    """Linear multistep (Adams-Bashforth in sigma) over the last `order` ODE derivatives."""

    def __init__(self, *args, order=4, **kwargs):
        super().__init__(*args, **kwargs)
        self.order = order

    def steps(self, model, x, sigmas, noise_fn):
        ds = []
        for i, sigma in enumerate(sigmas[:-1]):
            denoised = model(x, sigma)
            ds = (ds + [to_d(x, sigma, denoised)])[-self.order:]
            cur_order = len(ds)
            coeffs = [linear_multistep_coeff(cur_order, sigmas, i, j) for j in range(cur_order)]
            for coeff, d in zip(coeffs, reversed(ds)):
                x = x + coeff * d
            yield x, denoised
