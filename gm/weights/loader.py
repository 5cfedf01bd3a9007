"""Reading SDXL weights from any of the three formats users have, into sgm's parameter names.

One code path for training, sampling and tools:

- the original single file (`sd_xl_base_1.0.safetensors`), whose keys are already sgm's;
- a diffusers-format folder (`unet/`, `vae/`, `text_encoder/`, `text_encoder_2/`), mapped per component;
- a MindSpore `.ckpt` written by `tools/convert_weights.py`, with sgm's keys.

`read_shapes` answers from file headers alone (no tensor data read), so a 7 GB checkpoint can be checked
against a config in seconds; `load_weights` streams tensors one component at a time into the model.
"""
import functools
import json
import os
import struct

import numpy as np

from gm.weights.diffusers_clip import clip_g_diffusers_to_sgm, clip_l_diffusers_to_sgm
from gm.weights.diffusers_unet import unet_diffusers_to_sgm
from gm.weights.diffusers_vae import vae_diffusers_to_sgm
from gm.weights.state_dict import WeightMismatchError, compare_shapes

# Keys of the original file that are buffers, not weights; these and nothing else are ignored.
NON_WEIGHT_KEYS = (
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
    "conditioner.embedders.1.model.logit_scale",
    "denoiser.sigmas",
)

# diffusers sub-folder -> (sgm key prefix, key mapping)
DIFFUSERS_COMPONENTS = {
    "unet": ("model.diffusion_model.", unet_diffusers_to_sgm),
    "vae": ("first_stage_model.", vae_diffusers_to_sgm),
    "text_encoder": ("conditioner.embedders.0.transformer.", clip_l_diffusers_to_sgm),
    "text_encoder_2": ("conditioner.embedders.1.model.", clip_g_diffusers_to_sgm),
}

WEIGHTS_HELP = (
    "Download sd_xl_base_1.0.safetensors from https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0 "
    "(or the whole diffusers folder) and see checkpoints/README.md."
)

class WeightFileError(ValueError):
    """A weight file or folder that cannot be used; the message names it and says what is wrong."""


# ----------------------------------------------------------------------------------------------- safetensors


def read_safetensors_header(path):
    """{name: (dtype string, shape)} from a safetensors header, after checking the file is whole."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise WeightFileError(f"{path}: not a safetensors file (shorter than its 8-byte header length).")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(size - 8, 100_000_000):
            raise WeightFileError(f"{path}: not a safetensors file (its header length {header_len} is impossible).")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise WeightFileError(f"{path}: not a safetensors file (its header is not JSON).") from None
    if not isinstance(header, dict):
        raise WeightFileError(f"{path}: not a safetensors file (its header is not a JSON object).")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise WeightFileError(f"{path}: not a safetensors file (header entry {name!r} lacks dtype/shape/offsets).")
    data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + header_len + data_end > size:
        raise WeightFileError(
            f"{path}: truncated: the header describes {8 + header_len + data_end:,} bytes but the file has "
            f"{size:,}. Download it again."
        )
    return {name: (entry["dtype"], tuple(entry["shape"])) for name, entry in header.items()}


def safetensors_files(folder):
    """The weight files of one diffusers component folder: plain, fp16 variant, or sharded."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    for stem in ("diffusion_pytorch_model", "model"):
        for variant in ("", ".fp16"):
            single = f"{stem}{variant}.safetensors"
            if single in names:
                return [os.path.join(folder, single)]
            index = f"{stem}{variant}.safetensors.index.json"
            if index in names:
                with open(os.path.join(folder, index)) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
                return [os.path.join(folder, s) for s in shards]
    raise WeightFileError(f"{folder}: no *.safetensors weights found in this diffusers component folder.")


def _safe_open(path):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="np")
    except Exception as e:  # the library's errors are not typed; name the file instead
        raise WeightFileError(f"{path}: cannot be read as safetensors ({e}).") from None


@functools.lru_cache(maxsize=4)
def _data_layout(path, mtime_ns):
    """(byte offset of the data, {name: header entry}) of a safetensors file, parsed once per file version."""
    with open(path, "rb") as raw:
        header_size = struct.unpack("<Q", raw.read(8))[0]
        return 8 + header_size, json.loads(raw.read(header_size))


def safetensors_tensor(f, path, name):
    """Tensor `name` of the open safetensors file `f` (at `path`) as a numpy array. bfloat16, which numpy
    cannot hold, comes back as float32, exactly: a bfloat16 is the upper half of a float32's bits."""
    if f.get_slice(name).get_dtype() != "BF16":
        return f.get_tensor(name)
    data_start, header = _data_layout(path, os.stat(path).st_mtime_ns)
    begin, end = header[name]["data_offsets"]
    with open(path, "rb") as raw:
        raw.seek(data_start + begin)
        bits = np.frombuffer(raw.read(end - begin), dtype="<u2").astype(np.uint32) << 16
    return bits.view(np.float32).reshape(header[name]["shape"])


# ----------------------------------------------------------------------------------------------- formats


def weight_format(path):
    """'diffusers', 'safetensors' or 'ckpt'; a clear error for anything else."""
    if not os.path.exists(path):
        raise WeightFileError(f"weights not found: {path}. {WEIGHTS_HELP}")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")) and not os.path.isdir(os.path.join(path, "unet")):
            raise WeightFileError(f"{path}: a folder, but not a diffusers SDXL folder (no model_index.json or unet/).")
        return "diffusers"
    with open(path, "rb") as f:
        head = f.read(16)
    if path.endswith(".safetensors"):
        return "safetensors"
    if path.endswith(".ckpt"):
        return "ckpt"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise WeightFileError(f"{path}: not a .safetensors or MindSpore .ckpt file, nor a diffusers folder.")


def _diffusers_mapped(folder, shapes_only):
    """Yield (sgm-named dict, source) per diffusers component; shapes_only maps zero-memory stand-ins."""
    for sub, (prefix, to_sgm) in DIFFUSERS_COMPONENTS.items():
        comp = os.path.join(folder, sub)
        if not os.path.isdir(comp):
            raise WeightFileError(f"{folder}: diffusers folder without {sub}/ (SDXL base needs unet, vae, "
                                  "text_encoder and text_encoder_2).")
        state = {}
        for file in safetensors_files(comp):
            if shapes_only:
                for name, (dtype, shape) in read_safetensors_header(file).items():
                    state[name] = np.broadcast_to(np.zeros((), np.float16), shape)
            else:
                read_safetensors_header(file)  # whole-file check first
                with _safe_open(file) as f:
                    for name in f.keys():
                        state[name] = safetensors_tensor(f, file, name)
        try:
            mapped = to_sgm(state)
        except KeyError as e:
            raise WeightFileError(f"{comp}: not an SDXL {sub} (missing key {e}).") from None
        yield {prefix + k: v for k, v in mapped.items()}, comp


def read_shapes(path):
    """{sgm name: shape} of a checkpoint, from headers only (for ckpt files the data is read)."""
    fmt = weight_format(path)
    if fmt == "safetensors":
        return {k: shape for k, (_, shape) in read_safetensors_header(path).items()}
    if fmt == "ckpt":
        return {k: tuple(v.shape) for k, v in _load_ckpt(path).items()}
    shapes = {}
    for state, _ in _diffusers_mapped(path, shapes_only=True):
        shapes.update({k: tuple(v.shape) for k, v in state.items()})
    return shapes


def _load_ckpt(path):
    import mindspore as ms

    try:
        return ms.load_checkpoint(path)
    except Exception as e:
        raise WeightFileError(f"{path}: cannot be read as a MindSpore checkpoint ({str(e).splitlines()[0]}).") from None


# ----------------------------------------------------------------------------------------------- checking


def describe_foreign_checkpoint(names):
    """A hint when the keys look like another well-known model; None if they look like SDXL base."""
    if any(k.startswith("cond_stage_model.") for k in names):
        return "it looks like a Stable Diffusion 1.x/2.x checkpoint, not SDXL base 1.0"
    if any(k.startswith("conditioner.embedders.0.model.") for k in names):
        return "it looks like the SDXL refiner (one OpenCLIP text encoder), not SDXL base 1.0"
    if not any(k.startswith("model.diffusion_model.") for k in names):
        return "it holds no UNet (no model.diffusion_model.* keys): not a Stable Diffusion checkpoint"
    return None


def check_shapes(expected, found, path):
    """Compare a checkpoint's {name: shape} with the model's; raise one error listing every difference."""
    found = {k: v for k, v in found.items() if k not in NON_WEIGHT_KEYS}
    try:
        compare_shapes(expected, found, path)
    except WeightMismatchError as e:
        hint = describe_foreign_checkpoint(found)
        if hint is None and e.mismatched:
            hint = "its tensors have other sizes than the configured model: is the config the one they were made for?"
        if hint:
            raise WeightMismatchError(f"{path} ({hint})", e.missing, e.unexpected, e.mismatched) from None
        raise


# ----------------------------------------------------------------------------------------------- loading


def load_weights(model, path):
    """Load `path` (single file, diffusers folder or .ckpt) into `model`, strictly, streaming tensors.

    Names and shapes are checked for the whole model before any tensor is copied.
    """
    from mindspore import Tensor

    params = dict(model.parameters_and_names())
    expected = {k: tuple(p.shape) for k, p in params.items()}
    fmt = weight_format(path)
    ckpt = _load_ckpt(path) if fmt == "ckpt" else None  # a .ckpt has no header: read it once, whole
    check_shapes(expected, read_shapes(path) if ckpt is None else {k: tuple(v.shape) for k, v in ckpt.items()}, path)

    def assign(name, array):
        params[name].set_data(Tensor(np.ascontiguousarray(array), dtype=params[name].dtype))

    if fmt == "safetensors":
        with _safe_open(path) as f:
            for name in expected:
                assign(name, safetensors_tensor(f, path, name))
    elif fmt == "ckpt":
        for name in expected:
            assign(name, ckpt.pop(name).asnumpy())
    else:
        for state, _ in _diffusers_mapped(path, shapes_only=False):
            for name, array in state.items():
                assign(name, array)
    return model


def read_state_dict(path):
    """The whole checkpoint as {sgm name: np.ndarray} (for conversion), extras dropped."""
    fmt = weight_format(path)
    if fmt == "safetensors":
        read_safetensors_header(path)
        with _safe_open(path) as f:
            state = {k: safetensors_tensor(f, path, k) for k in f.keys()}
    elif fmt == "ckpt":
        state = {k: v.asnumpy() for k, v in _load_ckpt(path).items()}
    else:
        state = {}
        for part, _ in _diffusers_mapped(path, shapes_only=False):
            state.update(part)
    return {k: v for k, v in state.items() if k not in NON_WEIGHT_KEYS}
