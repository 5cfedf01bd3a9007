"""Choosing the MindSpore device, execution mode and compute precision, the same way for every command
(training, sampling on the command line and on the web page, benchmarks).

The Ascend choices here (fp16 by default, flash attention and native convolution in `gm.modules.layers`) follow
MindSpore's documentation and MindONE's SDXL defaults; they cannot be run on the project's CPU machines.
"""
import contextlib
import os

DEVICE_TARGETS = ("auto", "Ascend", "GPU", "CPU")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def default_device_target():
    """Ascend when the CANN toolkit is installed (the users' hardware), else CPU.

    Looked up from the toolkit's environment and install folder rather than by loading MindSpore's Ascend
    plugin, which prints an error on machines without one. GPU must be asked for by name.
    """
    if os.environ.get("ASCEND_HOME_PATH") or os.environ.get("ASCEND_OPP_PATH") or os.path.isdir("/usr/local/Ascend"):
        return "Ascend"
    return "CPU"


def default_precision(device_target):
    """fp16 on Ascend (its matrix units' type, half the weight memory), fp32 elsewhere (the CPU has no fast fp16)."""
    return "fp16" if device_target == "Ascend" else "fp32"


def keeps_graph_memory(device_target):
    """Whether memory a graph once used stays with the process for its life. On the CPU, MindSpore's memory pool
    never gives memory back to the system, so work done once (encoding the training images) runs in a child
    process there. On Ascend and GPU the pool is device memory, reserved at start and reused by the next graph."""
    return device_target == "CPU"


def add_device_arguments(parser):
    """The flags every command shares: --device_target, --ms_mode, --precision (resolve with `resolve_device`)."""
    group = parser.add_argument_group("device")
    group.add_argument("--device_target", choices=DEVICE_TARGETS, default="auto",
                       help="where to run; auto: Ascend when its toolkit is installed, else CPU (default: %(default)s)")
    group.add_argument("--ms_mode", type=int, choices=(0, 1), default=0,
                       help="MindSpore execution mode: 0 graph (compiled, fast; default), 1 PyNative")
    group.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="compute dtype of the frozen UNet and text encoders, which are also held in it; the VAE "
                            "and learned rows stay fp32. auto: fp16 on Ascend, fp32 elsewhere (default: %(default)s)")
    return group


def resolve_device(device_target="auto", precision="auto"):
    """(device target, precision) with "auto" replaced; ValueError for a combination MindSpore cannot run."""
    if device_target not in DEVICE_TARGETS:
        raise ValueError(f"--device_target must be one of {', '.join(DEVICE_TARGETS)}, got {device_target!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    target = default_device_target() if device_target == "auto" else device_target
    precision = default_precision(target) if precision == "auto" else precision
    if precision == "bf16" and target == "CPU":
        raise ValueError("--precision bf16 needs Ascend (MindSpore has no CPU kernels for it); use fp32 or fp16 on CPU.")
    return target, precision


@contextlib.contextmanager
def eager_mode():
    """MindSpore's PyNative mode inside the block, the mode before it after: cells run op by op, each tensor freed
    once unreferenced, and no compiled graph keeps memory (for work in pieces of many sizes: `gm.vae_tiling`)."""
    import mindspore as ms

    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        yield
    finally:
        ms.set_context(mode=mode)


def set_device(device_target="auto", ms_mode=0):
    """Set MindSpore's device and mode (0 graph, 1 PyNative); returns the device target used."""
    import mindspore as ms  # here, so that a command's --help and flag errors answer without loading MindSpore

    target, _ = resolve_device(device_target)
    ms.set_context(mode=ms.GRAPH_MODE if ms_mode == 0 else ms.PYNATIVE_MODE)
    try:
        ms.set_device(target)
    except RuntimeError as e:
        raise ValueError(f"--device_target {target}: not usable with this MindSpore installation "
                         f"({str(e).splitlines()[0]})") from None
    return target
