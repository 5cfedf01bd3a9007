"""Learned textual-inversion embeddings on disk: the rows added to both SDXL text encoders.

Formats:
- "ckpt": ours, a MindSpore checkpoint with tensors `clip_l` [n, 768] and `clip_g` [n, 1280] and the
  entries `token` (str) and `num_vectors` (int); written with a CRC so corruption is caught.
- "safetensors": the SDXL community format {"clip_l": [n, 768], "clip_g": [n, 1280]} that kohya
  sd-scripts writes and A1111 / ComfyUI / diffusers read; we add the token to the metadata
  (readers that ignore it use the file name as the token).
- "diffusers": what diffusers' textual_inversion_sdxl.py writes: `learned_embeds.safetensors`
  (encoder 1) and `learned_embeds_2.safetensors` (encoder 2), each {token: [n, d]}.
All are written in float32 and atomically (a temporary file in the same folder, then os.replace). A .ckpt or
.safetensors file is read back before it replaces anything: a file that does not read back as written, or whose
embedding as read back fails the caller's `verify` (the trainer's: its word changes the text encoding), is an error,
and the previous file stays. Both carry the training's facts as string metadata (`metadata`: base model, step,
learning rate, seed, the project's version), which `load_embedding` returns.
"""
import dataclasses
import os
import struct

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

import mindspore as ms

from gm.util import atomic_write
from gm.weights.loader import safetensors_tensor

DIFFUSERS_FILES = ("learned_embeds.safetensors", "learned_embeds_2.safetensors")
FORMATS = ("ckpt", "safetensors", "diffusers")


class EmbeddingFormatError(ValueError):
    """An embedding file that cannot be used; the message names the file."""


@dataclasses.dataclass
class LearnedEmbedding:
    token: str
    clip_l: np.ndarray  # [n, d1] float32 rows for the CLIP ViT-L text encoder
    clip_g: np.ndarray  # [n, d2] float32 rows for the OpenCLIP bigG text encoder
    source: str  # the path it was read from
    format: str = "ckpt"
    metadata: dict = dataclasses.field(default_factory=dict)  # training facts stored with it (strings)

    @property
    def num_vectors(self):
        return self.clip_l.shape[0]

    def describe(self):
        """One line for the user: the word, its vectors, its file and, when stored with it, how it was trained."""
        line = f"{self.token} ({self.num_vectors} vectors) from {os.path.basename(self.source)}"
        facts = self.metadata
        if "step" in facts:
            line += (f": {facts['step']} steps on {facts.get('base_config', '?')} (layout "
                     f"{facts.get('base_layout', '?')}), learning rate {facts.get('learning_rate', '?')}, seed "
                     f"{facts.get('seed', '?')}, {facts.get('trainer', '?')}")
        return line


def _rows(clip_l, clip_g, source):
    """Both encoders' rows as float32 [n, d] arrays with the same n; a lone vector [d] counts as [1, d]."""
    arrays = []
    for name, value in (("clip_l", clip_l), ("clip_g", clip_g)):
        value = np.asarray(value)
        if value.ndim == 1:
            value = value[None]
        if value.ndim != 2 or value.shape[0] < 1 or not np.issubdtype(value.dtype, np.floating):
            raise EmbeddingFormatError(
                f"{source}: {name} must be a float array [num_vectors, width], got {value.dtype} {value.shape}")
        if not np.isfinite(value).all():  # a diverged training: its images would be black
            raise EmbeddingFormatError(f"{source}: {name} holds NaN or infinite values; this embedding is unusable.")
        arrays.append(np.ascontiguousarray(value, dtype=np.float32))
    if arrays[0].shape[0] != arrays[1].shape[0]:
        raise EmbeddingFormatError(
            f"{source}: inconsistent vector counts: "
            f"clip_l has {arrays[0].shape[0]} vectors, clip_g {arrays[1].shape[0]}")
    return arrays


# ---------------------------------------------------------------------------------------------- writing

def _write_safetensors(path, tensors, metadata, expected=None, verify=None):
    def write(tmp):
        safetensors.numpy.save_file(tensors, tmp, metadata=metadata)
        if expected is not None:
            _check_read_back(_load_safetensors(tmp), expected, path, verify)
    atomic_write(path, write, ".safetensors")


def _check_ckpt_name(path):
    if not path.endswith(".ckpt"):
        raise EmbeddingFormatError(f"{path}: MindSpore only reads and writes checkpoints named *.ckpt (lower case)")


def _write_ckpt(path, expected, verify):
    params = [{"name": name, "data": ms.Tensor(getattr(expected, name))} for name in ("clip_l", "clip_g")]
    extras = dict(expected.metadata, token=expected.token, num_vectors=int(expected.num_vectors))

    def write(tmp):  # mindspore appends ".ckpt" to a name without it: the temporary name must end with it
        ms.save_checkpoint(params, tmp, append_dict=extras, crc_check=True)
        _check_read_back(_load_ckpt(tmp), expected, path, verify)
    atomic_write(path, write, ".ckpt")


def _check_read_back(found, expected, path, verify):
    """Raise EmbeddingFormatError unless the embedding read back from a just-written file is the one written and
    passes `verify` (None, or what is wrong with it)."""
    problems = [f"{name} {getattr(found, name).dtype} {getattr(found, name).shape} differs from the "
                f"{getattr(expected, name).dtype} {getattr(expected, name).shape} rows written"
                for name in ("clip_l", "clip_g") if not np.array_equal(getattr(found, name), getattr(expected, name))]
    if found.token != expected.token:
        problems.append(f"token {found.token!r} instead of {expected.token!r}")
    if found.metadata != expected.metadata:
        problems.append(f"metadata {found.metadata} instead of {expected.metadata}")
    if problems:
        raise EmbeddingFormatError(f"{path}: the file written does not read back as written ({'; '.join(problems)}); "
                                   "it was not saved, and the previous file there is kept.")
    problem = verify(found) if verify is not None else None
    if problem:
        raise EmbeddingFormatError(f"{path}: {problem}; it was not saved, and the previous file there is kept.")


def save_embedding(path, clip_l, clip_g, token, format=None, metadata=None, verify=None):
    """Write both encoders' rows ([n, d1], [n, d2]) for `token`; returns `path`.

    `format` (one of FORMATS) defaults to the one the extension names: .ckpt or .safetensors (the
    SDXL community format). "diffusers" treats `path` as a folder and writes its two files there. `metadata`:
    training facts ({name: string}) stored in a .ckpt or .safetensors file. `verify(embedding)`: a further check of
    a .ckpt or .safetensors file's embedding as read back, None if it passes, else what is wrong.
    """
    if not token or not isinstance(token, str):
        raise ValueError(f"token must be a non-empty string, got {token!r}")
    if format is None:
        format = {".ckpt": "ckpt", ".safetensors": "safetensors"}.get(os.path.splitext(path)[1].lower())
        if format is None:
            raise EmbeddingFormatError(f"{path}: cannot tell the format from the extension; use .ckpt or .safetensors")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "ckpt":
        _check_ckpt_name(path)
    clip_l, clip_g = _rows(clip_l, clip_g, path)
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    reserved = sorted(set(metadata) & {"token", "num_vectors", "clip_l", "clip_g"})
    if reserved:
        raise ValueError(f"metadata may not name {', '.join(reserved)}: the file's own entries")
    expected = LearnedEmbedding(token, clip_l, clip_g, path, format, metadata)

    if format == "ckpt":
        _write_ckpt(path, expected, verify)
    elif format == "safetensors":
        _write_safetensors(path, {"clip_l": clip_l, "clip_g": clip_g},
                           dict(metadata, token=token, num_vectors=str(clip_l.shape[0])), expected, verify)
    else:
        for name, rows in zip(DIFFUSERS_FILES, (clip_l, clip_g)):
            _write_safetensors(os.path.join(path, name), {token: rows}, {"format": "pt"})
    return path


# ---------------------------------------------------------------------------------------------- reading

def _sniff(path):
    """'safetensors', 'pickle' (a PyTorch .pt/.bin/.ckpt) or None, from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < os.path.getsize(path):
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # zip (torch.save) or a bare pickle
        return "pickle"
    return None


def _read_safetensors(path):
    """({name: array}, metadata) of a safetensors file."""
    try:
        with safe_open(path, framework="np") as f:
            metadata = f.metadata() or {}
            tensors = {name: safetensors_tensor(f, path, name) for name in f.keys()}
    except SafetensorError as e:
        raise EmbeddingFormatError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    return tensors, metadata


def _describe(tensors):
    return ", ".join(f"{k} {list(v.shape)}" for k, v in tensors.items()) or "no tensors"


def _check_num_vectors(declared, rows, path):
    if declared is not None and str(declared) != str(rows.shape[0]):
        raise EmbeddingFormatError(
            f"{path}: inconsistent vector counts: num_vectors says {declared}, the tensors hold {rows.shape[0]}")


def _diffusers_pair(path):
    """The (encoder 1, encoder 2) file names of a diffusers pair that `path` belongs to, or None."""
    folder, name = os.path.split(path)
    if "learned_embeds_2" in name:
        return os.path.join(folder, name.replace("learned_embeds_2", "learned_embeds", 1)), path
    if "learned_embeds" in name:
        return path, os.path.join(folder, name.replace("learned_embeds", "learned_embeds_2", 1))
    return None


def _single_tensor(path):
    tensors, _ = _read_safetensors(path)
    if len(tensors) != 1:
        raise EmbeddingFormatError(
            f"{path}: a diffusers embedding file holds one tensor {{token: [n, width]}}, found {_describe(tensors)}")
    return next(iter(tensors.items()))


def _load_diffusers(first, second, source):
    for file in (first, second):
        if not os.path.isfile(file):
            raise EmbeddingFormatError(
                f"{source}: a diffusers SDXL embedding needs both {os.path.basename(first)} (text encoder 1) and "
                f"{os.path.basename(second)} (text encoder 2); {file} is missing")
    token, clip_l = _single_tensor(first)
    token_2, clip_g = _single_tensor(second)
    if token != token_2:
        raise EmbeddingFormatError(
            f"{source}: the two diffusers files are for different tokens: {token!r} and {token_2!r}")
    return LearnedEmbedding(token, *_rows(clip_l, clip_g, source), source, "diffusers")


def _load_safetensors(path):
    tensors, metadata = _read_safetensors(path)
    if "clip_l" in tensors or "clip_g" in tensors:
        missing = [k for k in ("clip_l", "clip_g") if k not in tensors]
        if missing:
            raise EmbeddingFormatError(
                f"{path}: SDXL embedding without {' or '.join(missing)} (found {_describe(tensors)})")
        clip_l, clip_g = _rows(tensors["clip_l"], tensors["clip_g"], path)
        _check_num_vectors(metadata.get("num_vectors"), clip_l, path)
        token = metadata.get("token") or os.path.splitext(os.path.basename(path))[0]  # A1111: the name is the token
        facts = {k: v for k, v in metadata.items() if k not in ("token", "num_vectors")}
        return LearnedEmbedding(token, clip_l, clip_g, path, "safetensors", facts)
    pair = _diffusers_pair(path)
    if len(tensors) == 1 and pair is not None:
        return _load_diffusers(*pair, source=path)
    raise EmbeddingFormatError(
        f"{path}: not an SDXL embedding: it holds {_describe(tensors)}, but rows for both text encoders are needed "
        "(tensors 'clip_l' and 'clip_g', or diffusers' learned_embeds.safetensors + learned_embeds_2.safetensors). "
        "A single [n, 768] tensor is an SD 1.x embedding, which SDXL cannot use.")


def _load_ckpt(path):
    _check_ckpt_name(path)
    try:
        params = ms.load_checkpoint(path, crc_check=True)
    except ValueError as e:
        raise EmbeddingFormatError(f"{path}: not a readable MindSpore checkpoint (truncated or corrupt?): {e}") from e
    missing = [k for k in ("clip_l", "clip_g", "token") if k not in params]
    if missing:
        raise EmbeddingFormatError(f"{path}: not a textual-inversion embedding checkpoint: no {', '.join(missing)} "
                                   f"(found {', '.join(sorted(params)[:10])})")
    clip_l, clip_g = _rows(params["clip_l"].asnumpy(), params["clip_g"].asnumpy(), path)
    if "num_vectors" in params:
        _check_num_vectors(int(params["num_vectors"].asnumpy()), clip_l, path)
    facts = {k: v for k, v in params.items() if isinstance(v, str) and k != "token"}
    return LearnedEmbedding(str(params["token"]), clip_l, clip_g, path, "ckpt", facts)


def load_embedding(path, token=None):
    """Read an SDXL embedding in any of FORMATS (a folder means diffusers' two files in it).

    The token stored in the file is used unless `token` is given.
    """
    if os.path.isdir(path):
        embedding = _load_diffusers(*(os.path.join(path, name) for name in DIFFUSERS_FILES), source=path)
    elif not os.path.isfile(path):
        raise EmbeddingFormatError(f"embedding file not found: {path}")
    else:
        kind, ext = _sniff(path), os.path.splitext(path)[1].lower()
        if kind == "pickle":
            raise EmbeddingFormatError(f"{path}: a PyTorch pickle (.pt/.bin), which is not supported; "
                                       "convert it to safetensors ({'clip_l': [n, 768], 'clip_g': [n, 1280]})")
        if kind == "safetensors" or ext == ".safetensors":
            embedding = _load_safetensors(path)
        elif ext == ".ckpt":
            embedding = _load_ckpt(path)
        else:
            raise EmbeddingFormatError(f"{path}: neither a safetensors file nor a MindSpore .ckpt")
    if token is not None:
        embedding = dataclasses.replace(embedding, token=token)
    return embedding


def check_widths(embedding, width_l, width_g):
    """Raise EmbeddingFormatError unless the rows fit text encoders of widths (width_l, width_g)."""
    found = (embedding.clip_l.shape[1], embedding.clip_g.shape[1])
    if found != (width_l, width_g):
        hint = " (clip_l and clip_g look swapped)" if found == (width_g, width_l) else ""
        raise EmbeddingFormatError(
            f"{embedding.source}: embedding widths clip_l {found[0]}, clip_g {found[1]} do not fit this model's text "
            f"encoders ({width_l}, {width_g}){hint}; it was trained for a different model")
