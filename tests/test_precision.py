"""fp16 storage of the frozen weights: the UNet's and text encoders' matrices held in the compute dtype give
the same result as fp32 weights cast to fp16 inside the graph, at half the weight memory."""
import os

import mindspore as ms
import numpy as np
from mindspore import Tensor
from mindspore.nn.utils import no_init_parameters

from reference import sgm_vector, tiny_unet_inputs
from gm.models.loading import create_model, load_config, runtime_model_config
from gm.util import instantiate_from_config
from gm.weights.loader import load_weights

TINY = "configs/inference/sd_xl_tiny.yaml"


def test_fp16_storage_equals_fp16_casting(root, tiny_sdxl):
    config = load_config(os.path.join(root, TINY))
    stored = create_model(config, tiny_sdxl.diffusers_folder, precision="fp16")
    with no_init_parameters():  # the design before: fp32 parameters, cast to fp16 in every layer at every call
        cast = instantiate_from_config(runtime_model_config(config.model, "fp16"))
    load_weights(cast, tiny_sdxl.diffusers_folder)

    frozen = [stored.model, *stored.conditioner.text_embedders()]
    for cell in frozen:
        for name, param in cell.parameters_and_names():
            assert param.dtype == (ms.float16 if param.ndim >= 2 else ms.float32), name
    assert {p.dtype for p in stored.first_stage_model.get_parameters()} == {ms.float32}  # the VAE stays fp32
    stored_bytes = sum(p.nbytes for cell in frozen for p in cell.get_parameters())
    cast_bytes = sum(p.nbytes for cell in (cast.model, *cast.conditioner.text_embedders()) for p in cell.get_parameters())
    assert stored_bytes < 0.52 * cast_bytes

    x, t, context, pooled, time_ids = tiny_unet_inputs(np.random.default_rng(0), 8)
    inputs = [Tensor(a) for a in (x, t, context, sgm_vector(pooled, time_ids))]
    ours = stored.model.diffusion_model(*inputs).asnumpy()
    reference = cast.model.diffusion_model(*inputs).asnumpy()
    assert np.isfinite(ours).all() and np.abs(ours).max() > 0.1
    np.testing.assert_array_equal(ours, reference)
