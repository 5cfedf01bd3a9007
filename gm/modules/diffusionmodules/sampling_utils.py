"""Scalar helpers of the samplers (k-diffusion's), on host floats: the schedule is batch-uniform."""
import math

import numpy as np

from mindspore import Tensor


def to_d(x, sigma, denoised):
    """The probability-flow ODE's derivative dx/dsigma = (x - D(x, sigma)) / sigma."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    """Split a step sigma_from -> sigma_to into a deterministic step down to sigma_down and fresh noise
    of std sigma_up, sigma_down^2 + sigma_up^2 = sigma_to^2; eta=1 is the DDPM posterior's noise."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def linear_multistep_coeff(order, t, i, j):
    """Integral over [t[i], t[i+1]] of the Lagrange basis polynomial through t[i], ..., t[i-order+1]
    that is 1 at t[i-j] (k-diffusion integrates it numerically; it is a polynomial, so exactly here)."""
    if order - 1 > i:
        raise ValueError(f"Order {order} too high for step {i}")
    nodes = [t[i - k] for k in range(order) if k != j]
    basis = np.poly1d(nodes, r=True) / np.prod([t[i - j] - node for node in nodes])
    antiderivative = basis.integ()
    return float(antiderivative(t[i + 1]) - antiderivative(t[i]))


def to_neg_log_sigma(sigma):
    return -math.log(sigma)


def to_sigma(neg_log_sigma):
    return math.exp(-neg_log_sigma)


def randn_like_fn(seed=None):
    """A `noise_fn(x)` drawing N(0, I) like x from numpy's RandomState(seed): the same stream on every
    device, so sampling with a seed is reproducible. A list of seeds gives each sample of the batch its own
    stream (sample i from seed[i]), so a sample's noise does not depend on the batch it is drawn in."""
    if isinstance(seed, (list, tuple)):
        rngs = [np.random.RandomState(s) for s in seed]

        def draw(shape):
            return np.concatenate([rng.standard_normal((1, *shape[1:])) for rng in rngs])
    else:
        rng = np.random.RandomState(seed)

        def draw(shape):
            return rng.standard_normal(shape)

    def noise_fn(x):
        return Tensor(draw(x.shape).astype(np.float32)).astype(x.dtype)

    return noise_fn


def img2img_noised_input(z, noise, sigma):
    """Sampler input for img2img from clean latents z: z noised to `sigma` (the first sigma of the pruned
    schedule, see Img2ImgDiscretizationWrapper), divided by sqrt(1 + sigma^2) because the samplers
    multiply their input by it, as they treat it as unit-variance noise (sgm's convention)."""
    return (z + noise * sigma) / math.sqrt(1.0 + sigma**2)
