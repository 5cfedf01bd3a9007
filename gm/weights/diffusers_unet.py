"""diffusers `UNet2DConditionModel` keys -> sgm `UNetModel` keys (relative to `model.diffusion_model.`).

Only names change: values pass through untouched (arrays, or shape stand-ins). The block layout
follows from the key names: each UNet level holds `layers_per_block` ResBlocks on the way down
(+ a Downsample) and one more on the way up (+ an Upsample), so diffusers' (block, layer) pairs
number sgm's flat `input_blocks` / `output_blocks` in steps of `layers_per_block + 1`.
"""
import re

_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

# Inside a ResBlock; the attention (transformer) names are the same in both.
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

_LAYER = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_DOWNSAMPLER = re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)")
_UPSAMPLER = re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)")


def _resnet_param(name):
    layer, rest = name.split(".", 1)
    return f"{_RESNET[layer]}.{rest}"


def unet_diffusers_to_sgm(state):
    """Rename a diffusers SDXL UNet state dict {key: value} to sgm's keys; raises KeyError on unknown keys."""
    down_resnets = {int(m.group(4)) for m in map(_LAYER.match, state) if m and m.group(1) == "down_blocks"}
    if not down_resnets:
        raise KeyError("not a diffusers UNet2DConditionModel state dict: no down_blocks.*.resnets keys")
    stride = max(down_resnets) + 2  # layers_per_block + 1 sgm blocks per level
    up_with_attention = {
        m.group(2) for m in map(_LAYER.match, state) if m and m.group(1) == "up_blocks" and m.group(3) == "attentions"
    }

    out = {}
    for key, value in state.items():
        param, _, kind = key.rpartition(".")
        if param in _TOP_LEVEL:
            new = f"{_TOP_LEVEL[param]}.{kind}"
        elif m := _LAYER.match(key):
            where, block, part, layer, rest = m.groups()
            index = int(block) * stride + int(layer) + (1 if where == "down_blocks" else 0)
            sgm_list = "input_blocks" if where == "down_blocks" else "output_blocks"
            if part == "resnets":
                new = f"{sgm_list}.{index}.0.{_resnet_param(rest)}"
            else:
                new = f"{sgm_list}.{index}.1.{rest}"
        elif m := _MID.match(key):
            part, layer, rest = m.groups()
            if part == "resnets":
                new = f"middle_block.{2 * int(layer)}.{_resnet_param(rest)}"
            else:
                new = f"middle_block.1.{rest}"
        elif m := _DOWNSAMPLER.match(key):
            block, rest = m.groups()
            new = f"input_blocks.{(int(block) + 1) * stride}.0.op.{rest}"
        elif m := _UPSAMPLER.match(key):
            block, rest = m.groups()
            slot = 2 if block in up_with_attention else 1  # after the ResBlock (and its transformer)
            new = f"output_blocks.{int(block) * stride + stride - 1}.{slot}.conv.{rest}"
        else:
            raise KeyError(f"unexpected diffusers UNet key: {key}")
        out[new] = value
    return out
