"""Training noise levels. The random draw (`draw`, on the host, from a seedable numpy generator) is
split from the map to sigmas (`construct`, graph-compiled), so a training step can be given its
randomness as inputs and reproduced exactly. `spread` gives draws spread evenly over the same distribution
instead (the validation loss's fixed timesteps)."""
from statistics import NormalDist

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

from gm.util import instantiate_from_config


class EDMSampling(nn.Cell):
    """log sigma ~ N(p_mean, p_std^2) (Karras et al. 2022)."""

    def __init__(self, p_mean=-1.2, p_std=1.2):
        super().__init__()
        self.p_mean, self.p_std = p_mean, p_std

    def draw(self, n_samples, rng=None):
        rng = np.random if rng is None else rng
        return Tensor(rng.standard_normal((n_samples,)), ms.float32)

    def spread(self, n_samples):
        """n_samples draws at the midpoints of n equal-probability strata of N(0, 1) (stratified, not random)."""
        return Tensor([NormalDist().inv_cdf((j + 0.5) / n_samples) for j in range(n_samples)], ms.float32)

    def construct(self, rand):
        return ops.exp(self.p_mean + self.p_std * rand)


class DiscreteSampling(nn.Cell):
    """sigma = sigmas[idx] with idx uniform over the `num_idx` trained levels (the DDPM timestep)."""

    def __init__(self, discretization_config, num_idx, do_append_zero=False, flip=True):
        super().__init__()
        self.num_idx = num_idx
        sigmas = instantiate_from_config(discretization_config)(num_idx, do_append_zero=do_append_zero, flip=flip)
        self.sigmas = Tensor(sigmas, ms.float32)

    def draw(self, n_samples, rng=None):
        """n_samples random indices in [0, num_idx); `rng` is a numpy RandomState (default: np.random)."""
        rng = np.random if rng is None else rng
        return Tensor(rng.randint(0, self.num_idx, (n_samples,)), ms.int32)

    def spread(self, n_samples):
        """n_samples indices spread evenly over [0, num_idx): the midpoints of n equal strata (stratified, not
        random)."""
        return Tensor(((np.arange(n_samples) + 0.5) * self.num_idx / n_samples).astype(np.int32), ms.int32)

    def idx_to_sigma(self, idx):
        return ops.gather(self.sigmas, idx, 0)

    def construct(self, rand):
        return self.idx_to_sigma(rand)
