"""Reading SDXL weights from any of the three formats users have, into sgm's parameter names.

One code path for training, sampling and tools:

- the original single file (`sd_xl_base_1.0.safetensors`), whose keys are already sgm's;
- a diffusers-format folder (`unet/`, `vae/`, `text_encoder/`, `text_encoder_2/`), mapped per component;
- a MindSpore `.ckpt` written by `tools/convert_weights.py`, with sgm's keys.

`read_shapes` answers from file headers alone (no tensor data read), so a 7 GB checkpoint can be checked
against a config in seconds; `load_weights` reads one tensor at a time into the already-built model.
"""
import functools
import hashlib
import json
import os
import struct

import numpy as np

from gm.weights.diffusers_clip import clip_g_diffusers_to_sgm, clip_l_diffusers_to_sgm
from gm.weights.diffusers_unet import unet_diffusers_to_sgm
from gm.weights.diffusers_vae import vae_diffusers_to_sgm
from gm.weights.lazy import LazyTensor
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


def bf16_to_float32(bits):
    """bfloat16 bit patterns (uint16) as float32, exactly: a bfloat16 is the upper half of a float32's bits."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def safetensors_tensor(f, path, name):
    """Tensor `name` of the open safetensors file `f` (at `path`) as a numpy array; bfloat16, which numpy
    cannot hold, comes back as float32. For small files (embeddings); model weights go through
    `SafetensorsFile`, which does not map the file into memory."""
    if f.get_slice(name).get_dtype() != "BF16":
        return f.get_tensor(name)
    return SafetensorsFile(path).read(name)


SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
                      "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsFile:
    """A safetensors file read one tensor at a time with ordinary reads.

    Not memory-mapped (as `safetensors.safe_open` does): every page of a mapped file that has been read counts
    in the process's resident memory for as long as the map lives, which put a whole 7 GB checkpoint on top of
    the model being filled.
    """

    def __init__(self, path):
        read_safetensors_header(path)  # whole-file and header checks, with clear errors
        with open(path, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        self.path, self.data_start, self.entries = path, 8 + header_len, header

    def shapes(self):
        return {name: tuple(entry["shape"]) for name, entry in self.entries.items()}

    def read(self, name):
        """Tensor `name` as a numpy array (bfloat16 as float32)."""
        entry = self.entries[name]
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise WeightFileError(f"{self.path}: tensor {name} has dtype {entry['dtype']}, which is not supported.")
        begin, end = entry["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            array = np.fromfile(f, dtype, (end - begin) // np.dtype(dtype).itemsize)
        array = array.reshape(entry["shape"])
        return bf16_to_float32(array) if entry["dtype"] == "BF16" else array


# ----------------------------------------------------------------------------------------------- MindSpore .ckpt

CKPT_DTYPES = {"Float64": np.float64, "Float32": np.float32, "Float16": np.float16, "BFloat16": np.uint16,
               "Int64": np.int64, "Int32": np.int32, "Int16": np.int16, "Int8": np.int8, "UInt8": np.uint8,
               "Bool": np.bool_}
_CKPT_CRC_TRAILER = b"crc_num"  # MindSpore's optional trailer: b"crc_num" + 10 bytes


def _varint(f):
    value = shift = 0
    while True:
        byte = f.read(1)
        if not byte:
            raise EOFError
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7


def _fields(f, end):
    """(field number, wire type) of each protobuf field up to byte `end`, leaving `f` at the field's value."""
    while f.tell() < end:
        key = _varint(f)
        yield key >> 3, key & 7


def _skip(f, wire_type):
    if wire_type == 0:
        _varint(f)
    elif wire_type == 2:
        f.seek(_varint(f), os.SEEK_CUR)
    else:
        f.seek({1: 8, 5: 4}[wire_type], os.SEEK_CUR)


class CkptFile:
    """A MindSpore .ckpt read one tensor at a time.

    `mindspore.load_checkpoint` reads and parses the whole file at once: a second copy of the model. The format
    is a protobuf `Checkpoint` of repeated `Value {tag, TensorProto {dims, tensor_type, tensor_content}}` records
    (large tensors are split along axis 0 into consecutive records of the same tag), optionally followed by a
    CRC trailer. Opening it reads the records' headers and skips their data.
    """

    def __init__(self, path):
        self.path, self.entries = path, {}  # name -> [dims, tensor type, [(offset, length) of each slice]]
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                while f.tell() < size:
                    if f.read(1) != b"\x0a":  # field 1 (value), length-delimited
                        f.seek(-1, os.SEEK_CUR)
                        if f.read(len(_CKPT_CRC_TRAILER)) == _CKPT_CRC_TRAILER:
                            break
                        raise ValueError("unexpected bytes between records")
                    end = _varint(f) + f.tell()
                    if end > size:
                        raise EOFError
                    self._read_record(f, end)
        except (ValueError, KeyError, EOFError, UnicodeDecodeError) as e:
            raise WeightFileError(f"{path}: cannot be read as a MindSpore checkpoint ({e or 'truncated'}).") from None
        if not self.entries:
            raise WeightFileError(f"{path}: cannot be read as a MindSpore checkpoint (no tensors in it).")

    def _read_record(self, f, end):
        tag, dims, dtype, data = None, [], None, None
        for field, wire in _fields(f, end):
            if field == 1 and wire == 2:
                tag = f.read(_varint(f)).decode()
            elif field == 2 and wire == 2:
                tensor_end = _varint(f) + f.tell()
                for sub, sub_wire in _fields(f, tensor_end):
                    if sub == 1 and sub_wire == 2:  # packed dims
                        dims_end = _varint(f) + f.tell()
                        while f.tell() < dims_end:
                            dims.append(_varint(f))
                    elif sub == 1 and sub_wire == 0:
                        dims.append(_varint(f))
                    elif sub == 2 and sub_wire == 2:
                        dtype = f.read(_varint(f)).decode()
                    elif sub == 3 and sub_wire == 2:
                        length = _varint(f)
                        data = (f.tell(), length)
                        f.seek(length, os.SEEK_CUR)
                    else:
                        _skip(f, sub_wire)
            else:
                _skip(f, wire)
        if f.tell() != end or tag is None or dtype is None or data is None:
            raise ValueError("a malformed tensor record")
        if dtype not in CKPT_DTYPES:
            raise ValueError(f"tensor {tag} has the unsupported type {dtype}")
        entry = self.entries.setdefault(tag, [tuple(dims), dtype, []])
        entry[2].append(data)

    def shapes(self):
        return {name: dims for name, (dims, _, _) in self.entries.items()}

    def read(self, name):
        """Tensor `name` as a numpy array (bfloat16 as float32)."""
        dims, dtype, slices = self.entries[name]
        np_dtype = CKPT_DTYPES[dtype]
        array = np.empty(sum(length for _, length in slices) // np.dtype(np_dtype).itemsize, np_dtype)
        view, filled = array.view(np.uint8), 0
        with open(self.path, "rb") as f:
            for offset, length in slices:
                f.seek(offset)
                if f.readinto(view[filled:filled + length]) != length:
                    raise WeightFileError(f"{self.path}: truncated inside tensor {name}.")
                filled += length
        if array.size != int(np.prod(dims)):
            raise WeightFileError(f"{self.path}: tensor {name} holds {array.size} values for its shape {dims}.")
        array = array.reshape(dims)
        return bf16_to_float32(array) if dtype == "BFloat16" else array


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


class DiffusersFolder:
    """A diffusers SDXL folder seen as one checkpoint with sgm's names: each component's files are mapped
    through `DIFFUSERS_COMPONENTS` as LazyTensors, and a tensor is read (and stacked or transposed where the
    mapping says so) only when asked for."""

    def __init__(self, folder):
        self.tensors = {}  # sgm name -> LazyTensor
        for sub, (prefix, to_sgm) in DIFFUSERS_COMPONENTS.items():
            comp = os.path.join(folder, sub)
            if not os.path.isdir(comp):
                raise WeightFileError(f"{folder}: diffusers folder without {sub}/ (SDXL base needs unet, vae, "
                                      "text_encoder and text_encoder_2).")
            state = {}
            for file in map(SafetensorsFile, safetensors_files(comp)):
                state.update({name: LazyTensor(shape, functools.partial(file.read, name))
                              for name, shape in file.shapes().items()})
            try:
                mapped = to_sgm(state)
            except KeyError as e:
                raise WeightFileError(f"{comp}: not an SDXL {sub} (missing key {e}).") from None
            self.tensors.update({prefix + k: v for k, v in mapped.items()})

    def shapes(self):
        return {name: tensor.shape for name, tensor in self.tensors.items()}

    def read(self, name):
        return self.tensors[name].load()


def open_weights(path):
    """The checkpoint at `path` (single file, .ckpt or diffusers folder) as an object with `shapes()`
    ({sgm name: shape}, from headers) and `read(name)` (one tensor as a numpy array)."""
    return {"safetensors": SafetensorsFile, "ckpt": CkptFile, "diffusers": DiffusersFolder}[weight_format(path)](path)


def read_shapes(path):
    """{sgm name: shape} of a checkpoint, from headers only (no tensor data is read)."""
    return open_weights(path).shapes()


def layout_fingerprint(path):
    """16 hex digits of sha256 over a checkpoint's sorted names and shapes (headers only, any format): which model
    layout an embedding was trained on, recorded in its metadata. The same for two files of one layout."""
    lines = sorted(f"{name}:{list(shape)}" for name, shape in read_shapes(path).items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


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


def load_weights(model, path, prefix=""):
    """Load `path` (single file, diffusers folder or .ckpt) into `model`, strictly, one tensor at a time.

    Names and shapes are checked for the whole model before any tensor is read. Each tensor is read from the
    file, converted to its parameter's dtype and stored, so the peak is the model plus its largest tensor.
    With a `prefix` (e.g. "first_stage_model."), `model` is the part of the checkpoint's model whose names start
    with it (its parameters' names without it) and the checkpoint's other tensors are neither checked nor read.
    """
    from mindspore import Tensor

    params = {prefix + name: param for name, param in model.parameters_and_names()}
    weights = open_weights(path)
    found = {name: shape for name, shape in weights.shapes().items() if name.startswith(prefix)}
    check_shapes({k: tuple(p.shape) for k, p in params.items()}, found, path)
    for name, param in params.items():
        param.set_data(Tensor(np.ascontiguousarray(weights.read(name)), dtype=param.dtype))
    return model


def read_state_dict(path):
    """The whole checkpoint as {sgm name: np.ndarray} (for conversion), extras dropped."""
    weights = open_weights(path)
    return {name: weights.read(name) for name in weights.shapes() if name not in NON_WEIGHT_KEYS}
