"""The PyTorch reference SDXL the parity tests compare against: diffusers' UNet2DConditionModel and
AutoencoderKL, transformers' CLIPTextModel (ViT-L side) and CLIPTextModelWithProjection (bigG side).

`TINY` has the architecture of configs/inference/sd_xl_tiny.yaml, `FULL` that of sd_xl_base.yaml (build
it on the meta device only). `write_tiny_sdxl` saves seeded random tiny weights in the formats users have:
a diffusers folder and the original single file (sgm names, fp16 storage, the two non-weight extras).
"""
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from diffusers.models.embeddings import Timesteps
from safetensors.numpy import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import mindspore as ms

from benchmarks.common import SCHEDULER, write_tokenizer
from gm.weights.diffusers_clip import clip_g_diffusers_to_sgm, clip_l_diffusers_to_sgm
from gm.weights.diffusers_unet import unet_diffusers_to_sgm
from gm.weights.diffusers_vae import vae_diffusers_to_sgm
from gm.weights.state_dict import compare_shapes

# `attention_head_dim` is diffusers' name for the number of heads per level here (head width 16 in tiny, 64 in SDXL).
_UNET = dict(
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
)
_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32)
_CLIP = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
             attn_implementation="eager")
_VIT_L = dict(_CLIP, hidden_act="quick_gelu", pad_token_id=49407)
_BIGG = dict(_CLIP, hidden_act="gelu", pad_token_id=0)

TINY = dict(
    unet=dict(_UNET, sample_size=8, block_out_channels=(32, 64, 128), transformer_layers_per_block=(1, 1, 2),
              attention_head_dim=(2, 4, 8), cross_attention_dim=96, projection_class_embeddings_input_dim=1600),
    vae=dict(_VAE, block_out_channels=(32, 64, 64, 64), sample_size=64),
    text_encoder=dict(_VIT_L, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
    text_encoder_2=dict(_BIGG, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                        projection_dim=64),
)
FULL = dict(
    unet=dict(_UNET, sample_size=128, block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
              attention_head_dim=(5, 10, 20), cross_attention_dim=2048, projection_class_embeddings_input_dim=2816),
    vae=dict(_VAE, block_out_channels=(128, 256, 512, 512), sample_size=1024),
    text_encoder=dict(_VIT_L, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      projection_dim=768),
    text_encoder_2=dict(_BIGG, hidden_size=1280, num_hidden_layers=32, num_attention_heads=20,
                        intermediate_size=5120, projection_dim=1280),
)
# component -> (its class, its keys' prefix in the single file, the mapping of its diffusers keys to sgm's)
COMPONENTS = {
    "unet": (UNet2DConditionModel, "model.diffusion_model.", unet_diffusers_to_sgm),
    "vae": (AutoencoderKL, "first_stage_model.", vae_diffusers_to_sgm),
    "text_encoder": (CLIPTextModel, "conditioner.embedders.0.transformer.", clip_l_diffusers_to_sgm),
    "text_encoder_2": (CLIPTextModelWithProjection, "conditioner.embedders.1.model.", clip_g_diffusers_to_sgm),
}
# What sd_xl_base_1.0.safetensors holds beside the weights (buffers, not model parameters).
POSITION_IDS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
LOGIT_SCALE = "conditioner.embedders.1.model.logit_scale"


def build(component, size=TINY):
    """The reference module of `component` ("unet", "vae", "text_encoder", "text_encoder_2") with `size`'s
    architecture, at its library's initial weights (under `torch.device("meta")`: no memory)."""
    cls, config = COMPONENTS[component][0], size[component]
    return cls(CLIPTextConfig(**config)) if component.startswith("text") else cls(**config)


def randomize(model, seed):
    """Seeded random weights that fp16 holds exactly (as the published file stores them), with norm scales
    and biases far from 1 and 0, so that a wrong or missed mapping cannot pass."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim > 1:
                value = noise / p[0].numel() ** 0.5
            elif name.endswith("weight"):
                value = 1 + 0.3 * noise
            else:
                value = 0.1 * noise
            p.copy_(value.half().float())
    return model.eval()


@dataclass
class TinySDXL:
    """The tiny reference: its torch modules (fp32, eval mode) and where its weight files are."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    diffusers_folder: str
    single_file: str

    def diffusers_state(self, component):
        """{diffusers key: array} of one component, read back from its saved safetensors file."""
        folder = os.path.join(self.diffusers_folder, component)
        name = "model.safetensors" if component.startswith("text") else "diffusion_pytorch_model.safetensors"
        return load_file(os.path.join(folder, name))

    def token_ids(self, prompts):
        """(ids, ids_2) [B, 77] from transformers' CLIPTokenizer reading the folder's tokenizer/ and tokenizer_2/."""
        return tuple(hf_ids(CLIPTokenizer.from_pretrained(os.path.join(self.diffusers_folder, sub)), prompts)
                     for sub in ("tokenizer", "tokenizer_2"))


def write_tiny_sdxl(folder, seed=0):
    """Build the tiny reference with seeded random weights and write it as `folder`/diffusers (model_index.json,
    the four components via save_pretrained, tokenizer/, tokenizer_2/, scheduler/) and
    `folder`/sd_xl_tiny.safetensors (the original single-file layout, fp16)."""
    modules = {name: randomize(build(name), seed + i) for i, name in enumerate(COMPONENTS)}
    diffusers_folder = os.path.join(folder, "diffusers")
    index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
             "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    for name, module in modules.items():
        module.save_pretrained(os.path.join(diffusers_folder, name), safe_serialization=True)
        index[name] = ["diffusers" if name in ("unet", "vae") else "transformers", type(module).__name__]
    write_tokenizer(os.path.join(diffusers_folder, "tokenizer"))
    write_tokenizer(os.path.join(diffusers_folder, "tokenizer_2"), pad_token="!")  # as published
    EulerDiscreteScheduler(**SCHEDULER).save_pretrained(os.path.join(diffusers_folder, "scheduler"))
    with open(os.path.join(diffusers_folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)

    tiny = TinySDXL(**modules, diffusers_folder=diffusers_folder,
                    single_file=os.path.join(folder, "sd_xl_tiny.safetensors"))
    single = {POSITION_IDS: np.arange(77, dtype=np.int64)[None], LOGIT_SCALE: np.array(np.log(100.0), np.float16)}
    for name, (_, prefix, to_sgm) in COMPONENTS.items():
        # (contiguous: safetensors writes the raw buffer, so a transposed view would be stored transposed)
        single.update({prefix + k: np.ascontiguousarray(v, np.float16)
                       for k, v in to_sgm(tiny.diffusers_state(name)).items()})
    save_file(single, tiny.single_file)
    return tiny


# ----------------------------------------------------------------------------------- reference computations


def conditioner_batch(prompts):
    """The inputs of SDXL's conditioner for `prompts`: text and per-sample size / crop conditioning."""
    n = len(prompts)
    return {
        "txt": list(prompts),
        "original_size_as_tuple": np.array([[1024, 768], [512, 640]][:n], np.float32),
        "crop_coords_top_left": np.array([[0, 0], [32, 16]][:n], np.float32),
        "target_size_as_tuple": np.array([[1024, 1024], [768, 512]][:n], np.float32),
    }


def hf_ids(tokenizer, prompts):
    """Token ids [B, 77] from a transformers CLIPTokenizer, padded and truncated as diffusers' pipelines do."""
    return np.array(tokenizer(prompts, padding="max_length", max_length=77, truncation=True).input_ids)


def run_text_encoder(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids, np.int64)), output_hidden_states=True)


def add_time_ids(batch):
    """diffusers' add_time_ids: original size, crop top-left, target size, [B, 6]."""
    return np.concatenate([batch["original_size_as_tuple"], batch["crop_coords_top_left"],
                           batch["target_size_as_tuple"]], 1)


def sdxl_conditioning(text_encoder, text_encoder_2, ids, ids_2, batch):
    """(prompt_embeds [B, 77, d1 + d2], pooled [B, e], time_ids [B, 6]) as diffusers' SDXL pipeline builds them:
    both encoders' penultimate hidden states concatenated, the bigG projection of its final state at the EOS."""
    out, out_2 = run_text_encoder(text_encoder, ids), run_text_encoder(text_encoder_2, ids_2)
    prompt_embeds = torch.cat([out.hidden_states[-2], out_2.hidden_states[-2]], -1)
    return prompt_embeds.numpy(), out_2.text_embeds.numpy(), add_time_ids(batch)


def sgm_vector(pooled, time_ids):
    """sgm's vector conditioning from diffusers' pieces: pooled bigG embedding, then the 256-d sinusoidal
    embedding of each time id (the UNet's add_time_proj)."""
    embed = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
    with torch.no_grad():
        sizes = embed(torch.from_numpy(time_ids).flatten()).reshape(len(time_ids), -1).numpy()
    return np.concatenate([pooled, sizes], 1)


def tiny_unet_inputs(rng, size):
    """Inputs of the tiny UNet for a batch of two latents of size x size, float32 arrays: (latents, timesteps at
    both ends of the schedule, text context [2, 77, 96], pooled bigG embedding [2, 64], two different size
    conditionings as diffusers' time_ids [2, 6])."""
    x = rng.standard_normal((2, 4, size, size))
    context, pooled = rng.standard_normal((2, 77, 96)), rng.standard_normal((2, 64))
    time_ids = np.array([[1024, 768, 0, 16, 1024, 1024], [512, 512, 32, 8, 768, 1024]])
    return tuple(a.astype(np.float32) for a in (x, np.array([10.0, 999.0]), context, pooled, time_ids))


def run_unet(unet, x, t, prompt_embeds, pooled, time_ids):
    cond = dict(text_embeds=torch.from_numpy(pooled), time_ids=torch.from_numpy(time_ids))
    with torch.no_grad():
        out = unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(prompt_embeds), added_cond_kwargs=cond)
    return out.sample.numpy()


# ------------------------------------------------------------------------------------------ into our cells


def model_shapes(cell):
    """{parameter name: shape} of a cell, names relative to it (the checkpoint's names)."""
    return {name: tuple(p.shape) for name, p in cell.parameters_and_names()}


def load_state_dict_into(cell, state, source="checkpoint"):
    """Copy `state` ({name: np.ndarray}, e.g. the reference's weights mapped to sgm's names) into `cell`'s
    parameters; every name and shape must match exactly."""
    params = dict(cell.parameters_and_names())
    compare_shapes(model_shapes(cell), {k: v.shape for k, v in state.items()}, source)
    for name, param in params.items():
        param.set_data(ms.Tensor(np.ascontiguousarray(state[name]), dtype=param.dtype))
    return cell
