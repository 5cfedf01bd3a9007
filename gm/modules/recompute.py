"""Recomputing the UNet's blocks in the backward pass (gradient checkpointing), chosen per device here.

On Ascend and GPU it is MindSpore's own (`Cell.recompute()`, as MindONE does; not runnable here). On the CPU
backend of MindSpore 2.10 that does nothing (it warns "Can not find the nodes to depend"), so there a block runs
through `Recompute`, written by hand: it keeps only the block's inputs, and its backward pass runs the block again
from them and differentiates that second run. It lowers the activations held at once (MindSpore's memory pool) to
about one block's; but every compiled kernel also keeps memory of its own, and the recomputed copies add kernels:
benchmarks/README.md has what that nets at small and at full size.
"""
from mindspore import nn, ops

from gm.modules.layers import on_cpu


class Recompute(nn.Cell):
    """`block(x, y)` (a ResBlock's (x, emb), a transformer block's (x, context)) whose backward recomputes it."""

    def __init__(self, block):
        super().__init__()
        # Held, not owned: the block stays registered where the model has it, under its checkpoint names.
        object.__setattr__(self, "block", block)
        self.input_grads = ops.GradOperation(get_all=True, sens_param=True)

    def construct(self, x, y):
        return self.block(x, y)

    def bprop(self, x, y, out, dout):
        # x after dout: the second run must happen in the backward pass. Fed the forward's own x, the graph would
        # merge the two identical runs and keep the forward's activations after all.
        x = ops.depend(x, dout)
        return self.input_grads(self.block)(x, y, dout)


def recomputed(block):
    """What a container calls for `block` when recomputing: on the CPU a `Recompute` wrapper, elsewhere the block
    itself, marked for MindSpore's recomputation."""
    if on_cpu():
        return Recompute(block)
    block.recompute()
    return block
