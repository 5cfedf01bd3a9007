"""Preconditionings (Karras et al. 2022, table 1): D(x, sigma) = c_skip x + c_out F(c_in x, c_noise).

Each maps sigma (already broadcast to the input's rank) to (c_skip, c_out, c_in, c_noise).
"""
from mindspore import nn, ops


class EDMScaling(nn.Cell):
    def __init__(self, sigma_data=0.5):
        super().__init__()
        self.sigma_data = sigma_data

    def construct(self, sigma):
        c_skip = self.sigma_data**2 / (sigma**2 + self.sigma_data**2)
        c_out = sigma * self.sigma_data / (sigma**2 + self.sigma_data**2) ** 0.5
        c_in = 1 / (sigma**2 + self.sigma_data**2) ** 0.5
        c_noise = 0.25 * ops.log(sigma)
        return c_skip, c_out, c_in, c_noise


class EpsScaling(nn.Cell):
    """The network predicts the noise: D = x - sigma * eps(x / sqrt(sigma^2 + 1), sigma)."""

    def construct(self, sigma):
        c_skip = ops.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1.0) ** 0.5
        c_noise = sigma
        return c_skip, c_out, c_in, c_noise


class VScaling(nn.Cell):
    """The network predicts v = alpha eps - sigma_vp x_0 (Salimans & Ho 2022), written in sigma."""

    def construct(self, sigma):
        c_skip = 1.0 / (sigma**2 + 1.0)
        c_out = -sigma / (sigma**2 + 1.0) ** 0.5
        c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
        c_noise = sigma
        return c_skip, c_out, c_in, c_noise


class VScalingWithEDMcNoise(nn.Cell):
    def construct(self, sigma):
        c_skip = 1.0 / (sigma**2 + 1.0)
        c_out = -sigma / (sigma**2 + 1.0) ** 0.5
        c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
        c_noise = 0.25 * ops.log(sigma)
        return c_skip, c_out, c_in, c_noise
