"""The SDXL UNet: numerical parity with diffusers' UNet2DConditionModel loaded through the key
mapping (graph mode), and the full SDXL layout equal, name for name, to the published checkpoint's."""
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from mindspore import Tensor, ops
from mindspore.nn.utils import no_init_parameters
from omegaconf import OmegaConf
from safetensors.numpy import load_file

from gm.modules.layers import timestep_embedding
from gm.util import instantiate_from_config
from gm.weights.diffusers_unet import unet_diffusers_to_sgm
from gm.weights.state_dict import compare_shapes, load_state_dict_into, model_shapes

UNET_PARAMS = 2_567_463_684  # model.diffusion_model.* in sd_xl_base_1.0.safetensors

# diffusers configs of configs/inference/sd_xl_{tiny,base}.yaml. `attention_head_dim` is diffusers'
# name for the number of heads per level here (head width 16 in tiny, 64 in SDXL).
COMMON = dict(
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
)
TINY = dict(
    COMMON,
    sample_size=8,
    block_out_channels=(32, 64, 128),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 8),
    cross_attention_dim=96,
    projection_class_embeddings_input_dim=1600,
)
SDXL = dict(
    COMMON,
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    projection_class_embeddings_input_dim=2816,
)


def network_config(root, name):
    return OmegaConf.load(f"{root}/configs/inference/{name}.yaml").model.params.network_config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A seeded random diffusers tiny UNet and its weights as read back from its safetensors file."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY).eval()
    with torch.no_grad():  # move norms and biases off their 1 / 0 init, so a swapped key shows
        for p in unet.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("unet")
    unet.save_pretrained(folder, safe_serialization=True)
    return unet, unet_diffusers_to_sgm(load_file(folder / "diffusion_pytorch_model.safetensors"))


def tiny_unet(root, state, **extra):
    net = instantiate_from_config(network_config(root, "sd_xl_tiny"), **extra)
    return load_state_dict_into(net, state, "diffusers tiny UNet")


def make_inputs(size, seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        x=rng.standard_normal((2, 4, size, size)).astype(np.float32),
        t=np.array([10.0, 999.0], np.float32),
        context=rng.standard_normal((2, 77, 96)).astype(np.float32),
        pooled=rng.standard_normal((2, 64)).astype(np.float32),
        time_ids=np.array([[1024, 768, 0, 16, 1024, 1024], [512, 512, 32, 8, 768, 1024]], np.float32),
    )


def run_reference(ref, inp):
    cond = dict(text_embeds=torch.from_numpy(inp["pooled"]), time_ids=torch.from_numpy(inp["time_ids"]))
    with torch.no_grad():
        out = ref(torch.from_numpy(inp["x"]), torch.from_numpy(inp["t"]), torch.from_numpy(inp["context"]),
                  added_cond_kwargs=cond)
    return out.sample.numpy()


def run_ours(net, inp):
    # sgm's vector y: pooled text embedding, then a 256-d embedding of each size / crop value.
    sizes = timestep_embedding(Tensor(inp["time_ids"].reshape(-1)), 256).reshape(2, -1)
    y = ops.cat([Tensor(inp["pooled"]), sizes], axis=1)
    return net(Tensor(inp["x"]), Tensor(inp["t"]), Tensor(inp["context"]), y).asnumpy()


def test_matches_diffusers(reference, root):
    inp = make_inputs(8)
    expected = run_reference(reference[0], inp)
    out = run_ours(tiny_unet(root, reference[1]), inp)
    assert out.shape == (2, 4, 8, 8)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4)


def test_recompute_matches_diffusers_at_16x16(reference, root):
    # One graph compile per (model, input shape) costs ~15 s of CPU: the larger latent and
    # gradient checkpointing share this one.
    inp = make_inputs(16, seed=1)
    out = run_ours(tiny_unet(root, reference[1], use_recompute=True), inp)
    assert out.shape == (2, 4, 16, 16)
    np.testing.assert_allclose(out, run_reference(reference[0], inp), rtol=0, atol=1e-4)


def test_full_sdxl_layout_equals_checkpoint(root):
    """Names and shapes only: parameters stay unallocated (no_init_parameters; diffusers on the meta device)."""
    with no_init_parameters():
        net = instantiate_from_config(network_config(root, "sd_xl_base"))
    ours = model_shapes(net)
    assert sum(int(np.prod(s)) for s in ours.values()) == UNET_PARAMS
    unallocated = sum(int(np.prod(p.shape)) for p in net.get_parameters() if p.has_init)
    assert unallocated > 0.75 * UNET_PARAMS  # the test must stay cheap: the bulk is never materialised

    with torch.device("meta"):
        ref = UNet2DConditionModel(**SDXL)
    mapped = unet_diffusers_to_sgm({k: tuple(v.shape) for k, v in ref.state_dict().items()})
    compare_shapes(ours, mapped, "diffusers SDXL UNet")
