"""Test-wide setup: MindSpore in graph mode on the CPU, the mode users run in."""
import os
import sys

import mindspore as ms
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ms.set_context(mode=ms.GRAPH_MODE)
ms.set_device("CPU")


@pytest.fixture(scope="session")
def root():
    return ROOT
