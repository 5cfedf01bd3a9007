"""Building SDXL from a config file and filling it with weights: the one entry point that training,
sampling and tools share."""
import os
import sys

import numpy as np
import yaml
import mindspore as ms
from mindspore import Tensor
from mindspore.nn.utils import no_init_parameters
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gm.util import get_obj_from_str, instantiate_from_config
from gm.weights.loader import WEIGHTS_HELP, WeightFileError, load_weights


def load_config(path):
    """Read a YAML config, with a clear one-line error for a missing, binary or malformed file."""
    if not os.path.isfile(path):
        raise WeightFileError(f"config not found: {path} (see configs/ for the shipped ones).")
    with open(path, "rb") as f:
        binary = b"\x00" in f.read(8192)  # e.g. a weights file: say so rather than decode gigabytes as text
    if binary:
        raise WeightFileError(f"{path}: a binary file, not a YAML config (weights are given with --weight).")
    try:
        config = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError, UnicodeDecodeError) as e:
        raise WeightFileError(f"{path}: not a valid YAML config ({' '.join(str(e).split())}).") from None
    if "model" not in config or "target" not in config.model:
        raise WeightFileError(f"{path}: not a model config (no model.target).")
    return config


def model_parameter_shapes(model_config):
    """{name: shape} of the model a config describes, without allocating its weights."""
    with no_init_parameters():
        model = instantiate_from_config(model_config)
    return {name: tuple(p.shape) for name, p in model.parameters_and_names()}


PRECISIONS = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}


def runtime_model_config(model_config, precision="fp32", recompute=False):
    """The model config as a plain dict, with the compute dtype and recompute flag set on the UNet and the
    text encoders. The VAE stays fp32 in every precision: SDXL's VAE overflows in fp16."""
    from gm.modules.encoders.modules import TextEmbedder

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    config = OmegaConf.to_container(model_config, resolve=True)
    params = config["params"]
    dtype = PRECISIONS[precision]
    params["network_config"].setdefault("params", {}).update(dtype=dtype, use_recompute=recompute)
    for entry in params["conditioner_config"]["params"]["emb_models"]:
        if issubclass(get_obj_from_str(entry["target"]), TextEmbedder):
            entry.setdefault("params", {}).update(dtype=dtype, use_recompute=recompute)
    return config


def create_model(config, weight=None, precision="fp32", recompute=False):
    """Instantiate `config.model` in `precision` and load `weight` into it.

    Without `weight`, a config marked `requires_weights` (the real SDXL) refuses to run; a small config
    runs from random initial weights, which is said loudly. The model is built without allocating its
    parameters: they get their memory from the weights (without weights, from their initialisers), so the
    real SDXL is neither initialised randomly only to be overwritten nor allocated at all when it refuses.
    """
    with no_init_parameters():
        model = instantiate_from_config(runtime_model_config(config.model, precision, recompute))
    store_in_compute_dtype(model, PRECISIONS[precision])
    if weight:
        load_weights(model, weight)
        print(f"Loaded weights from {weight}")
    elif model.requires_weights:
        raise WeightFileError(f"this config needs the SDXL weights, and none were given (--weight). {WEIGHTS_HELP}")
    else:
        # the same seed gives the same random model: MindSpore's global seed (the scripts' --seed sets it), else 0
        seed = ms.get_seed() or 0
        numpy_state = np.random.get_state()
        np.random.seed(seed)  # MindSpore's initialisers draw from NumPy's global generator
        try:
            model.init_parameters_data()
        finally:
            np.random.set_state(numpy_state)
        randomize_zero_initialized(model, seed=seed)
        print("!" * 88 + f"\n!! No weights: this model runs from RANDOM initial weights (seed {seed}). Its images are"
              "\n!! noise until trained; use it to try the machinery, not for pictures.\n" + "!" * 88, file=sys.stderr)
    model.set_train(False)
    return model


def store_in_compute_dtype(model, dtype):
    """Hold the frozen UNet's and text encoders' matrices, kernels and token tables in the compute dtype (fp16 /
    bf16 halve the weight memory, and no layer casts its weight at each call). Vectors (biases, norm scales: 0.1%
    of the bytes) stay fp32, as the norms compute in fp32; so do the VAE and the rows textual inversion learns,
    which are added later. Called before the weights are loaded, so each is converted once, as it is read."""
    if dtype == ms.float32:
        return
    for cell in (model.model, *model.conditioner.text_embedders()):
        for param in cell.get_parameters():
            if param.ndim >= 2:
                param.set_dtype(dtype)


def randomize_zero_initialized(model, std=0.02, seed=0):
    """Give small random values to parameters that start at exactly zero.

    sgm zero-initialises the UNet's output projections (right for training from scratch); a model that runs
    from random weights would then predict eps = 0 for every prompt, and no gradient would reach a learned
    embedding. Norm biases and other zero-started parameters get the same small noise, harmlessly.
    """
    rng = np.random.RandomState(seed)
    for _, param in model.parameters_and_names():
        value = param.asnumpy()
        if not value.any():
            param.set_data(Tensor(rng.normal(0.0, std, value.shape).astype(np.float32), param.dtype))
