"""Small helpers shared across `gm`: building objects from YAML configs, broadcasting, safe file writes, giving
memory back to the system."""
import argparse
import ctypes
import ctypes.util
import importlib
import os
import tempfile


def get_obj_from_str(string):
    """`"gm.models.diffusion.DiffusionEngine"` -> the class it names."""
    module, cls = string.rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)


def instantiate_from_config(config, **extra_params):
    """Build `config.target(**config.params, **extra_params)`, the sgm config schema."""
    if "target" not in config:
        raise KeyError(f"Expected key `target` to instantiate, got {dict(config)}")
    params = dict(config.get("params", None) or {})
    params.update(extra_params)
    return get_obj_from_str(config["target"])(**params)


def append_dims(x, target_dims):
    """Append trailing singleton dimensions until `x` has `target_dims` dimensions."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x.reshape(x.shape + (1,) * dims_to_append)


def default(value, fallback):
    return fallback if value is None else value


def atomic_write(path, write, suffix):
    """Run `write(tmp_path)` on a temporary file beside `path` (its name ending in `suffix`), then move it
    over `path`. On any failure the temporary files are removed and an existing `path` is left untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem = os.path.splitext(os.path.basename(path))[0]
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mindspore makes checkpoints read-only
        os.replace(tmp, path)
    except BaseException:
        # mindspore.save_checkpoint itself writes through "<name>.tmp"
        for leftover in (tmp, os.path.splitext(tmp)[0] + ".tmp"):
            if os.path.exists(leftover):
                os.remove(leftover)
        raise
    return path


def release_free_memory():
    """Give the C heap's free pages back to the system (glibc's `malloc_trim`; a no-op elsewhere).

    Compiling a large MindSpore graph allocates and frees gigabytes of compiler objects through malloc, which
    keeps the freed pages for itself: for the full-size UNet about 1 GB that the next graph (the VAE decoder)
    would otherwise add on top of."""
    libc = ctypes.util.find_library("c")
    if libc:
        trim = getattr(ctypes.CDLL(libc), "malloc_trim", None)
        if trim is not None:
            trim(0)


def release_weights(*cells):
    """Free the memory of `cells`' weights for the rest of the process; the cells cannot run again.

    A MindSpore graph that has run keeps its parameters alive, and its own memory, for as long as it is compiled,
    whatever Python still refers to. So each parameter's data is replaced by a one-element placeholder, then the
    resources of every compiled graph are freed (`mindspore.ms_memory_recycle`: graphs still in use compile again
    at their next call) and the C heap trimmed. Measured on the CPU: a 2 GB parameter's memory given back whole,
    where deleting its cell or replacing its data alone gave back nothing. Handles on a weight's storage kept
    elsewhere (`param.data`) keep it: let go of them first.
    """
    import gc

    import mindspore as ms
    import numpy as np

    empty = ms.Tensor(np.zeros((1,), np.float32))
    for cell in cells:
        for param in cell.get_parameters():
            param.set_data(empty.astype(param.dtype), slice_shape=True)
    gc.collect()  # cells the caller has let go of, and their graphs' hold on the weights
    ms.ms_memory_recycle()
    release_free_memory()


def str2bool(value):
    """A command-line flag's True/False (also 1/0, yes/no)."""
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")
