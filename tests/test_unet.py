"""The SDXL UNet's full layout equal, name for name, to the published checkpoint's. (Its numerical parity with
diffusers' UNet2DConditionModel loaded through the key mapping, output and gradients:
tests/test_frozen_backward.py::test_unet_output_and_input_gradients_match_diffusers; its recomputed blocks: the
tests after it.)"""
import numpy as np
import torch
from mindspore.nn.utils import no_init_parameters
from omegaconf import OmegaConf

from reference import FULL, build, model_shapes
from gm.util import instantiate_from_config
from gm.weights.diffusers_unet import unet_diffusers_to_sgm
from gm.weights.state_dict import compare_shapes

UNET_PARAMS = 2_567_463_684  # model.diffusion_model.* in sd_xl_base_1.0.safetensors


def network_config(root, name):
    return OmegaConf.load(f"{root}/configs/inference/{name}.yaml").model.params.network_config


def test_full_sdxl_layout_equals_checkpoint(root):
    """Names and shapes only: parameters stay unallocated (no_init_parameters; diffusers on the meta device)."""
    with no_init_parameters():
        net = instantiate_from_config(network_config(root, "sd_xl_base"))
    ours = model_shapes(net)
    assert sum(int(np.prod(s)) for s in ours.values()) == UNET_PARAMS
    unallocated = sum(int(np.prod(p.shape)) for p in net.get_parameters() if p.has_init)
    assert unallocated > 0.75 * UNET_PARAMS  # the test must stay cheap: the bulk is never materialised

    with torch.device("meta"):
        ref = build("unet", FULL)
    mapped = unet_diffusers_to_sgm({k: tuple(v.shape) for k, v in ref.state_dict().items()})
    compare_shapes(ours, mapped, "diffusers SDXL UNet")
