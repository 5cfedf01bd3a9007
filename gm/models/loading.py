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
    """Read a YAML config, with a clear error for a missing or malformed file."""
    if not os.path.isfile(path):
        raise WeightFileError(f"config not found: {path} (see configs/ for the shipped ones).")
    try:
        config = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise WeightFileError(f"{path}: not a valid YAML config ({e}).") from None
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
    text encoders. Parameters stay fp32 in every precision, and so does the VAE: SDXL's VAE overflows in fp16."""
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
    if weight:
        load_weights(model, weight)
        print(f"Loaded weights from {weight}")
    elif model.requires_weights:
        raise WeightFileError(f"this config needs the SDXL weights, and none were given (--weight). {WEIGHTS_HELP}")
    else:
        model.init_parameters_data()
        randomize_zero_initialized(model)
        print("!" * 88 + "\n!! No --weight given: this model runs from RANDOM initial weights. Its images are noise"
              "\n!! until trained; use it to try the machinery, not for pictures.\n" + "!" * 88, file=sys.stderr)
    model.set_train(False)
    return model


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
