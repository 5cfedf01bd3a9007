"""The backward pass of a frozen model (textual inversion: input gradients only) against PyTorch, and what it keeps.

- convolution: the im2col and the native convolution's input gradient (weights frozen) and, for training, their
  weight gradient equal torch's; with the weight frozen the graph keeps none of the unfolded input columns; the
  CPU's choice between them.
- attention: `ChunkedAttention` (probabilities recomputed in the backward, query chunk by query chunk) equals torch
  and the plain autodiff path, forward and gradients, and keeps far less than the plain path.
- the tiny UNet's output and its gradients with respect to its text context and pooled text embedding equal
  diffusers'; blocks recomputed in the backward pass give the stored blocks' output and gradients (and the UNet
  recomputes every ResBlock and transformer block), keeping only their inputs.
- what is computed from parameters (a weight reshaped or broadcast) is computed after the input, and freed.
- the UNet's attention projections (a batched product per projection) equal torch and keep no per-sample copy of
  their weight for the backward pass.
- the UNet's transformer changes layouts through its products' transpose flags: it keeps far less than the same
  blocks with Transpose kernels.
"""
import os
import re
import subprocess
import sys
import textwrap

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import Tensor

from gm.modules import layers
from gm.modules.layers import Conv2d, attention


def assert_close(ours, expected, rel=1e-4):
    """Max absolute difference within `rel` of the expected array's largest magnitude."""
    expected = np.asarray(expected)
    assert ours.shape == expected.shape
    scale = np.abs(expected).max()
    assert scale > 0
    assert np.abs(ours - expected).max() <= rel * scale, (np.abs(ours - expected).max(), scale)


def make_conv(weight, bias, stride, padding, trainable, impl="im2col"):
    out_channels, in_channels, kernel, _ = weight.shape
    conv = Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, impl=impl)
    conv.weight.set_data(Tensor(weight))
    conv.bias.set_data(Tensor(bias))
    for param in conv.get_parameters():
        param.requires_grad = trainable
    return conv


CONV_CASES = [  # batch, in, out, height, width, kernel, stride, padding
    (1, 4, 6, 8, 8, 3, 1, 1),
    (2, 4, 6, 7, 9, 3, 1, 1),
    (1, 4, 6, 8, 8, 3, 2, 1),  # the UNet's Downsample, even size
    (2, 4, 6, 9, 7, 3, 2, 1),  # odd sizes: the last row and column are in no window's last position
    (2, 4, 6, 9, 8, 3, 2, 0),  # the VAE's Downsample (after its own right/bottom pad)
    (1, 4, 6, 5, 5, 1, 1, 0),
    (2, 4, 6, 5, 5, 1, 1, 0),
]


@pytest.mark.parametrize("batch, cin, cout, height, width, kernel, stride, padding, per_product, impl", (
    [case + (None, "im2col") for case in CONV_CASES]  # the whole batch in one product
    + [case + (1, "im2col") for case in CONV_CASES if case[0] > 1]  # a product per sample
    + [(5, 4, 6, 7, 9, 3, 1, 1, 2, "im2col"), (3, 4, 6, 5, 5, 1, 1, 0, 2, "im2col")]  # groups of 2, the last of 1
    + [case + (None, "native") for case in CONV_CASES[1::2]]))  # the CPU's own kernel (`"auto"`: small ones)
def test_frozen_conv_input_gradient_matches_torch(monkeypatch, batch, cin, cout, height, width, kernel, stride, padding,
                                                  per_product, impl):
    """im2col: the samples in groups, a product each, as many per product as the weight's copies allow; and the
    native kernel."""
    if per_product is not None:  # read when the graph is built
        monkeypatch.setattr(layers, "WEIGHT_COPIES_BYTES", per_product * cout * cin * kernel * kernel * 4)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, cin, height, width)).astype(np.float32)
    weight = rng.standard_normal((cout, cin, kernel, kernel)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    conv = make_conv(weight, bias, stride, padding, trainable=False, impl=impl)
    x_t = torch.tensor(x, requires_grad=True)
    y_t = torch.nn.functional.conv2d(x_t, torch.tensor(weight), torch.tensor(bias), stride, padding)
    upstream = rng.standard_normal(tuple(y_t.shape)).astype(np.float32)
    (y_t * torch.tensor(upstream)).sum().backward()

    def loss(x):
        return (conv(x) * Tensor(upstream)).sum()

    assert_close(conv(Tensor(x)).asnumpy(), y_t.detach().numpy())
    assert_close(ms.jit(ms.grad(loss, grad_position=0))(Tensor(x)).asnumpy(), x_t.grad.numpy())


@pytest.mark.parametrize("impl", ["im2col", "native"])
@pytest.mark.parametrize("stride, padding, batch", [(1, 1, 2), (2, 1, 2), (1, 1, 1), (1, 0, 1)])
def test_trainable_conv_gets_weight_gradients(stride, padding, batch, impl):
    """The same Conv2d trains weights (tools/pretrain_tiny_sdxl.py): weight and bias gradients equal torch's, the
    im2col form's through its batched product (batch 2) and through `WeightProduct` (batch 1)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, 3, 7, 8)).astype(np.float32)
    weight = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    conv = make_conv(weight, bias, stride, padding, trainable=True, impl=impl)
    w_t, b_t = torch.tensor(weight, requires_grad=True), torch.tensor(bias, requires_grad=True)
    y_t = torch.nn.functional.conv2d(torch.tensor(x), w_t, b_t, stride, padding)
    upstream = rng.standard_normal(tuple(y_t.shape)).astype(np.float32)
    (y_t * torch.tensor(upstream)).sum().backward()

    def loss(x):
        return (conv(x) * Tensor(upstream)).sum()

    grads = ms.jit(ms.grad(loss, grad_position=None, weights=conv.trainable_params()))(Tensor(x))
    assert [p.name for p in conv.trainable_params()] == ["weight", "bias"]
    assert_close(grads[0].asnumpy(), w_t.grad.numpy())
    assert_close(grads[1].asnumpy(), b_t.grad.numpy())


def test_cpu_convolution_is_chosen_per_feature_map_where_the_native_kernel_is_fast(monkeypatch):
    """On the CPU the default is `"auto"` (the native kernel up to 2^17 unfolded elements per sample, im2col above)
    where this machine's native kernel measures fast, else im2col everywhere; an explicit impl is kept as it is. The
    timing's answer goes into the environment, for this process and those it starts, and one there is taken as is."""
    monkeypatch.delenv(layers.NATIVE_CONV_FAST_ENV, raising=False)
    ratio = layers._time_native_conv()
    assert ratio > 0
    fast = layers.native_conv_is_fast()
    assert os.environ[layers.NATIVE_CONV_FAST_ENV] == ("1" if fast else "0")
    for answer in ("0", "1"):
        monkeypatch.setenv(layers.NATIVE_CONV_FAST_ENV, answer)
        assert layers.native_conv_is_fast() == (answer == "1")
    monkeypatch.setattr(layers, "native_conv_is_fast", lambda: True)
    assert Conv2d(4, 4, 3).impl == "auto"
    assert layers.native_for("auto", 2 ** 17) and not layers.native_for("auto", 2 ** 17 + 1)
    assert layers.native_for("native", 2 ** 30) and not layers.native_for("im2col", 1)
    monkeypatch.setattr(layers, "native_conv_is_fast", lambda: False)
    assert Conv2d(4, 4, 3).impl == "im2col"
    assert Conv2d(4, 4, 3, impl="native").impl == "native"
    with pytest.raises(ValueError, match="conv impl"):
        Conv2d(4, 4, 3, impl="winograd")


def heads_layout(a, heads):
    """[B, L, H*D] -> torch [B, H, L, D]."""
    b, length, inner = a.shape
    return torch.tensor(a.reshape(b, length, heads, inner // heads).transpose(0, 2, 1, 3), requires_grad=True)


@pytest.mark.parametrize("lq, lk, chunk_elements, chunks",
                         [(37, 37, 2 ** 25, 1), (100, 77, 2 * 3 * 77 * 13, 8), (50, 50, 1, 50)])
def test_chunked_attention_matches_torch_and_autodiff(monkeypatch, lq, lk, chunk_elements, chunks):
    """One chunk; uneven chunks (13 query rows, the last 9); one query row per chunk."""
    monkeypatch.setattr(layers, "ATTENTION_CHUNK_ELEMENTS", chunk_elements)  # read when the graph is built
    heads, dim = 3, 16
    assert len(layers.query_chunks(2, heads, lq, lk)) == chunks
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, lq, heads * dim)).astype(np.float32)
    k, v = (rng.standard_normal((2, lk, heads * dim)).astype(np.float32) for _ in range(2))
    upstream = rng.standard_normal((2, lq, heads * dim)).astype(np.float32)

    def chunked(q, k, v):
        return (attention(q, k, v, heads) * Tensor(upstream)).sum()

    def plain(q, k, v):  # a mask takes the plain autodiff path
        return (attention(q, k, v, heads, mask=ms.ops.zeros((1, 1, 1, lk), ms.float32)) * Tensor(upstream)).sum()

    tq, tk, tv = (heads_layout(a, heads) for a in (q, k, v))
    out_t = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
    out_t = out_t.transpose(1, 2).reshape(2, lq, heads * dim)
    (out_t * torch.tensor(upstream)).sum().backward()
    expected = [t.grad.transpose(1, 2).reshape(2, -1, heads * dim).numpy() for t in (tq, tk, tv)]

    def forward(q, k, v):
        return attention(q, k, v, heads)

    inputs = [Tensor(a) for a in (q, k, v)]
    assert_close(ms.jit(forward)(*inputs).asnumpy(), out_t.detach().numpy())
    ours = ms.jit(ms.grad(chunked, grad_position=(0, 1, 2)))(*inputs)
    autodiff = ms.jit(ms.grad(plain, grad_position=(0, 1, 2)))(*inputs)
    for grad, grad_plain, grad_torch in zip(ours, autodiff, expected):
        assert_close(grad.asnumpy(), grad_torch)
        assert_close(grad.asnumpy(), grad_plain.asnumpy())


@pytest.mark.parametrize("batch, length", [(1, 7), (3, 7), (3, 4)])
def test_projections_in_column_layout_match_torch(batch, length):
    """`Linear.to_columns` ([B, L, in] -> [B, out, L]) and `from_columns` ([B, in, L] -> [B, L, out]), forward, input
    gradient and, for the pretraining, the weight's gradient: a batch of one is a 2-D product; a larger batch of
    sequences longer than the weight's sides (5 x 6) one batched product with its own backward, of shorter ones
    one 2-D product over all rows (`layers.folds_batch`)."""
    assert layers.folds_batch(batch, length, 5) == layers.folds_batch(batch, length, 6) == (batch > 1 and length == 4)
    rng = np.random.default_rng(3)
    linear = layers.Linear(5, 6)
    weight, bias = (rng.standard_normal(p.shape).astype(np.float32) for p in (linear.weight, linear.bias))
    linear.weight.set_data(Tensor(weight))
    linear.bias.set_data(Tensor(bias))
    tokens = rng.standard_normal((batch, length, 5)).astype(np.float32)
    columns = rng.standard_normal((batch, 5, length)).astype(np.float32)
    up_columns, up_tokens = (rng.standard_normal(shape).astype(np.float32)
                             for shape in ((batch, 6, length), (batch, length, 6)))

    def loss(tokens, columns):
        return ((linear.to_columns(tokens) * Tensor(up_columns)).sum()
                + (linear.from_columns(columns) * Tensor(up_tokens)).sum())

    t_tokens, t_columns = (torch.tensor(a, requires_grad=True) for a in (tokens, columns))
    t_linear = torch.nn.Linear(5, 6)
    t_linear.weight.data, t_linear.bias.data = torch.tensor(weight), torch.tensor(bias)
    t_to_columns = t_linear(t_tokens).transpose(1, 2)
    t_from_columns = t_linear(t_columns.transpose(1, 2))
    ((t_to_columns * torch.tensor(up_columns)).sum() + (t_from_columns * torch.tensor(up_tokens)).sum()).backward()

    inputs = Tensor(tokens), Tensor(columns)
    assert_close(ms.jit(linear.to_columns)(inputs[0]).asnumpy(), t_to_columns.detach().numpy())
    assert_close(ms.jit(linear.from_columns)(inputs[1]).asnumpy(), t_from_columns.detach().numpy())
    (grad_tokens, grad_columns), (grad_weight, grad_bias) = ms.jit(
        ms.grad(loss, grad_position=(0, 1), weights=[linear.weight, linear.bias]))(*inputs)
    assert_close(grad_tokens.asnumpy(), t_tokens.grad.numpy())
    assert_close(grad_columns.asnumpy(), t_columns.grad.numpy())
    assert_close(grad_weight.asnumpy(), t_linear.weight.grad.numpy())
    assert_close(grad_bias.asnumpy(), t_linear.bias.grad.numpy())


def test_unet_output_and_input_gradients_match_diffusers(tiny_sdxl, tiny_model):
    """Textual inversion's gradient path: the frozen tiny UNet's output and its gradients with respect to the text
    context and the pooled text embedding (through the vector `y` and every ResBlock's time embedding)."""
    from reference import sgm_vector, tiny_unet_inputs

    rng = np.random.default_rng(3)
    x, t, context, pooled, time_ids = tiny_unet_inputs(rng, 16)
    upstream = rng.standard_normal(x.shape).astype(np.float32)

    context_t = torch.tensor(context, requires_grad=True)
    pooled_t = torch.tensor(pooled, requires_grad=True)
    cond = dict(text_embeds=pooled_t, time_ids=torch.tensor(time_ids))
    out_t = tiny_sdxl.unet(torch.tensor(x), torch.tensor(t), context_t, added_cond_kwargs=cond).sample
    (out_t * torch.tensor(upstream)).sum().backward()

    unet = tiny_model.model.diffusion_model

    def loss(context, vector):  # no weights differentiated, as in textual inversion
        out = unet(Tensor(x), Tensor(t), context, vector)
        return (out * Tensor(upstream)).sum(), out

    (_, out), (grad_context, grad_vector) = ms.jit(ms.value_and_grad(loss, grad_position=(0, 1), has_aux=True))(
        Tensor(context), Tensor(sgm_vector(pooled, time_ids)))
    np.testing.assert_allclose(out.asnumpy(), out_t.detach().numpy(), rtol=0, atol=1e-4)
    assert_close(grad_context.asnumpy(), context_t.grad.numpy(), rel=1e-3)
    assert_close(grad_vector.asnumpy()[:, :pooled.shape[1]], pooled_t.grad.numpy(), rel=1e-3)


def test_recomputed_blocks_give_the_stored_blocks_output_and_gradients():
    """A ResBlock and a depth-2 SpatialTransformer, each block run through the CPU's `Recompute` (its backward runs
    the block again from its inputs), give the output and the input gradients (feature map, time embedding, text
    context) of the same blocks with their activations stored."""
    from gm.modules.attention import SpatialTransformer
    from gm.modules.diffusionmodules.openaimodel import ResBlock, TimestepEmbedSequential

    def blocks(recompute):
        net = TimestepEmbedSequential([ResBlock(32, 64), SpatialTransformer(32, 2, 16, 2, 48, recompute=recompute)],
                                      recompute)
        for param in net.get_parameters():
            param.requires_grad = False
        return net

    stored, recomputed = blocks(False), blocks(True)
    weights = {p.name: p for p in recomputed.get_parameters()}
    rng = np.random.default_rng(0)
    for param in stored.get_parameters():  # random weights (zero-initialised output layers would hide the blocks)
        param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.2))
        weights[param.name].set_data(param.data.copy())
    inputs = [Tensor(rng.standard_normal(shape).astype(np.float32))
              for shape in ((2, 32, 8, 8), (2, 64), (2, 7, 48))]
    upstream = Tensor(rng.standard_normal((2, 32, 8, 8)).astype(np.float32))

    def output_and_gradients(net):
        def loss(x, emb, context):
            out = net(x, emb, context)
            return (out * upstream).sum(), out

        (_, out), grads = ms.jit(ms.value_and_grad(loss, grad_position=(0, 1, 2), has_aux=True))(*inputs)
        return [out.asnumpy()] + [grad.asnumpy() for grad in grads]

    for ours, expected in zip(output_and_gradients(recomputed), output_and_gradients(stored)):
        assert_close(ours, expected, rel=1e-5)


def test_the_unet_recomputes_every_resblock_and_transformer_block(root):
    """`use_recompute` runs each of the UNet's ResBlocks and transformer blocks through `Recompute` on the CPU (the
    rest of the UNet is what the parity test above covers), and registers no layer twice."""
    from omegaconf import OmegaConf
    from gm.modules.attention import SpatialTransformer
    from gm.modules.diffusionmodules.openaimodel import ResBlock, TimestepEmbedSequential
    from gm.modules.recompute import Recompute
    from gm.util import instantiate_from_config

    config = OmegaConf.load(f"{root}/configs/inference/sd_xl_tiny.yaml").model.params.network_config
    plain, unet = instantiate_from_config(config), instantiate_from_config(config, use_recompute=True)
    assert [name for name, _ in unet.parameters_and_names()] == [name for name, _ in plain.parameters_and_names()]
    cells = [cell for _, cell in unet.cells_and_names()]
    runs = [run for cell in cells if isinstance(cell, TimestepEmbedSequential)
            for layer, run in zip(cell, cell.runs) if isinstance(layer, ResBlock)]
    runs += [run for cell in cells if isinstance(cell, SpatialTransformer) for run in cell.block_runs]
    assert len(runs) >= 10 and all(isinstance(run, Recompute) for run in runs)
    assert {id(run.block) for run in runs} <= {id(cell) for cell in cells}


PEAK_PROGRAM = """
import sys
sys.path.insert(0, {root!r})
import numpy as np
import mindspore as ms
from mindspore import nn, ops
from gm.modules import layers
ms.set_context(mode=ms.GRAPH_MODE)
ms.set_device("CPU")
{body}
def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
before = rss("VmRSS")
out = fn(*args)
(out[0] if isinstance(out, tuple) else out).asnumpy()
print("peak", rss("VmHWM") - before)
"""


def run_program(root, folder, body, env=None):
    """Run PEAK_PROGRAM around `body` in a fresh process (MindSpore's CPU pool never gives memory back; graph mode
    compiles only from a file); returns its standard output."""
    program = folder / f"peak_{len(list(folder.iterdir()))}.py"
    program.write_text(PEAK_PROGRAM.format(root=root, body=textwrap.dedent(body)))
    result = subprocess.run([sys.executable, str(program)], capture_output=True, text=True, timeout=600,
                            env=None if env is None else {**os.environ, **env})
    assert "peak" in result.stdout, result.stderr[-3000:]
    return result.stdout


def peak_mb(root, folder, body):
    """Peak resident memory (MB) of one call of `fn(*args)` defined by `body`, above the memory before the call
    (compiling the graph included)."""
    lines = [line for line in run_program(root, folder, body).splitlines() if line.startswith("peak")]
    return float(lines[-1].split()[1])


def pool_peak_mb(root, folder, body):
    """The most MindSpore's memory pool held during one call of `fn(*args)` (MB): the tensors a graph keeps, such
    as the activations kept for the backward pass, without the compiled graph's own memory."""
    out = run_program(root, folder, body, env={"MS_DEV_RUNTIME_CONF": "memory_statistics:True"})
    found = re.search(r"dynamic memory pool.*? peak used mem:(\d+)M", out)
    assert found, out[-3000:]
    return float(found.group(1))


CONV_STACK = """
{before}
convs = [layers.Conv2d({channels}, {channels}, 3, padding=1, impl="im2col") for _ in range(8)]

class Net(nn.Cell):
    def __init__(self):
        super().__init__()
        self.convs = nn.CellList(convs)

    def construct(self, x):
        for conv in self.convs:
            x = conv(x)
        return (x * x).sum()

net = Net()
for param in net.get_parameters():
    param.requires_grad = {trainable}
args = (ms.Tensor(np.random.default_rng(0).standard_normal((1, {channels}, {side}, {side})).astype(np.float32) * 0.1),)
fn = ms.jit(ms.grad(net, grad_position=0, weights={weights}))
"""


def test_frozen_conv_backward_keeps_no_columns(root, tmp_path):
    """8 convolutions whose unfolded columns are 18.9 MB each: an input gradient with frozen weights keeps none of
    them (MindSpore drops the weight-gradient branch); a weight gradient must keep them all (151 MB)."""
    stack = dict(before="", channels=128, side=64)
    input_grad = peak_mb(root, tmp_path, CONV_STACK.format(trainable=False, weights=None, **stack))
    weight_grad = peak_mb(root, tmp_path, CONV_STACK.format(trainable=True, weights="net.trainable_params()", **stack))
    columns = 8 * 128 * 9 * 64 * 64 * 4 / 2 ** 20
    assert weight_grad - input_grad > 0.6 * columns, (input_grad, weight_grad)


AUTODIFF_WEIGHT_PRODUCT = """
def product(weight, columns):
    return layers._matmul(layers.weight_matrix(weight, columns), columns)

layers._weight_product = product
"""


def test_frozen_conv_backward_keeps_no_weight_matrices(root, tmp_path):
    """8 convolutions of 640 channels (weights 14.1 MB each) at 16x16, input gradient: through MindSpore's autodiff
    the product keeps every weight's matrix (a copy) until the backward pass; `WeightProduct` makes its own there."""
    stack = dict(channels=640, side=16, trainable=False, weights=None)
    ours = pool_peak_mb(root, tmp_path, CONV_STACK.format(before="", **stack))
    autodiff = pool_peak_mb(root, tmp_path, CONV_STACK.format(before=AUTODIFF_WEIGHT_PRODUCT, **stack))
    weights = 8 * 640 * 640 * 9 * 4 / 2 ** 20
    assert autodiff - ours > 0.75 * weights, (ours, autodiff)


ATTENTION_STACK = """
class Block(nn.Cell):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (layers.Linear(640, 640) for _ in range(3))

    def construct(self, x):
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        return layers.attention(q, k, v, 10{mask}) + x

class Net(nn.Cell):
    def __init__(self):
        super().__init__()
        self.blocks = nn.CellList([Block() for _ in range(4)])

    def construct(self, x):
        for block in self.blocks:
            x = block(x)
        return (x * x).sum()

net = Net()
for param in net.get_parameters():
    param.requires_grad = False
args = (ms.Tensor(np.random.default_rng(0).standard_normal((1, 1024, 640)).astype(np.float32)),)
fn = ms.jit(ms.grad(net, grad_position=0))
"""


def test_chunked_attention_backward_keeps_no_probabilities(root, tmp_path):
    """4 self-attentions, 10 heads over 1024 tokens (probabilities 42 MB each): the plain autodiff path keeps several
    probability-sized buffers per attention until the backward pass, ChunkedAttention none."""
    chunked = peak_mb(root, tmp_path, ATTENTION_STACK.format(mask=""))
    plain = peak_mb(root, tmp_path, ATTENTION_STACK.format(mask=", mask=ops.zeros((1, 1, 1, 1), ms.float32)"))
    probabilities = 4 * 10 * 1024 * 1024 * 4 / 2 ** 20
    assert plain - chunked > 2 * probabilities, (chunked, plain)


PROJECTION_STACK = """
{autodiff}
projections = [layers.Linear(1024, 1024) for _ in range(8)]

class Net(nn.Cell):
    def __init__(self):
        super().__init__()
        self.projections = nn.CellList(projections)

    def construct(self, x):
        for i, projection in enumerate(self.projections):
            x = projection.to_columns(x) if i % 2 == 0 else projection.from_columns(x)
        return (x * x).sum()

net = Net()
for param in net.get_parameters():
    param.requires_grad = False
args = (ms.Tensor(np.random.default_rng(0).standard_normal((2, 1536, 1024)).astype(np.float32) * 0.03),)
fn = ms.jit(ms.grad(net, grad_position=0))
"""

AUTODIFF_PROJECTIONS = """
def columns(x, weight):
    return layers._batch_matmul_transpose_b(layers._per_sample(weight, x), x)

def tokens(x, weight):
    return layers._batch_matmul_transpose_ab(x, layers._per_sample(weight, x))

layers._columns_projection, layers._tokens_projection = columns, tokens
"""


def test_batched_projections_keep_no_weight_copies(root, tmp_path):
    """8 projections of 1024 x 1024 (4 MB each) at batch 2 over 1536 positions (batched products, not
    `layers.folds_batch`), input gradient: the same batched products through MindSpore's autodiff keep the two
    copies of every weight (64 MB) until the backward pass; ours keep none."""
    assert not layers.folds_batch(2, 1536, 1024)
    ours = pool_peak_mb(root, tmp_path, PROJECTION_STACK.format(autodiff=""))
    autodiff = pool_peak_mb(root, tmp_path, PROJECTION_STACK.format(autodiff=AUTODIFF_PROJECTIONS))
    weight_copies = 8 * 2 * 4
    assert autodiff - ours > 0.75 * weight_copies, (ours, autodiff)


NORM_STACK = """
{before}
norms = [layers.GroupNorm(32, 128) for _ in range(8)]

class Net(nn.Cell):
    def __init__(self):
        super().__init__()
        self.norms = nn.CellList(norms)

    def construct(self, x):
        for norm in self.norms:
            x = norm(x)
        return (x * x).sum()

net = Net()
args = (ms.Tensor(np.random.default_rng(0).standard_normal((1, 128, 256, 256)).astype(np.float32)),)
fn = ms.jit(net)
"""


def test_what_is_made_of_parameters_is_made_after_the_input(root, tmp_path):
    """8 GroupNorms at 128 x 256 x 256, forward only: their scale and shift broadcast to the group's positions (64 MB
    per norm) are made after the input (`layers.after`) and freed once used; made from the parameters alone, the graph
    computes them once and keeps all eight."""
    ours = pool_peak_mb(root, tmp_path, NORM_STACK.format(before=""))
    hoisted = pool_peak_mb(root, tmp_path, NORM_STACK.format(before="layers.after = lambda parameter, x: parameter"))
    assert hoisted - ours > 0.75 * 8 * 64, (ours, hoisted)


TEXT_ATTENTION_STACK = """
from gm.modules.encoders import clip

def transposing_attention(self, x, mask):  # the product of a transposed weight
    qkv = ops.matmul(x, self.in_proj_weight.T) + self.in_proj_bias
    q, k, v = ops.split(qkv, qkv.shape[-1] // 3, -1)
    return self.out_proj(layers.attention(q, k, v, self.heads, "plain", mask))

if {transposing}:
    clip.MultiheadAttention.construct = transposing_attention

class Net(nn.Cell):
    def __init__(self):
        super().__init__()
        self.layers = nn.CellList([clip.MultiheadAttention(1024, 16, "plain") for _ in range(16)])

    def construct(self, x):
        for layer in self.layers:
            x = layer(x, None)
        return x

net = Net()
args = (ms.Tensor(np.random.default_rng(0).standard_normal((2, 77, 1024)).astype(np.float32)),)
fn = ms.jit(net)
"""


def test_text_encoder_attention_keeps_no_transposed_weights(root, tmp_path):
    """16 OpenCLIP attention layers (in_proj 3 x 1024 x 1024: 192 MiB in all), forward: their fused q, k, v projection is
    one product with the weight's transpose flag (`layers.linear`); written as the product of the transposed weight,
    the graph keeps each transposed weight and MindSpore's CPU Transpose kernel about twice that (measured at full
    size: 3.7 GB of compiled text encoders for 3.3 GB of weights, against 0.7 GB now)."""
    in_proj_mb = 16 * 3 * 1024 * 1024 * 4 / 2 ** 20
    ours = peak_mb(root, tmp_path, TEXT_ATTENTION_STACK.format(transposing=False))
    transposing = peak_mb(root, tmp_path, TEXT_ATTENTION_STACK.format(transposing=True))
    assert transposing - ours > 1.5 * in_proj_mb, (ours, transposing)


TRANSFORMER_STACK = """
from gm.modules import attention

def transposing_cross_attention(self, x, context=None):  # the token layout, heads split by Transpose kernels
    if context is None:
        context = x
    out = layers.attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
    return self.to_out(out)

def transposing_spatial_transformer(self, x, context=None):
    b, c, h, w = x.shape
    tokens = self.proj_in(self.norm(x).reshape(b, c, h * w).transpose(0, 2, 1))
    for block in self.transformer_blocks:
        tokens = block(tokens, context)
    return self.proj_out(tokens).transpose(0, 2, 1).reshape(b, c, h, w) + x

if {transposing}:
    attention.CrossAttention.construct = transposing_cross_attention
    attention.SpatialTransformer.construct = transposing_spatial_transformer

class Net(nn.Cell):
    def __init__(self):
        super().__init__()
        self.block = attention.SpatialTransformer(640, 10, 64, 2, 2048)

    def construct(self, x, context):
        return (self.block(x, context) ** 2).sum()

net = Net()
for param in net.get_parameters():
    param.requires_grad = False
rng = np.random.default_rng(0)
args = (ms.Tensor(rng.standard_normal((2, 640, 32, 32)).astype(np.float32)),
        ms.Tensor(rng.standard_normal((2, 77, 2048)).astype(np.float32)))
fn = ms.jit(ms.grad(net, grad_position=(0, 1)))
"""


def test_transformer_layouts_keep_no_transposes(root, tmp_path):
    """SDXL's 640-wide SpatialTransformer (depth 2, batch 2, 32x32), forward and input gradients: each CPU Transpose
    kernel keeps twice its output for the life of the graph; heads-first products with transpose flags keep none
    (measured: 786 MB against 1023 MB)."""
    heads_first = peak_mb(root, tmp_path, TRANSFORMER_STACK.format(transposing=False))
    transposing = peak_mb(root, tmp_path, TRANSFORMER_STACK.format(transposing=True))
    assert heads_first < 0.85 * transposing, (heads_first, transposing)


RECOMPUTE_STACK = """
from gm.modules.attention import SpatialTransformer
from gm.modules.diffusionmodules.openaimodel import ResBlock, TimestepEmbedSequential

class Net(nn.Cell):
    def __init__(self):
        super().__init__()
        self.blocks = nn.CellList([
            TimestepEmbedSequential(
                [ResBlock(640, 1280), SpatialTransformer(640, 10, 64, 2, 2048, recompute={recompute})], {recompute})
            for _ in range(3)
        ])

    def construct(self, x, emb, context):
        for block in self.blocks:
            x = block(x, emb, context)
        return (x * x).sum()

net = Net()
for param in net.get_parameters():
    param.requires_grad = False
rng = np.random.default_rng(0)
args = (ms.Tensor(rng.standard_normal((1, 640, 32, 32)).astype(np.float32)),
        ms.Tensor(rng.standard_normal((1, 1280)).astype(np.float32)),
        ms.Tensor(rng.standard_normal((1, 77, 2048)).astype(np.float32)))
fn = ms.jit(ms.grad(net, grad_position=(1, 2)))
"""


def test_recomputed_blocks_keep_only_their_inputs(root, tmp_path):
    """Three of SDXL's 640-wide UNet blocks (ResBlock + depth-2 transformer, 32x32), gradients with respect to the
    time embedding and the text context: recomputed, each block keeps only its inputs until its backward pass, so
    the activations held at once (MindSpore's pool peak) drop to about one block's.

    The process's peak drops much less: every compiled kernel keeps memory of its own outside the pool, and
    recomputation adds kernels (benchmarks/README.md has the full-size numbers)."""
    recomputed = pool_peak_mb(root, tmp_path, RECOMPUTE_STACK.format(recompute=True))
    stored = pool_peak_mb(root, tmp_path, RECOMPUTE_STACK.format(recompute=False))
    assert recomputed < 0.6 * stored, (recomputed, stored)


def test_recompute_is_mindspores_own_off_the_cpu(monkeypatch):
    """The hand-written `Recompute` is the CPU's; on Ascend and GPU the block is marked for MindSpore's own."""
    from gm.modules import recompute
    from gm.modules.diffusionmodules.openaimodel import ResBlock

    assert isinstance(recompute.recomputed(ResBlock(32, 64)), recompute.Recompute)
    monkeypatch.setattr(recompute, "on_cpu", lambda: False)
    block = ResBlock(32, 64)
    assert recompute.recomputed(block) is block
