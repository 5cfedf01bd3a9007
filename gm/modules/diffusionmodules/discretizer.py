"""Noise-level schedules: the sigmas a sampler walks through, highest first, as float32 numpy arrays.

sigma is the noise level of the variance-exploding view x_sigma = x_0 + sigma * eps; a DDPM timestep t
with cumulative alpha a_t corresponds to sigma_t = sqrt((1 - a_t) / a_t).
"""
import numpy as np


def generate_roughly_equally_spaced_steps(num_substeps, max_step):
    """sgm's choice of `num_substeps` of the `max_step` training timesteps, ascending.

    floor(linspace(max_step - 1, 0, n, endpoint=False)): always includes the noisiest timestep
    max_step - 1; e.g. n=5 -> [199, 399, 599, 799, 999].
    """
    return np.linspace(max_step - 1, 0, num_substeps, endpoint=False).astype(int)[::-1]


class Discretization:
    def __call__(self, n, do_append_zero=True, flip=False):
        """n sigmas, decreasing (increasing if `flip`), plus a final 0 if `do_append_zero`."""
        sigmas = self.get_sigmas(n)
        if do_append_zero:
            sigmas = np.append(sigmas, np.float32(0.0))
        return np.ascontiguousarray(sigmas[::-1] if flip else sigmas)

    def get_sigmas(self, n):
        raise NotImplementedError


class EDMDiscretization(Discretization):
    """Karras et al. (2022) eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""

    def __init__(self, sigma_min=0.002, sigma_max=80.0, rho=7.0):
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho

    def get_sigmas(self, n):
        ramp = np.linspace(0, 1, n)
        min_inv_rho, max_inv_rho = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return ((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** self.rho).astype(np.float32)


class LegacyDDPMDiscretization(Discretization):
    """The DDPM schedule of SD / SDXL: "scaled linear" betas (linear in sqrt(beta)), in float64."""

    def __init__(self, linear_start=0.00085, linear_end=0.0120, num_timesteps=1000):
        self.num_timesteps = num_timesteps
        self.betas = np.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=np.float64) ** 2
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        self.train_sigmas = np.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod).astype(np.float32)

    def timesteps(self, n):
        """The training timesteps of an n-step schedule, ascending (all of them for n = num_timesteps)."""
        if n == self.num_timesteps:
            return np.arange(n)
        if not 0 < n < self.num_timesteps:
            raise ValueError(f"need 0 < n <= {self.num_timesteps} sampling steps, got {n}")
        return generate_roughly_equally_spaced_steps(n, self.num_timesteps)

    def get_sigmas(self, n):
        return self.train_sigmas[self.timesteps(n)][::-1]


class Img2ImgDiscretizationWrapper:
    """Keeps the last `strength` fraction of the wrapped schedule (at least its final sigma), so that
    img2img sampling starts from a partly noised image at a lower sigma; strength 1.0 keeps all of it."""

    def __init__(self, discretization, strength=1.0):
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must lie in [0, 1], got {strength}")
        self.discretization, self.strength = discretization, strength

    def __call__(self, *args, **kwargs):
        sigmas = self.discretization(*args, **kwargs)
        keep = max(int(self.strength * len(sigmas)), 1)
        return sigmas[len(sigmas) - keep:]
