"""Test-wide setup: MindSpore in graph mode on the CPU, the mode users run in, and the tiny reference SDXL."""
import os
import sys

import mindspore as ms
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ms.set_context(mode=ms.GRAPH_MODE)
ms.set_device("CPU")

# The CPU's convolution kernel choice, timed once for the whole run: the test processes and the commands the tests
# start inherit the answer through the environment (`gm.modules.layers.NATIVE_CONV_FAST_ENV`).
from gm.modules.layers import native_conv_is_fast  # noqa: E402

native_conv_is_fast()

# The commands the tests start compile their graphs (no compile cache shared between tests: a test's graphs must not
# depend on which tests ran before it); tests/test_compile_cache.py turns it on, in folders of its own.
os.environ.setdefault("SDXL_TI_COMPILE_CACHE", "off")

# The suite runs in two processes (pytest.ini: pytest-xdist, a file at a time, to whichever is free). The files
# that take longest go first, so that neither process is left with a long file at the end while the other idles.
LONGEST_FIRST = ("test_train_textual_inversion.py", "test_sampling.py", "test_benchmarks.py", "test_pretrain_tiny.py",
                 "test_frozen_backward.py", "test_evaluate_embedding.py", "test_vae.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = os.path.basename(str(item.path))
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order


@pytest.fixture(scope="session")
def root():
    return ROOT


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """The tiny PyTorch reference SDXL (tests/reference.py), written once as a diffusers folder and a single file."""
    from reference import write_tiny_sdxl  # torch and diffusers load only for the tests that use them

    return write_tiny_sdxl(str(tmp_path_factory.mktemp("tiny_sdxl")))


@pytest.fixture(scope="session")
def tiny_model(tiny_sdxl):
    """The tiny DiffusionEngine loaded from the reference's diffusers folder, shared so that each of its graphs
    (UNet, VAE encoder, decoder) compiles once per session."""
    from gm.models.loading import create_model, load_config

    return create_model(load_config(os.path.join(ROOT, "configs", "inference", "sd_xl_tiny.yaml")),
                        weight=tiny_sdxl.diffusers_folder)
