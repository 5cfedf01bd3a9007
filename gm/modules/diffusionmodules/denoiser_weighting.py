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


class EpsMinSNRWeighting(nn.Cell):
    """Min-SNR-gamma (Hang et al. 2023) for the eps objective: the eps-MSE of each sample weighted by
    min(SNR, gamma) / SNR, SNR = alpha_bar / (1 - alpha_bar) = sigma^-2. Times EpsWeighting's sigma^-2 (which turns
    |D - x|^2 into the eps-MSE) that is min(sigma^-2, gamma): high-noise samples keep their weight, the easy
    low-noise ones no longer dominate."""

    def __init__(self, gamma=5.0):
        super().__init__()
        self.gamma = gamma

    def construct(self, sigma):
        return ops.minimum(sigma**-2.0, self.gamma)
