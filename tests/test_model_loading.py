"""`gm.models.loading`: config files that are not configs, and random initial weights that follow the seed."""
import os

import mindspore as ms
import numpy as np
import pytest

from gm.models.loading import create_model, load_config
from gm.weights.loader import WeightFileError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "inference", "sd_xl_tiny.yaml")


def test_a_binary_file_as_config_is_refused_in_one_line(tmp_path):
    weights = os.path.join(ROOT, "checkpoints", "sd_xl_tiny_shapes.safetensors")
    with pytest.raises(WeightFileError, match=r"sd_xl_tiny_shapes\.safetensors: a binary file, not a YAML config"):
        load_config(weights)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"model: caf\xe9\n")  # not UTF-8, and no NUL byte
    with pytest.raises(WeightFileError, match="latin1.yaml: not a valid YAML config") as error:
        load_config(str(latin1))
    assert "\n" not in str(error.value)


def parameters(model):
    return {name: p.asnumpy() for name, p in model.parameters_and_names()}


def test_random_initial_weights_follow_the_seed():
    """The same MindSpore seed (the scripts' --seed) gives the same random model, whatever NumPy's global
    generator did in between; another seed another model. The caller's NumPy generator is left as it was."""
    ms.set_seed(7)
    first = parameters(create_model(load_config(TINY)))
    np.random.rand(3)  # other code drawing from NumPy's global generator
    state = np.random.get_state()[1].copy()
    again = parameters(create_model(load_config(TINY)))
    assert np.array_equal(np.random.get_state()[1], state)
    assert all(np.array_equal(first[name], again[name]) for name in first)
    ms.set_seed(8)
    other = parameters(create_model(load_config(TINY)))
    different = [name for name in first if not np.array_equal(first[name], other[name])]
    assert len(different) > len(first) // 2
