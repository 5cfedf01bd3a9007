"""Primitive layers whose parameter names match PyTorch's (`weight`, `bias`), so that the
original SDXL checkpoint keys load as they are, and whose kernels are chosen per device here,
in one place:

- convolution: Ascend/GPU use the native op. On the CPU, MindSpore's native conv2d (oneDNN) is fast or ~80x
  slower than an im2col (`ops.unfold`) + matmul formulation depending on the machine (oneDNN picks its kernel by
  the CPU's instruction set), so it is timed once (`native_conv_is_fast`): where it is fast, small convolutions
  use it (`"auto"`: the tiny model's, where im2col is mostly unfolds and tiny per-sample products) and larger ones
  im2col; elsewhere im2col throughout. The im2col backward keeps neither the weight's matrix (its product,
  `WeightProduct`, makes it again in the backward pass) nor, when the weight is not differentiated (textual
  inversion differentiates only the learned embedding rows), the unfolded input columns: the graph drops the
  weight-gradient branch and with it the columns, so the backward keeps no more than a native convolution's
  (measured: a stack of 8 convolutions, 320 channels at 64x64, keeps 0.03 GB for an input gradient and
  0.35 GB, the columns, for a weight gradient);
- attention: the fused flash-attention kernel on Ascend; elsewhere softmax(QK^T/sqrt(d))V, computed in query
  chunks whose backward computes the probabilities again instead of keeping them. Autodiff keeps each
  attention's [B, heads, L, L] probabilities (0.67 GB for one of SDXL's 64x64 self-attentions at 1024 px) and,
  through the softmax gradient's broadcasting kernels, about four times more (measured per 10-head attention over
  1024 tokens, probabilities 0.04 GB: 0.26 GB kept by autodiff, 0.06 GB by `ChunkedAttention`).

Matrix products go through `MatMul` / `BatchMatMul` with their transpose flags rather than `ops.matmul` on a
transposed or broadcast operand: the latter materialises a transposed (or per-sample) copy of every weight in the
forward pass, and a graph keeps those copies alive until the backward pass has used them: for a frozen SDXL, more
memory than the weights themselves. The UNet's attention projections, whose product per sample would make a
batch's graph grow with the batch, copy their weight per sample in a product whose backward makes its own copy
(`ColumnsProjection`, `TokensProjection`), so no copy outlives the forward pass; a batch of short sequences
(the tiny UNet's grids) is instead one product over all its rows with one small Transpose (`folds_batch`).

The same flags replace layout changes: on CPU every `Transpose` kernel (whichever API: `Tensor.transpose`,
`ops.permute`, `swapaxes`) keeps about twice its output's size allocated for the life of the compiled graph, and
the UNet's attention head splits and token <-> feature-map layouts would be hundreds of them (an estimated 10 GB at
1024 px). So the UNet's attention runs "heads first": projections computed as W x^T give [B, H*D, L], whose
reshape to [B, H, D, L] moves nothing, and every product takes its operands' transposes by flag
(`Linear.to_columns` / `Linear.from_columns`, `heads_first_attention`, `ChunkedAttention`).
"""
import math
import os
import time

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import HeUniform, Uniform, initializer


_matmul = ops.MatMul()
_matmul_transpose_a = ops.MatMul(transpose_a=True)
_matmul_transpose_b = ops.MatMul(transpose_b=True)
_matmul_transpose_ab = ops.MatMul(transpose_a=True, transpose_b=True)
_batch_matmul = ops.BatchMatMul()
_batch_matmul_transpose_a = ops.BatchMatMul(transpose_a=True)
_batch_matmul_transpose_b = ops.BatchMatMul(transpose_b=True)
_batch_matmul_transpose_ab = ops.BatchMatMul(transpose_a=True, transpose_b=True)
_softmax = ops.Softmax(-1)


def on_cpu():
    return ms.get_context("device_target") == "CPU"


def default_conv_impl():
    """`"native"` on Ascend/GPU. On the CPU `"auto"` (`Conv2d`: the native kernel for small convolutions, im2col for
    larger ones, `native_for`) where this machine's native kernel is fast (`native_conv_is_fast`), else `"im2col"`."""
    if not on_cpu():
        return "native"
    return "auto" if native_conv_is_fast() else "im2col"


# The largest convolution (its unfolded input per sample: in_channels x kernel area x output positions) the CPU
# computes with the native kernel under `"auto"`. Measured on the project's machine (AVX2): at small ones the native
# kernel wins (tiny UNet's forward at batch 24, 8x8 latents: 0.12 s against im2col's 0.27 s; a 3x3 convolution of
# 128 channels at 2x2, batch 24: 0.9 ms against 3.1 ms), where im2col is mostly per-sample products and unfolds;
# at the small config's sizes the time is even but each native kernel keeps a workspace of about its unfolded
# input for the graph's life: the small config's TI step at 512 px peaks at 10.1 GB with its input, one
# downsampling and its lower 1x1 convolutions native (a limit of 2^20), 9.1 GB with none (2^17, which still keeps
# every convolution of the tiny model at 64 px native), in the same time.
NATIVE_CONV_COLUMNS = 2 ** 17


@ms.constexpr
def native_for(impl, columns):
    """Whether a convolution with `impl` whose unfolded input is `columns` elements per sample runs natively."""
    return impl == "native" or (impl == "auto" and columns <= NATIVE_CONV_COLUMNS)


# "1" or "0": whether the native CPU convolution is fast on this machine (`native_conv_is_fast`), set by the first
# process that times it and inherited by the processes it starts; set it beforehand to decide without timing.
NATIVE_CONV_FAST_ENV = "GM_NATIVE_CONV_FAST"


def native_conv_is_fast():
    """Whether MindSpore's native CPU convolution is at most twice as slow as the im2col form on this machine.
    oneDNN chooses its kernel by the CPU: for a 3x3 convolution of 128 channels at 32x32, batch 2, one machine of
    the project's kind took 470 ms where im2col took 5.8 ms (a reference kernel for plain NCHW tensors), another 6 ms
    against 9 ms. Timed (about half a second) unless NATIVE_CONV_FAST_ENV says it, which the answer then does."""
    known = os.environ.get(NATIVE_CONV_FAST_ENV)
    if known not in ("0", "1"):
        known = "1" if _time_native_conv() <= 2.0 else "0"
        os.environ[NATIVE_CONV_FAST_ENV] = known
    return known == "1"


def _time_native_conv():
    """The native convolution's time over the im2col form's, each compiled, called once, then best of three.
    Written with plain ops, not `Conv2d` cells: the first `Conv2d` of a model is built inside `create_model`'s
    `no_init_parameters()`, where a cell's parameters would have no data yet."""
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((2, 128, 32, 32)).astype(np.float32))
    weight = Tensor(rng.standard_normal((128, 128, 3, 3)).astype(np.float32) * 0.03)

    def native(x, weight):
        return ops.conv2d(x, weight, None, 1, "pad", (1, 1))

    def im2col(x, weight):
        columns = ops.unfold(x, 3, 1, 1, 1)  # [2, 128 * 9, 32 * 32]
        return _batch_matmul(ops.broadcast_to(weight.reshape(1, 128, -1), (2, 128, 128 * 9)), columns)

    best = []
    for form in (native, im2col):
        run = ms.jit(form)
        run(x, weight).asnumpy()  # compiled
        times = []
        for _ in range(3):
            start = time.perf_counter()
            run(x, weight).asnumpy()
            times.append(time.perf_counter() - start)
        best.append(min(times))
    return best[0] / best[1]


def default_attention_impl():
    """`"flash"` (fused kernel) on Ascend, `"vanilla"` elsewhere."""
    return "flash" if ms.get_context("device_target") == "Ascend" else "vanilla"


# Shape and dtype decisions made inside compiled graphs are `ms.constexpr` (run in Python at compile time): a
# plain helper's branches fail to compile where a recomputed block's backward differentiates it again (`Recompute`).
@ms.constexpr
def flash_attention_allowed(dtype, heads, head_dim):
    """Whether Ascend's fused kernel takes these inputs (MindSpore's `flash_attention_score`: fp16 or bf16, at most
    256 heads, a head size that is a multiple of 16 up to 512); elsewhere `"flash"` falls back to `"vanilla"`."""
    return dtype in (ms.float16, ms.bfloat16) and heads <= 256 and head_dim % 16 == 0 and head_dim <= 512


def after(parameter, x):
    """`parameter`, to be used only once `x` exists. What a graph computes from parameters alone (a weight reshaped,
    broadcast or copied per sample) it computes once and keeps for the life of the graph (measured on the CPU, forward
    only: 8 convolutions of 640 channels keep their reshaped weights, 118 MB, against 20 MB; 8 GroupNorms at 128 x
    256 x 256 their broadcast scale and shift, 576 MB against 128 MB); made from `after(parameter, x)`, it is an
    intermediate like any other, freed once used."""
    return ops.depend(parameter, x)


# The most unfolded input (im2col columns) one convolution holds at once on the CPU: larger ones run in bands of
# output rows. The full-size VAE's 128-channel 3x3 layers at 1024 px would otherwise unfold 4.8 GB at once.
IM2COL_BAND_BYTES = 256 * 2 ** 20


def _samples(x):
    """[n, ...] as n tensors [1, ...]; a batch of one is itself (no slice kernel)."""
    if x.shape[0] == 1:
        return (x,)
    return ops.split(x, 1, 0)


@ms.constexpr
def band_rows(band_bytes, row_elements, dtype):
    """Output rows per im2col band: as many as keep one band's unfolded input within `band_bytes` (at least one);
    `row_elements`: the unfolded input's elements per output row."""
    return max(1, band_bytes // (row_elements * (4 if dtype == ms.float32 else 2)))


# The most one convolution may spend on copies of its weight, one per sample, to compute several samples in one
# product: a gradient graph keeps them for its backward pass, and larger weights gain nothing from it (a product per
# sample is as fast; what a batched product saves is the compile of a graph that grows with the batch).
WEIGHT_COPIES_BYTES = 16 * 2 ** 20


@ms.constexpr
def samples_per_product(batch, rows, columns, out_channels, band_bytes, dtype):
    """How many samples a convolution computes in one product: as many as keep its weight's copies within
    WEIGHT_COPIES_BYTES and their unfolded input within one band (`rows` x `columns` per sample), at least one."""
    size = 4 if dtype == ms.float32 else 2
    return max(1, min(batch, WEIGHT_COPIES_BYTES // (out_channels * rows * size), band_bytes // (rows * columns * size)))


class Conv2d(nn.Cell):
    """2-D convolution with torch's parameter layout: weight [out, in, kh, kw], bias [out]."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, impl=None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.impl = impl or default_conv_impl()
        if self.impl not in ("im2col", "native", "auto"):
            raise ValueError(f"conv impl must be 'im2col', 'native' or 'auto', got {self.impl!r}")
        fan_in = in_channels * kernel_size * kernel_size
        self.weight = Parameter(
            initializer(HeUniform(math.sqrt(5)), (out_channels, in_channels, kernel_size, kernel_size), ms.float32),
            name="weight",
        )
        bound = 1 / math.sqrt(fan_in)
        self.bias = Parameter(initializer(Uniform(bound), (out_channels,), ms.float32), name="bias") if bias else None
        self.band_bytes = IM2COL_BAND_BYTES

    def construct(self, x):
        k, s, p = self.kernel_size, self.stride, self.padding
        h_out, w_out = (x.shape[2] + 2 * p - k) // s + 1, (x.shape[3] + 2 * p - k) // s + 1
        if native_for(self.impl, x.shape[1] * k * k * h_out * w_out):
            y = ops.conv2d(x, self.weight.astype(x.dtype), None, s, "pad", (p, p))
        else:
            y = self._im2col_conv(x, h_out, w_out)
        if self.bias is not None:
            y = ops.bias_add(y, self.bias.astype(y.dtype))
        return y

    def _im2col_conv(self, x, h_out, w_out):
        n, c, h, w = x.shape
        k, s, p = self.kernel_size, self.stride, self.padding
        group = samples_per_product(n, c * k * k, h_out * w_out, self.out_channels, self.band_bytes, x.dtype)
        if group > 1:  # samples in groups, a product each (a product per sample makes the graph grow with the batch)
            matrix = weight_matrix(self.weight, x)
            outputs = [self._group_product(samples, matrix, h_out * w_out) for samples in ops.split(x, group, 0)]
        elif k == 1 and s == 1 and p == 0:
            outputs = [_weight_product(self.weight, image.reshape(c, h * w)) for image in _samples(x)]
        else:
            rows_per_band = band_rows(self.band_bytes, c * k * k * w_out, x.dtype)
            outputs = [self._image_product(image, h_out, w_out, rows_per_band) for image in _samples(x)]
        y = outputs[0] if len(outputs) == 1 else ops.concat([o.reshape((-1,) + o.shape[-2:]) for o in outputs])
        return y.reshape(n, self.out_channels, h_out, w_out)

    def _group_product(self, samples, weight, positions):
        """[m, out, positions] for m samples, one batched product (the weight copied per sample, `_per_sample`)."""
        m, c, h, w = samples.shape
        k, s, p = self.kernel_size, self.stride, self.padding
        cols = samples.reshape(m, c, h * w) if k == 1 and s == 1 and p == 0 else ops.unfold(samples, k, 1, p, s)
        return _batch_matmul(_per_sample(weight, samples), cols.reshape(m, c * k * k, positions))

    def _image_product(self, image, h_out, w_out, rows_per_band):
        """One image's [out, h_out*w_out]: unfolded whole, or band by band when that would be too large. (Its own
        method: a branch inside a loop body fails to compile in a recomputed block's backward, MindSpore 2.10.)"""
        if h_out > rows_per_band:
            return self._im2col_bands(image, h_out, w_out, rows_per_band)
        c, k = image.shape[1], self.kernel_size
        cols = ops.unfold(image, k, 1, self.padding, self.stride)  # [1, c*k*k, h_out*w_out]
        return _weight_product(self.weight, cols.reshape(c * k * k, h_out * w_out))

    def _im2col_bands(self, image, h_out, w_out, rows_per_band):
        """One image's [out, h_out*w_out] computed band by band of output rows, so that only one band's unfolded
        input exists at a time; the bands tile the output exactly (no overlap, no seams)."""
        c = image.shape[1]
        k, s, p = self.kernel_size, self.stride, self.padding
        if p:  # pad once (concatenations: ops.pad's CPU gradient freezes compiled graphs), then bands unpadded
            n, _, h, w = image.shape
            side = ops.zeros((n, c, h, p), image.dtype)
            image = ops.concat((side, image, side), 3)
            top = ops.zeros((n, c, p, w + 2 * p), image.dtype)
            image = ops.concat((top, image, top), 2)
        bands, previous = [], None
        for first in range(0, h_out, rows_per_band):
            rows = min(rows_per_band, h_out - first)
            band = image[:, :, first * s:first * s + (rows - 1) * s + k]
            if previous is not None:
                band = ops.depend(band, previous)  # in order: the runtime would otherwise unfold every band at once
            previous = _weight_product(self.weight, ops.unfold(band, k, 1, 0, s).reshape(c * k * k, rows * w_out))
            bands.append(previous)
        return ops.concat(bands, 1)


def weight_matrix(weight, x):
    """A convolution's weight [out, in, kh, kw] as the matrix [out, in*kh*kw] in x's dtype, made once x exists."""
    return after(weight, x).astype(x.dtype).reshape(weight.shape[0], -1)


class WeightProduct(nn.Cell):
    """A convolution's weight [out, in, kh, kw], as a matrix, times unfolded input [in*kh*kw, L].

    The matrix is a copy of the weight, and through autodiff a gradient graph keeps every convolution's until the
    backward pass (8 convolutions of 640 channels: about their 118 MB of weights; the small config's TI step at
    512 px: 0.39 GB); the backward (`bprop`) makes its own instead. The weight's gradient (the pretraining's) is the
    output gradient times the columns; a frozen weight's is never computed (the graph drops what no output needs),
    so the columns are not kept for it."""

    def construct(self, weight, columns):
        return _matmul(weight_matrix(weight, columns), columns)

    def bprop(self, weight, columns, out, dout):
        d_weight = _matmul_transpose_b(dout, columns).reshape(weight.shape).astype(weight.dtype)
        return d_weight, _matmul_transpose_a(weight_matrix(weight, dout), dout)


_weight_product = WeightProduct()


def linear(x, weight, bias=None):
    """x W^T + b over x's last axis, W [out, in] in torch's layout: the product's transpose flag, never a
    transposed weight (computed from a parameter alone, a graph would keep it, and MindSpore 2.10's CPU Transpose
    kernel about twice that again, for the graph's life: measured, 3.2 GB for 1.07 GB of weights)."""
    shape = x.shape
    y = _matmul_transpose_b(x.reshape(-1, shape[-1]), weight.astype(x.dtype))
    if bias is not None:
        y = ops.bias_add(y, bias.astype(y.dtype))
    return y.reshape(shape[:-1] + (y.shape[-1],))


class Linear(nn.Cell):
    """y = x W^T + b with torch's layout: weight [out, in], bias [out]."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        bound = 1 / math.sqrt(in_features)
        self.weight = Parameter(initializer(HeUniform(math.sqrt(5)), (out_features, in_features), ms.float32), name="weight")
        self.bias = Parameter(initializer(Uniform(bound), (out_features,), ms.float32), name="bias") if bias else None

    def construct(self, x):
        return linear(x, self.weight, self.bias)

    def to_columns(self, x):
        """[B, L, in] -> [B, out, L] (the output transposed, by the product's flag: no Transpose kernel; a batch of
        short sequences, by one Transpose of the output, `folds_batch`)."""
        b, length, width = x.shape
        if folds_batch(b, length, width):
            return linear(x, self.weight, self.bias).transpose(0, 2, 1)
        weight = self.weight.astype(x.dtype)
        if b == 1:
            y = _matmul_transpose_b(weight, x.reshape(x.shape[1:])).reshape(1, weight.shape[0], x.shape[1])
        else:
            y = _columns_projection(x, weight)
        if self.bias is not None:
            y = ops.bias_add(y, self.bias.astype(y.dtype))
        return y

    def from_columns(self, x):
        """[B, in, L] -> [B, L, out] (the input transposed, by the product's flag; a batch of short sequences, by one
        Transpose of the input, `folds_batch`)."""
        b, _, length = x.shape
        if folds_batch(b, length, self.weight.shape[0]):
            return linear(x.transpose(0, 2, 1), self.weight, self.bias)
        weight = self.weight.astype(x.dtype)
        if b == 1:
            y = _matmul_transpose_ab(x.reshape(x.shape[1:]), weight)
        else:
            y = _tokens_projection(x, weight).reshape(b * length, weight.shape[0])
        if self.bias is not None:
            y = ops.bias_add(y, self.bias.astype(y.dtype))
        return y.reshape(b, length, weight.shape[0])


# The largest activation (elements) a projection in column layout transposes to compute a batch as one 2-D product
# (`folds_batch`): a CPU Transpose kernel keeps about twice its output for the life of the graph, so only small ones.
FOLD_ELEMENTS = 2 ** 18


@ms.constexpr
def folds_batch(batch, length, width):
    """Whether a projection in column layout computes a batch as one 2-D product over all its rows, with a Transpose
    of its column-layout side ([batch, width, length]), rather than as a batched product with the weight copied per
    sample ([batch, out, in]): where the transposed activation is both smaller than the copies (sequences no longer
    than `width`) and small (FOLD_ELEMENTS): the tiny UNet's attention at batch > 1, as in its sample grids."""
    return batch > 1 and length <= width and batch * length * width <= FOLD_ELEMENTS


def _per_sample(weight, x):
    """The weight as [batch, out, in] for a product with x's batch (the CPU's BatchMatMul does not broadcast), copied
    only once x exists (`after`)."""
    batch = x.shape[0]
    return ops.broadcast_to(after(weight, x).reshape((1,) + weight.shape), (batch,) + weight.shape)


class ColumnsProjection(nn.Cell):
    """W x^T for each sample: x [B, L, in], weight [out, in] -> [B, out, L], as one batched product (a product per
    sample makes the graph, and its compile, grow with the batch: tiny UNet at batch 8, 38 s against 20 s).

    The product needs the weight once per sample. Its backward (`bprop`) copies the weight again instead of
    keeping the forward's copy: autodiff would keep a copy of every projection's weight per sample until the
    backward pass, more memory than the weights themselves. The weight's gradient (the pretraining's; a frozen
    weight's is never computed: the graph drops what no output needs) is the samples' products summed."""

    def construct(self, x, weight):
        return _batch_matmul_transpose_b(_per_sample(weight, x), x)

    def bprop(self, x, weight, out, dout):
        weights = _per_sample(weight, dout)  # a copy of its own: merged with the forward's, it would be kept until here
        return _batch_matmul_transpose_a(dout, weights), _batch_matmul(dout, x).sum(0)


class TokensProjection(nn.Cell):
    """x^T W^T for each sample: x [B, in, L], weight [out, in] -> [B, L, out], as one batched product; the backward
    as `ColumnsProjection`'s."""

    def construct(self, x, weight):
        return _batch_matmul_transpose_ab(x, _per_sample(weight, x))

    def bprop(self, x, weight, out, dout):
        weights = _per_sample(weight, dout)
        return _batch_matmul_transpose_ab(weights, dout), _batch_matmul_transpose_ab(dout, x).sum(0)


_columns_projection = ColumnsProjection()
_tokens_projection = TokensProjection()


class GroupNorm(nn.Cell):
    """GroupNorm over [N, C, ...], computed in fp32 for stability; params `weight`, `bias`.

    Both norms run as MindSpore's LayerNorm kernel: written out with broadcasting ops (x - mean, * weight, ...),
    each of those CPU kernels keeps a buffer of several times its output's size for the life of the graph.
    """

    def __init__(self, num_groups, num_channels, eps=1e-6, affine=True):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible by {num_groups} groups")
        self.num_groups, self.eps = num_groups, eps
        self.weight = Parameter(initializer("ones", (num_channels,), ms.float32), name="weight") if affine else None
        self.bias = Parameter(initializer("zeros", (num_channels,), ms.float32), name="bias") if affine else None
        self.norm = ops.LayerNorm(begin_norm_axis=2, begin_params_axis=1, epsilon=eps)

    def construct(self, x):
        shape, dtype = x.shape, x.dtype
        n, c, spatial = shape[0], shape[1], 1
        for d in shape[2:]:
            spatial *= d
        per_channel = (self.num_groups, c // self.num_groups, spatial)
        group_size = per_channel[1] * spatial
        # LayerNorm's kernel over each group (one fused op, forward and backward), with the per-channel affine
        # spread over the group's positions as its [groups, group_size] scale and shift.
        if self.weight is not None:  # after x: see `after`
            gamma = ops.broadcast_to(after(self.weight, x).reshape(per_channel[:2] + (1,)), per_channel)
            beta = ops.broadcast_to(after(self.bias, x).reshape(per_channel[:2] + (1,)), per_channel)
        else:
            gamma, beta = ops.ones(per_channel, ms.float32), ops.zeros(per_channel, ms.float32)
        y, _, _ = self.norm(x.astype(ms.float32).reshape(n, self.num_groups, group_size),
                            gamma.reshape(self.num_groups, group_size), beta.reshape(self.num_groups, group_size))
        return y.reshape(shape).astype(dtype)


class LayerNorm(nn.Cell):
    """LayerNorm over the last dimension, computed in fp32; params `weight`, `bias`."""

    def __init__(self, normalized_shape, eps=1e-5):
        super().__init__()
        self.weight = Parameter(initializer("ones", (normalized_shape,), ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (normalized_shape,), ms.float32), name="bias")
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        y, _, _ = self.norm(x.astype(ms.float32), self.weight, self.bias)
        return y.astype(x.dtype)


def attention(q, k, v, num_heads, impl="vanilla", mask=None):
    """Multi-head scaled dot-product attention in token layout (the text encoders', the VAE's).

    q: [B, Lq, H*D], k, v: [B, Lk, H*D] -> [B, Lq, H*D]. `mask` (optional) is additive, broadcastable
    to [B, H, Lq, Lk] (e.g. CLIP's causal mask). `impl="flash"` uses Ascend's fused kernel; `"vanilla"` without a
    mask is `ChunkedAttention` (probabilities recomputed in the backward); with a mask (CLIP's 77 tokens, whose
    probabilities are small) it is plain autodiff. The head split costs Transpose kernels: the UNet, where they
    add up, uses `heads_first_attention`.
    """
    b, lq, inner = q.shape
    lk = k.shape[1]
    d = inner // num_heads
    if impl == "flash" and not flash_attention_allowed(q.dtype, num_heads, d):
        impl = "vanilla"
    if impl != "flash" and mask is None:
        q = q.reshape(b, lq, num_heads, d).transpose(0, 2, 3, 1) * (1.0 / math.sqrt(d))
        k = k.reshape(b, lk, num_heads, d).transpose(0, 2, 3, 1)
        v = v.reshape(b, lk, num_heads, d).transpose(0, 2, 3, 1)
        out = _chunked_attention(q, k, v)
        return out.transpose(0, 3, 1, 2).reshape(b, lq, inner)
    q = q.reshape(b, lq, num_heads, d).transpose(0, 2, 1, 3)
    k = k.reshape(b, lk, num_heads, d).transpose(0, 2, 1, 3)
    v = v.reshape(b, lk, num_heads, d).transpose(0, 2, 1, 3)
    if impl == "flash":
        out = ops.flash_attention_score(
            q, k, v, num_heads, attn_mask=None if mask is None else (mask < 0).astype(ms.uint8),
            scalar_value=1.0 / math.sqrt(d), input_layout="BNSD",
        )
    else:
        scores = _batch_matmul_transpose_b(q * (1.0 / math.sqrt(d)), k) + mask.astype(q.dtype)
        probs = _softmax(scores.astype(ms.float32)).astype(v.dtype)
        out = _batch_matmul(probs, v)
    return out.transpose(0, 2, 1, 3).reshape(b, lq, inner)


def heads_first_attention(q, k, v, num_heads):
    """Attention on projections in column layout (`Linear.to_columns`), for the UNet: q [B, H*D, Lq], k, v
    [B, H*D, Lk] -> [B, H*D, Lq], for `Linear.from_columns`. Heads first, without a Transpose kernel: the reshapes
    to [B, H, D, L] move nothing, and `ChunkedAttention` takes its transposes by flag."""
    b, inner, lq = q.shape
    lk = k.shape[2]
    d = inner // num_heads
    q = q.reshape(b, num_heads, d, lq) * (1.0 / math.sqrt(d))
    out = _chunked_attention(q, k.reshape(b, num_heads, d, lk), v.reshape(b, num_heads, d, lk))
    return out.reshape(b, inner, lq)


# Score elements [B, H, rows, Lk] one query chunk of `ChunkedAttention` may hold: 128 MB in fp32. Its backward holds
# about four such blocks at a time (scores/probabilities, their gradient, products).
ATTENTION_CHUNK_ELEMENTS = 2 ** 25


@ms.constexpr
def query_chunks(batch, heads, lq, lk):
    """[(start, end)] of near-equal query chunks with at most ATTENTION_CHUNK_ELEMENTS scores each (at least 1 row)."""
    rows = ATTENTION_CHUNK_ELEMENTS // (batch * heads * lk)
    if rows < 1:
        rows = 1
    count = (lq + rows - 1) // rows
    size = (lq + count - 1) // count
    bounds = []
    for start in range(0, lq, size):
        end = start + size
        if end > lq:
            end = lq
        bounds.append((start, end))
    return bounds


class ChunkedAttention(nn.Cell):
    """Attention heads first: q, k, v as [B, H, D, L] (q already scaled by 1/sqrt(D)) -> the output [B, H, D, Lq],
    i.e. (softmax(Q K^T) V)^T with Q = q^T etc., one query chunk after the other; every product takes its
    transposes by flag.

    Its backward (`bprop`) keeps only q, k, v and the output, and computes each chunk's probabilities again from q
    and k: autodiff would keep every attention's [B, H, Lq, Lk] probabilities (and more) from the forward pass
    to the backward pass. Per chunk, with P = softmax(Q K^T) and dO the output gradient:
    dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K, dK = dS^T Q (here each transposed).
    """

    def construct(self, q, k, v):
        b, h, _, lq = q.shape
        outs = []
        chunks = query_chunks(b, h, lq, k.shape[3])
        for start, end in chunks:
            q_chunk = q if len(chunks) == 1 else q[:, :, :, start:end]  # a slice is a copy
            if outs:  # one chunk after the other, so that they share the score memory
                q_chunk = ops.depend(q_chunk, outs[-1])
            probs = _softmax(_batch_matmul_transpose_a(q_chunk, k).astype(ms.float32)).astype(v.dtype)
            outs.append(_batch_matmul_transpose_b(v, probs))
        return outs[0] if len(outs) == 1 else ops.cat(outs, 3)

    def bprop(self, q, k, v, out, dout):
        b, h, _, lq = q.shape
        dq_chunks = []
        dk = None
        dv = None
        chunks = query_chunks(b, h, lq, k.shape[3])
        for start, end in chunks:
            whole = len(chunks) == 1
            # After dout (then after the previous chunk): without the dependency the graph would merge this
            # product with the forward pass's identical one, and keep the forward's scores until here.
            q_chunk = ops.depend(q if whole else q[:, :, :, start:end], dq_chunks[-1] if dq_chunks else dout)
            dout_chunk = dout if whole else dout[:, :, :, start:end]
            out_chunk = out if whole else out[:, :, :, start:end]
            probs = _softmax(_batch_matmul_transpose_a(q_chunk, k).astype(ms.float32))  # [B, H, rows, Lk]
            dprobs = _batch_matmul_transpose_a(dout_chunk, v).astype(ms.float32)
            row_dot = (dout_chunk.astype(ms.float32) * out_chunk.astype(ms.float32)).sum(2)
            # row_dot broadcast by its own op: a broadcasting Sub's CPU kernel keeps about four times its output
            # for the life of the graph, per attention and chunk
            row_dot = ops.broadcast_to(row_dot.reshape(b, h, end - start, 1), dprobs.shape)
            dscores = (probs * (dprobs - row_dot)).astype(q.dtype)
            dv_chunk = _batch_matmul(dout_chunk, probs.astype(v.dtype))
            dk_chunk = _batch_matmul(q_chunk, dscores)
            dv = dv_chunk if dv is None else dv + dv_chunk
            dk = dk_chunk if dk is None else dk + dk_chunk
            dq_chunks.append(_batch_matmul_transpose_b(k, dscores))
        dq = dq_chunks[0] if len(dq_chunks) == 1 else ops.cat(dq_chunks, 3)
        return dq, dk, dv


_chunked_attention = ChunkedAttention()


def zero_module(cell):
    """Zero every parameter of `cell` (sgm zero-initialises output projections)."""
    for p in cell.get_parameters():
        p.set_data(initializer("zeros", p.shape, p.dtype))  # lazy: stays unallocated under no_init_parameters
    return cell


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding [N] -> [N, dim], cos half first (sgm / diffusers flip_sin_to_cos)."""
    half = dim // 2
    freqs = Tensor(np.exp(-math.log(max_period) * np.arange(half, dtype=np.float32) / half), ms.float32)
    args = timesteps.astype(ms.float32).reshape(-1, 1) * freqs.reshape(1, -1)
    emb = ops.cat([ops.cos(args), ops.sin(args)], axis=-1)
    if dim % 2:
        emb = ops.cat([emb, ops.zeros_like(emb[:, :1])], axis=-1)
    return emb


def gelu(x):
    """Exact (erf) GELU, x * Phi(x), written with `erf`: MindSpore's CPU GeLU kernel keeps a buffer of about four
    times its output's size for the life of the graph (for SDXL's feed-forwards, gigabytes); this form does not."""
    return x * (ops.erf(x * (1.0 / math.sqrt(2.0))) + 1.0) * 0.5
