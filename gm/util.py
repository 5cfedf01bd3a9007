"""Small helpers shared across `gm`: building objects from YAML configs and broadcasting."""
import importlib



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
