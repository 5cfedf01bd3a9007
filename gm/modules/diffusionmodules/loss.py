"""The denoising score-matching loss: E lambda(sigma) |D(x + sigma n, sigma) - x|^2."""
import numpy as np

import mindspore as ms
from mindspore import Tensor, nn

from gm.util import append_dims, instantiate_from_config


class StandardDiffusionLoss(nn.Cell):
    """Per-sample loss [B]. Its randomness (noise n and the sigma sampler's `rand`) comes in as
    inputs, drawn on the host by `draw_inputs`, so a step is reproducible and runs in a graph."""

    def __init__(self, sigma_sampler_config, loss_weighting_config, loss_type="l2", offset_noise_level=0.0):
        super().__init__()
        if loss_type not in ("l2", "l1"):
            raise ValueError(f"loss_type must be 'l2' or 'l1', got {loss_type!r}")
        self.sigma_sampler = instantiate_from_config(sigma_sampler_config)
        self.loss_weighting = instantiate_from_config(loss_weighting_config)
        self.loss_type = loss_type
        self.offset_noise_level = offset_noise_level

    def draw_inputs(self, shape, rng=None):
        """(noise, rand) for a batch of latents of `shape`, from a numpy RandomState (default np.random).

        With offset noise, each sample and channel gets an extra constant shift (sgm's offset noise)."""
        rng = np.random if rng is None else rng
        noise = rng.standard_normal(shape)
        if self.offset_noise_level > 0.0:
            offset = rng.standard_normal(shape[:2])
            noise = noise + self.offset_noise_level * offset.reshape(offset.shape + (1,) * (len(shape) - 2))
        return Tensor(noise, ms.float32), self.sigma_sampler.draw(shape[0], rng)

    def construct(self, network, denoiser, x, context, y, noise, rand):
        noised_input, sigmas = self.noised(x, noise, rand)
        model_output = denoiser(network, noised_input, sigmas, context, y)
        return self.get_loss(model_output, x, self.weights(sigmas, x.ndim))

    def noised(self, x, noise, rand):
        """(x + sigma n, sigma) at the noise levels the sigma sampler draws from `rand`."""
        sigmas = self.sigma_sampler(rand)
        return x + noise * append_dims(sigmas, x.ndim), sigmas

    def weights(self, sigmas, ndim):
        """lambda(sigma), shaped to broadcast over a batch of `ndim` dimensions."""
        return append_dims(self.loss_weighting(sigmas), ndim)

    def get_loss(self, model_output, target, w):
        if self.loss_type == "l2":
            err = (model_output - target) ** 2
        else:
            err = (model_output - target).abs()
        return (w * err).reshape(target.shape[0], -1).mean(1)
