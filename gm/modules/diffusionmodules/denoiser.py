"""The denoiser D(x, sigma) = c_skip x + c_out network(c_in x, c_noise, context, y): turns the UNet's
raw output into an estimate of the clean latents, whatever its parameterisation (eps, v, EDM)."""
import mindspore as ms
from mindspore import Tensor, nn, ops

from gm.util import append_dims, instantiate_from_config


class Denoiser(nn.Cell):
    def __init__(self, scaling_config):
        super().__init__()
        self.scaling = instantiate_from_config(scaling_config)

    def possibly_quantize_sigma(self, sigma):
        return sigma

    def possibly_quantize_c_noise(self, c_noise):
        return c_noise

    def construct(self, network, x, sigma, context, y):
        """x [B, ...], sigma [B]; `network(x, timesteps, context, y)` is the UNet."""
        network_x, c_noise, c_skip, c_out = self.network_inputs(x, sigma)
        return self.combine(network(network_x, c_noise, context, y), x, c_skip, c_out)

    def network_inputs(self, x, sigma):
        """(the network's input c_in x, its timesteps c_noise, and c_skip, c_out for `combine`)."""
        sigma = self.possibly_quantize_sigma(sigma)
        c_skip, c_out, c_in, c_noise = self.scaling(append_dims(sigma, x.ndim))
        return x * c_in, self.possibly_quantize_c_noise(c_noise.reshape(sigma.shape)), c_skip, c_out

    def combine(self, network_output, x, c_skip, c_out):
        """D(x, sigma) from the network's output."""
        # the network may compute in fp16/bf16; the skip connection stays in x's precision
        return network_output.astype(x.dtype) * c_out + x * c_skip


class DiscreteDenoiser(Denoiser):
    """A denoiser trained on `num_idx` discrete noise levels (DDPM timesteps): sigma is snapped to the
    nearest trained level, and with `quantize_c_noise` the network sees that level's index, the timestep."""

    def __init__(self, scaling_config, num_idx, discretization_config, do_append_zero=False,
                 quantize_c_noise=True, flip=True):
        super().__init__(scaling_config)
        discretization = instantiate_from_config(discretization_config)
        # a constant, not a Parameter: it is no checkpoint key and is never trained
        self.sigmas = Tensor(discretization(num_idx, do_append_zero=do_append_zero, flip=flip), ms.float32)
        self.num_idx = num_idx
        self.quantize_c_noise = quantize_c_noise

    def sigma_to_idx(self, sigma):
        dists = ops.abs(sigma.reshape(1, -1) - self.sigmas.reshape(-1, 1))
        return ops.argmin(dists, axis=0).reshape(sigma.shape)

    def idx_to_sigma(self, idx):
        return ops.gather(self.sigmas, idx, 0)

    def possibly_quantize_sigma(self, sigma):
        return self.idx_to_sigma(self.sigma_to_idx(sigma))

    def possibly_quantize_c_noise(self, c_noise):
        if self.quantize_c_noise:
            return self.sigma_to_idx(c_noise)
        return c_noise


class BoundDenoiser(nn.Cell):
    """A denoiser with its network bound as an attribute, compiled as one graph: x, sigma -> D(x, sigma).

    Hold networks as attributes, not call arguments: MindSpore 2.10 recompiles a top-level call that
    is given a Cell argument on every call. `denoise` is the samplers' `denoiser(x, sigma, cond)`."""

    def __init__(self, denoiser, network):
        super().__init__(auto_prefix=False)  # the network's parameters keep their checkpoint names
        self.denoiser, self.network = denoiser, network

    def construct(self, x, sigma, context, y):
        return self.denoiser(self.network, x, sigma, context, y)

    def denoise(self, x, sigma, cond):
        return self(x, sigma, cond["crossattn"], cond["vector"])
