"""diffusers `AutoencoderKL` state dict -> sgm names (the checkpoint's `first_stage_model.*` keys, unprefixed).

The differences (facts from diffusers' single-file conversion utilities):
- `down_blocks.i.resnets.j` / `downsamplers.0` are sgm's `down.i.block.j` / `downsample`;
- the decoder's `up_blocks` are numbered from the lowest resolution, sgm's `up` from the highest:
  `up_blocks.i` is `up.(n-1-i)`, with `resnets` -> `block`, `upsamplers.0` -> `upsample`;
- `mid_block.resnets.0/1` and `mid_block.attentions.0` are `mid.block_1/2` and `mid.attn_1`;
- `conv_norm_out` is `norm_out`, a resnet's `conv_shortcut` is `nin_shortcut`;
- attention: `group_norm` is `norm`; the Linear projections `to_q/to_k/to_v/to_out.0` (older files:
  `query/key/value/proj_attn`) are sgm's 1x1 convs `q/k/v/proj_out`, so their [out, in] weights
  become [out, in, 1, 1].
"""
import re

_ATTENTION_LEAVES = {
    "group_norm": "norm",
    "to_q": "q", "query": "q",
    "to_k": "k", "key": "k",
    "to_v": "v", "value": "v",
    "to_out.0": "proj_out", "proj_attn": "proj_out",
}
_ATTENTION_LEAF = re.compile(r"\.(attn_1|attn\.\d+)\.(" + "|".join(re.escape(k) for k in _ATTENTION_LEAVES) + r")\.")
_UP_PARTS = {"resnets": "block", "attentions": "attn", "upsamplers.0": "upsample"}


def _sgm_key(key, num_up):
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.attentions\.", r"encoder.down.\1.attn.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.(resnets|attentions|upsamplers\.0)\.",
        lambda m: f"decoder.up.{num_up - 1 - int(m[1])}.{_UP_PARTS[m[2]]}.",
        key,
    )
    key = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", key)
    key = key.replace(".mid_block.attentions.0.", ".mid.attn_1.")
    key = key.replace(".conv_norm_out.", ".norm_out.").replace(".conv_shortcut.", ".nin_shortcut.")
    return _ATTENTION_LEAF.sub(lambda m: f".{m[1]}.{_ATTENTION_LEAVES[m[2]]}.", key)


def vae_diffusers_to_sgm(state):
    """{diffusers key: array} -> {sgm key: array}. Arrays may be numpy or torch (also meta) tensors; only
    the attention projections are reshaped, everything else is passed through as is. Keys no rule covers
    keep their name, so a strict load reports them."""
    up_levels = {int(m[1]) for m in (re.match(r"decoder\.up_blocks\.(\d+)\.", k) for k in state) if m}
    if not up_levels:
        raise KeyError("decoder.up_blocks.0")
    num_up = max(up_levels) + 1
    out = {}
    for key, value in state.items():
        new_key = _sgm_key(key, num_up)
        if ".attn" in new_key and new_key.endswith(".weight") and len(value.shape) == 2:
            value = value[:, :, None, None]
        out[new_key] = value
    return out
