"""Primitive layers whose parameter names match PyTorch's (`weight`, `bias`), so that the
original SDXL checkpoint keys load as they are, and whose kernels are chosen per device here,
in one place:

- convolution: MindSpore's native CPU conv2d is ~80x slower than an im2col (`ops.unfold`) +
  matmul formulation on x86 (see ../shared/notes/mindspore-on-cpu.md), so CPU uses im2col and
  Ascend/GPU use the native op;
- attention: plain softmax(QK^T/sqrt(d))V everywhere, or the fused flash-attention kernel on Ascend.
"""
import math

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import HeUniform, Uniform, initializer


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
            y = y + self.bias.astype(y.dtype).reshape(1, -1, 1, 1)
        return y

    def _im2col_conv(self, x):
        n, c, h, w = x.shape
        k, s, p = self.kernel_size, self.stride, self.padding
        weight = self.weight.astype(x.dtype).reshape(self.out_channels, c * k * k)
        if k == 1 and s == 1 and p == 0:
            return ops.matmul(weight, x.reshape(n, c, h * w)).reshape(n, self.out_channels, h, w)
        h_out = (h + 2 * p - k) // s + 1
        w_out = (w + 2 * p - k) // s + 1
        cols = ops.unfold(x, k, 1, p, s)  # [n, c*k*k, h_out*w_out]
        return ops.matmul(weight, cols).reshape(n, self.out_channels, h_out, w_out)


class Linear(nn.Cell):
    """y = x W^T + b with torch's layout: weight [out, in], bias [out]."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        bound = 1 / math.sqrt(in_features)
        self.weight = Parameter(initializer(HeUniform(math.sqrt(5)), (out_features, in_features), ms.float32), name="weight")
        self.bias = Parameter(initializer(Uniform(bound), (out_features,), ms.float32), name="bias") if bias else None

    def construct(self, x):
        y = ops.matmul(x, self.weight.astype(x.dtype).T)
        if self.bias is not None:
            y = y + self.bias.astype(y.dtype)
        return y


class GroupNorm(nn.Cell):
    """GroupNorm over [N, C, ...], computed in fp32 for stability; params `weight`, `bias`."""

    def __init__(self, num_groups, num_channels, eps=1e-6, affine=True):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible by {num_groups} groups")
        self.num_groups, self.eps = num_groups, eps
        self.weight = Parameter(initializer("ones", (num_channels,), ms.float32), name="weight") if affine else None
        self.bias = Parameter(initializer("zeros", (num_channels,), ms.float32), name="bias") if affine else None

    def construct(self, x):
        shape, dtype = x.shape, x.dtype
        g = x.astype(ms.float32).reshape(shape[0], self.num_groups, -1)
        mean = g.mean(-1, keep_dims=True)
        var = ops.square(g - mean).mean(-1, keep_dims=True)
        g = (g - mean) / ops.sqrt(var + self.eps)
        y = g.reshape(shape)
        if self.weight is not None:
            affine_shape = (1, -1) + (1,) * (len(shape) - 2)
            y = y * self.weight.reshape(affine_shape) + self.bias.reshape(affine_shape)
        return y.astype(dtype)


class LayerNorm(nn.Cell):
    """LayerNorm over the last dimension, computed in fp32; params `weight`, `bias`."""

    def __init__(self, normalized_shape, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(initializer("ones", (normalized_shape,), ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (normalized_shape,), ms.float32), name="bias")

    def construct(self, x):
        dtype = x.dtype
        x = x.astype(ms.float32)
        mean = x.mean(-1, keep_dims=True)
        var = ops.square(x - mean).mean(-1, keep_dims=True)
        y = (x - mean) / ops.sqrt(var + self.eps) * self.weight + self.bias
        return y.astype(dtype)


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
        scores = ops.matmul(q, k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(d))
        if mask is not None:
            scores = scores + mask.astype(scores.dtype)
        probs = ops.softmax(scores.astype(ms.float32), -1).astype(v.dtype)
        out = ops.matmul(probs, v)
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
