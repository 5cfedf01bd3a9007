"""Primitive layers whose parameter names match PyTorch's (`weight`, `bias`), so that the
original SDXL checkpoint keys load as they are, and whose kernels are chosen per device here,
in one place:

- convolution: MindSpore's native CPU conv2d is ~80x slower than an im2col (`ops.unfold`) +
  matmul formulation on x86 (see ../shared/notes/mindspore-on-cpu.md), so CPU uses im2col and
  Ascend/GPU use the native op;
- attention: plain softmax(QK^T/sqrt(d))V everywhere, or the fused flash-attention kernel on Ascend.

Matrix products go through `MatMul` / `BatchMatMul` with their transpose flags rather than `ops.matmul` on a
transposed or broadcast operand: the latter materialises a transposed (or per-sample) copy of every weight in the
forward pass, and a graph keeps those copies alive until the backward pass has used them: for a frozen SDXL, more
memory than the weights themselves.
"""
import math

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import HeUniform, Uniform, initializer


_matmul = ops.MatMul()
_matmul_transpose_b = ops.MatMul(transpose_b=True)
_batch_matmul = ops.BatchMatMul()
_batch_matmul_transpose_b = ops.BatchMatMul(transpose_b=True)


def on_cpu():
    return ms.get_context("device_target") == "CPU"


def default_conv_impl():
    """`"im2col"` on CPU (fast there), `"native"` on Ascend/GPU."""
    return "im2col" if on_cpu() else "native"


def default_attention_impl():
    """`"flash"` (fused kernel) on Ascend, `"vanilla"` elsewhere."""
    return "flash" if ms.get_context("device_target") == "Ascend" else "vanilla"


class Conv2d(nn.Cell):
    """2-D convolution with torch's parameter layout: weight [out, in, kh, kw], bias [out]."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, impl=None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.impl = impl or default_conv_impl()
        if self.impl not in ("im2col", "native"):
            raise ValueError(f"conv impl must be 'im2col' or 'native', got {self.impl!r}")
        fan_in = in_channels * kernel_size * kernel_size
        self.weight = Parameter(
            initializer(HeUniform(math.sqrt(5)), (out_channels, in_channels, kernel_size, kernel_size), ms.float32),
            name="weight",
        )
        bound = 1 / math.sqrt(fan_in)
        self.bias = Parameter(initializer(Uniform(bound), (out_channels,), ms.float32), name="bias") if bias else None

    def construct(self, x):
        if self.impl == "native":
            pad = self.padding
            y = ops.conv2d(x, self.weight.astype(x.dtype), None, self.stride, "pad", (pad, pad))
        else:
            y = self._im2col_conv(x)
        if self.bias is not None:
            y = ops.bias_add(y, self.bias.astype(y.dtype))
        return y

    def _im2col_conv(self, x):
        n, c, h, w = x.shape
        k, s, p = self.kernel_size, self.stride, self.padding
        weight = self.weight.astype(x.dtype).reshape(self.out_channels, c * k * k)
        if k == 1 and s == 1 and p == 0:
            if n == 1:
                return _matmul(weight, x.reshape(c, h * w)).reshape(1, self.out_channels, h, w)
            # as [c, n*h*w]: this moves x, not the weight
            y = _matmul(weight, x.transpose(1, 0, 2, 3).reshape(c, n * h * w))
            return y.reshape(self.out_channels, n, h, w).transpose(1, 0, 2, 3)
        h_out = (h + 2 * p - k) // s + 1
        w_out = (w + 2 * p - k) // s + 1
        # One 2-D product per sample: a batched product would broadcast (copy) the weight to every sample.
        outputs = []
        for i in range(n):
            cols = ops.unfold(x if n == 1 else x[i:i + 1], k, 1, p, s)  # [1, c*k*k, h_out*w_out]
            outputs.append(_matmul(weight, cols.reshape(c * k * k, h_out * w_out)))
        y = outputs[0] if n == 1 else ops.stack(outputs)
        return y.reshape(n, self.out_channels, h_out, w_out)


class Linear(nn.Cell):
    """y = x W^T + b with torch's layout: weight [out, in], bias [out]."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        bound = 1 / math.sqrt(in_features)
        self.weight = Parameter(initializer(HeUniform(math.sqrt(5)), (out_features, in_features), ms.float32), name="weight")
        self.bias = Parameter(initializer(Uniform(bound), (out_features,), ms.float32), name="bias") if bias else None

    def construct(self, x):
        shape = x.shape
        y = _matmul_transpose_b(x.reshape(-1, shape[-1]), self.weight.astype(x.dtype))
        if self.bias is not None:
            y = ops.bias_add(y, self.bias.astype(y.dtype))
        return y.reshape(shape[:-1] + (y.shape[-1],))


class GroupNorm(nn.Cell):
    """GroupNorm over [N, C, ...], computed in fp32 for stability; params `weight`, `bias`.

    Both norms run as MindSpore's LayerNorm kernel: written out with broadcasting ops (x - mean, * weight, ...),
    each of those CPU kernels keeps a buffer of several times its output's size for the life of the graph.
    """

    def __init__(self, num_groups, num_channels, eps=1e-6, affine=True):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible by {num_groups} groups")
        self.num_groups = num_groups
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
        if self.weight is not None:
            gamma = ops.broadcast_to(self.weight.reshape(per_channel[:2] + (1,)), per_channel)
            beta = ops.broadcast_to(self.bias.reshape(per_channel[:2] + (1,)), per_channel)
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
    """Multi-head scaled dot-product attention.

    q: [B, Lq, H*D], k, v: [B, Lk, H*D] -> [B, Lq, H*D]. `mask` (optional) is additive, broadcastable
    to [B, H, Lq, Lk] (e.g. CLIP's causal mask). `impl="flash"` uses Ascend's fused kernel.
    """
    b, lq, inner = q.shape
    lk = k.shape[1]
    d = inner // num_heads
    q = q.reshape(b, lq, num_heads, d).transpose(0, 2, 1, 3)
    k = k.reshape(b, lk, num_heads, d).transpose(0, 2, 1, 3)
    v = v.reshape(b, lk, num_heads, d).transpose(0, 2, 1, 3)
    if impl == "flash":
        out = ops.flash_attention_score(
            q, k, v, num_heads, attn_mask=None if mask is None else (mask < 0).astype(ms.uint8),
            scalar_value=1.0 / math.sqrt(d), input_layout="BNSD",
        )
    else:
        scores = _batch_matmul_transpose_b(q * (1.0 / math.sqrt(d)), k)
        if mask is not None:
            scores = scores + mask.astype(scores.dtype)
        probs = ops.softmax(scores.astype(ms.float32), -1).astype(v.dtype)
        out = _batch_matmul(probs, v)
    return out.transpose(0, 2, 1, 3).reshape(b, lq, inner)


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
