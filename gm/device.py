"""Choosing the MindSpore device and execution mode, the same way for every command."""
import os

import mindspore as ms

DEVICE_TARGETS = ("auto", "Ascend", "GPU", "CPU")


def default_device_target():
    """Ascend when the CANN toolkit is installed (the users' hardware), else CPU.

    Looked up from the toolkit's environment and install folder rather than by loading MindSpore's Ascend
    plugin, which prints an error on machines without one. GPU must be asked for by name.
    """
    if os.environ.get("ASCEND_HOME_PATH") or os.environ.get("ASCEND_OPP_PATH") or os.path.isdir("/usr/local/Ascend"):
        return "Ascend"
    return "CPU"


def set_device(device_target="auto", ms_mode=0):
    """Set MindSpore's device and mode (0 graph, 1 PyNative); returns the device target used."""
    if device_target not in DEVICE_TARGETS:
        raise ValueError(f"device_target must be one of {', '.join(DEVICE_TARGETS)}, got {device_target!r}")
    target = default_device_target() if device_target == "auto" else device_target
    ms.set_context(mode=ms.GRAPH_MODE if ms_mode == 0 else ms.PYNATIVE_MODE)
    ms.set_device(target)
    return target
