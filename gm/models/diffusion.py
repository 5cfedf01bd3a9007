"""`DiffusionEngine`: SDXL assembled from its config, with sgm's attribute names, so that the
original checkpoint's keys (`model.diffusion_model.*`, `conditioner.*`, `first_stage_model.*`) are
this cell's parameter names."""
from mindspore import nn

from gm.util import instantiate_from_config


class OpenAIWrapper(nn.Cell):
    """Holds the UNet as `diffusion_model`, which puts it under the checkpoint's `model.diffusion_model.`."""

    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model

    def construct(self, x, timesteps, context, y):
        return self.diffusion_model(x, timesteps, context, y)


class DiffusionEngine(nn.Cell):
    """UNet (`model`), denoiser, text/size conditioner, VAE (`first_stage_model`) and, when configured,
    the training loss.

    `requires_weights` marks configs (the real SDXL) that must never run from random initial weights.
    """

    def __init__(self, network_config, denoiser_config, conditioner_config, first_stage_config,
                 scale_factor=0.13025, loss_fn_config=None, requires_weights=True):
        super().__init__()
        self.model = OpenAIWrapper(instantiate_from_config(network_config))
        self.denoiser = instantiate_from_config(denoiser_config)
        self.conditioner = instantiate_from_config(conditioner_config)
        self.first_stage_model = instantiate_from_config(first_stage_config)
        self.loss_fn = instantiate_from_config(loss_fn_config) if loss_fn_config else None
        self.scale_factor = scale_factor
        self.requires_weights = requires_weights

    def encode_first_stage(self, x):
        """Images in [-1, 1] -> latents the UNet works on (posterior mean x scale_factor)."""
        return self.first_stage_model.encode_mean(x) * self.scale_factor

    def decode_first_stage(self, z):
        """Latents -> images in [-1, 1]."""
        return self.first_stage_model.decode(z / self.scale_factor)


