"""diffusers-format SDXL text encoders -> sgm's names (relative to the component prefix).

- `text_encoder/` is a transformers `CLIPTextModel`: sgm keeps those very names under
  `conditioner.embedders.0.transformer.`. Files written by transformers 4 (the published ones) prefix them with
  `text_model.`, transformers 5 saves them without; the `position_ids` buffer older exports carry is dropped.
- `text_encoder_2/` is a transformers `CLIPTextModelWithProjection`: sgm keeps open_clip's names under
  `conditioner.embedders.1.model.`: q/k/v projections stacked into `attn.in_proj_weight` / `in_proj_bias`,
  `text_projection.weight` [e, w] transposed into `text_projection` [w, e] (applied as x @ P), and layers
  renamed (facts from diffusers' single-file conversion, `convert_open_clip_checkpoint`).

Keys not recognised are passed on unchanged, so that strict loading names them.
"""
import re

from gm.weights.lazy import concatenate

_POSITION_IDS = "text_model.embeddings.position_ids"

_OPEN_CLIP_NAMES = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}

_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")
_QKV = re.compile(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(weight|bias)")
_LAYER_PARTS = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}


def _text_model_key(key):
    """transformers 5 saves CLIPTextModel without the `text_model.` prefix that transformers 4 wrote."""
    return "text_model." + key if key.split(".")[0] in ("embeddings", "encoder", "final_layer_norm") else key


def clip_l_diffusers_to_sgm(state):
    """{transformers CLIPTextModel key: array} -> {sgm key relative to `conditioner.embedders.0.transformer.`}."""
    return {_text_model_key(k): v for k, v in state.items() if _text_model_key(k) != _POSITION_IDS}


def clip_g_diffusers_to_sgm(state):
    """{transformers CLIPTextModelWithProjection key: array} -> {open_clip key relative to `conditioner.embedders.1.model.`}.

    Raises KeyError if a layer lacks one of its q/k/v projections.
    """
    state = {_text_model_key(k): v for k, v in state.items()}
    out, stacked = {}, set()
    for key, value in state.items():
        if key == _POSITION_IDS:
            continue
        if key in _OPEN_CLIP_NAMES:
            out[_OPEN_CLIP_NAMES[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T
        elif m := _QKV.fullmatch(key):
            stacked.add(m.groups())
        elif m := _LAYER.fullmatch(key):
            index, rest = m.groups()
            for old, new in _LAYER_PARTS.items():
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            out[f"transformer.resblocks.{index}.{rest}"] = value
        else:
            out[key] = value
    for index, kind in sorted(stacked):
        layer = f"text_model.encoder.layers.{index}.self_attn."
        out[f"transformer.resblocks.{index}.attn.in_proj_{kind}"] = concatenate([state[f"{layer}{p}_proj.{kind}"] for p in "qkv"])
    return out
