"""The UNet run one layer at a time from the host, each distinct layer compiled once: how the full-size SDXL's
training step fits in 24 GB on the CPU.

Why: MindSpore 2.10's CPU backend compiles every layer instance of a graph on its own, and each compiled kernel
keeps memory of its own for the graph's life. One graph of the whole UNet's forward and backward passes costs
about 10 GB above the weights at full size, more than the machine has (benchmarks/README.md). Here the UNet's
forward pass is a list of stages (a ResBlock, a transformer block, a projection into or out of a transformer's
tokens, a resampling, ...). Stages of the same kind and weight shapes share one compiled graph: before a stage
runs, its own weights are swapped into the graph's parameters (`Parameter.set_data` shares their storage: no copy)
and swapped back after. 25 graphs serve the full-size UNet's 116 stages, each about the memory of one layer.

For training, `forward` keeps each stage's inputs and `backward` runs the stages in reverse, each through a graph
that recomputes it from its inputs and returns the gradients of its inputs only (the weights are frozen: no
weight gradient is computed anywhere). That is gradient checkpointing by layer: two forward passes and one
backward per step, the activations of one layer alive at a time.

The same code runs on Ascend, where it is not needed (one graph fits, and `lazy_inline` shares layers there); it
has only been run on the CPU.
"""
import mindspore as ms
from mindspore import nn, ops

from gm.modules.attention import SpatialTransformer
from gm.modules.diffusionmodules.openaimodel import ResBlock


class Stage(nn.Cell):
    """`fn(layer, *inputs)` as a cell of its own, so that it compiles as a graph of its own."""

    def __init__(self, layer, fn):
        super().__init__(auto_prefix=False)  # the layer's parameters keep their checkpoint names
        self.layer = layer
        self.fn = fn

    def construct(self, *inputs):
        return self.fn(self.layer, *inputs)


class InputGradients(nn.Cell):
    """The gradients of `stage`'s inputs for the gradient `dout` of its output: the stage runs again from its
    inputs inside this graph (nothing of the forward pass is kept), and no weight gradient is formed."""

    def __init__(self, stage):
        super().__init__(auto_prefix=False)
        self.stage = stage
        self.grads = ops.GradOperation(get_all=True, sens_param=True)

    def construct(self, *inputs_and_dout):
        return self.grads(self.stage)(*inputs_and_dout)


def _prepare(unet, x, timesteps, context, y):
    return unet.prepare(x, timesteps, context, y)


def _layer(layer, *inputs):
    return layer(*inputs)


def _skip_then_layer(layer, x, skip, *inputs):
    """An output block's first layer: the feature map and its skip connection, concatenated."""
    return layer(ops.cat([x, skip], axis=1), *inputs)


def _tokens_in(layer, x):
    return layer.tokens_in(x)


def _features_out(layer, tokens, x_in):
    return layer.features_out(tokens, x_in)


def _head(unet, h):
    return unet.out(h).astype(ms.float32)


def _network_inputs(denoiser, x, sigma):
    return denoiser.network_inputs(x, sigma)


def _combine(denoiser, output, x, c_skip, c_out):
    return denoiser.combine(output, x, c_skip, c_out)


def _signature(stage):
    """What makes two stages one graph: the function, every sub-cell's kind and head count, every weight's shape."""
    cells = tuple((type(cell).__name__, getattr(cell, "heads", None)) for _, cell in stage.layer.cells_and_names())
    weights = tuple((tuple(p.shape), p.dtype) for p in stage.layer.get_parameters())
    return stage.fn, cells, weights


class BlockwiseUNet:
    """`unet` (a `UNetModel`) run stage by stage: `forward(x, timesteps, context, y)` as the UNet's own call (its
    result in fp32), and with `keep=True` also a tape for `backward(tape, dout) -> (d context, d y)`."""

    def __init__(self, unet):
        self.unet = unet
        self.program = self._program(unet)  # [(stage, input value ids, output value ids)]
        self.params, self.weights, self.graph_of = {}, {}, {}
        self.graphs = {}  # signature -> [the stage whose cell is compiled, its InputGradients (made when needed)]
        for stage, _, _ in self.program:
            self.params[stage] = list(stage.layer.get_parameters())
            self.weights[stage] = [p.data for p in self.params[stage]]  # handles on each weight's storage
            self.graph_of[stage] = self.graphs.setdefault(_signature(stage), [stage, None])
        self.last_use = {i: k for k, (_, inputs, _) in enumerate(self.program) for i in inputs}
        # the values whose gradient `backward` needs: what context and y reach (not x's path before the first ResBlock)
        self.needs_grad = {2, 3}
        for _, inputs, outputs in self.program:
            if self.needs_grad.intersection(inputs):
                self.needs_grad.update(outputs)

    @staticmethod
    def _program(unet):
        """The UNet's forward pass (`UNetModel.construct`) as stages over numbered values: 0-3 are x, timesteps,
        context, y; `prepare` makes 4-6 (x, emb, context in the compute dtype)."""
        program = []
        count = [7]

        def add(layer, fn, inputs):
            out = count[0]
            count[0] += 1
            program.append((Stage(layer, fn), tuple(inputs), (out,)))
            return out

        def sequence(layers, h, emb, context, skip=None):
            for layer in layers:
                if isinstance(layer, SpatialTransformer):
                    tokens = add(layer, _tokens_in, [h])
                    for block in layer.transformer_blocks:
                        tokens = add(block, _layer, [tokens, context])
                    h = add(layer, _features_out, [tokens, h])
                elif skip is not None:  # an output block's first layer (a ResBlock in SDXL)
                    h = add(layer, _skip_then_layer, [h, skip] + ([emb] if isinstance(layer, ResBlock) else []))
                else:
                    h = add(layer, _layer, [h, emb] if isinstance(layer, ResBlock) else [h])
                skip = None
            return h

        program.append((Stage(unet, _prepare), (0, 1, 2, 3), (4, 5, 6)))
        h, emb, context, skips = 4, 5, 6, []
        for block in unet.input_blocks:
            h = sequence(block, h, emb, context)
            skips.append(h)
        h = sequence(unet.middle_block, h, emb, context)
        for block in unet.output_blocks:
            h = sequence(block, h, emb, context, skip=skips.pop())
        add(unet, _head, [h])
        return program

    def _run(self, stage, inputs, dout=None):
        """The stage's output (or, given the gradient `dout` of its output, its inputs' gradients) through the graph
        of its signature, with its own weights in it."""
        graph = self.graph_of[stage]
        compiled = graph[0]
        if dout is not None and graph[1] is None:
            graph[1] = InputGradients(compiled)
        swap = compiled is not stage
        if swap:
            for param, weight in zip(self.params[compiled], self.weights[stage]):
                param.set_data(weight)
        try:
            return compiled(*inputs) if dout is None else graph[1](*inputs, dout)
        finally:
            if swap:
                for param, weight in zip(self.params[compiled], self.weights[compiled]):
                    param.set_data(weight)

    def forward(self, x, timesteps, context, y, keep=False):
        """The UNet's output; with `keep`, (output, the tape: every stage's inputs) for `backward`."""
        values = {0: x, 1: timesteps, 2: context, 3: y}
        for k, (stage, inputs, outputs) in enumerate(self.program):
            result = self._run(stage, [values[i] for i in inputs])
            values.update(zip(outputs, result if len(outputs) > 1 else (result,)))
            if not keep:  # sampling: drop what no later stage reads
                for i in inputs:
                    if self.last_use[i] == k:
                        del values[i]
        out = values[self.program[-1][2][0]]
        return (out, values) if keep else out

    def backward(self, values, dout):
        """(d context, d y) for the gradient `dout` of the forward pass's output; `values` is its tape."""
        grads = {self.program[-1][2][0]: dout}
        for stage, inputs, outputs in reversed(self.program):
            if not any(i in grads for i in outputs):
                continue
            douts = [grads.pop(i) if i in grads else ops.zeros_like(values[i]) for i in outputs]
            # mutable: a plain tuple of Tensors is a constant to the graph, which would compile again at every call
            dout = douts[0] if len(douts) == 1 else ms.mutable(tuple(douts))
            input_grads = self._run(stage, [values[i] for i in inputs], dout)
            for i, grad in zip(inputs, input_grads):
                if i in self.needs_grad:
                    grads[i] = grads[i] + grad if i in grads else grad
        return grads[2], grads[3]


class BlockwiseDenoiser:
    """The samplers' `denoise(x, sigma, cond)` (as `BoundDenoiser`'s) with the UNet run layer by layer: the
    denoiser's scalings before and after it are graphs of their own. For sampling the full-size model on the CPU."""

    def __init__(self, denoiser, network):
        self.network_inputs = Stage(denoiser, _network_inputs)
        self.combine = Stage(denoiser, _combine)
        self.unet = BlockwiseUNet(network.diffusion_model)

    def denoise(self, x, sigma, cond):
        network_x, c_noise, c_skip, c_out = self.network_inputs(x, sigma)
        output = self.unet.forward(network_x, c_noise, cond["crossattn"], cond["vector"])
        return self.combine(output, x, c_skip, c_out)
