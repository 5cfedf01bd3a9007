"""Loss weights lambda(sigma) of the denoising loss lambda(sigma) * |D(x + sigma n, sigma) - x|^2."""
from mindspore import nn, ops


class UnitWeighting(nn.Cell):
    def construct(self, sigma):
        return ops.ones_like(sigma)


class EDMWeighting(nn.Cell):
    """(sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2 of EDMScaling: unit weight on F."""

    def __init__(self, sigma_data=0.5):
        super().__init__()
        self.sigma_data = sigma_data

    def construct(self, sigma):
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


class VWeighting(EDMWeighting):
    def __init__(self):
        super().__init__(sigma_data=1.0)


class EpsWeighting(nn.Cell):
    """sigma^-2 = 1 / c_out^2 of EpsScaling: the loss becomes |eps_pred - n|^2, DDPM's simple loss."""

    def construct(self, sigma):
        return sigma**-2.0
