"""The UNet's transformer: SpatialTransformer -> BasicTransformerBlock -> CrossAttention / FeedForward.

Parameter names follow sgm's `sgm/modules/attention.py`, so the original checkpoint's keys
(`...transformer_blocks.0.attn1.to_q.weight`, `...ff.net.0.proj.weight`, ...) load as they are.
Layout changes go through the products' transpose flags, not Transpose kernels (see `gm.modules.layers`).
"""
from mindspore import nn, ops

from gm.modules.recompute import recomputed
from gm.modules.layers import (
    GroupNorm, LayerNorm, Linear, attention, default_attention_impl, flash_attention_allowed, gelu,
    heads_first_attention, zero_module,
)


class GEGLU(nn.Cell):
    """Gated GELU: one projection to twice the width, half of it (exact-erf GELU) gating the other half."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.dim_out = dim_out
        self.proj = Linear(dim_in, dim_out * 2)

    def construct(self, x):
        # halved by `Split`: MindSpore's CPU StridedSlice kernel (h[..., :n]) costs about 0.5 ms a call whatever its
        # size; products on the weight's halves instead would keep copies of them for the backward pass
        value, gate = ops.split(self.proj(x), self.dim_out, -1)
        return value * gelu(gate)


class FeedForward(nn.Cell):
    def __init__(self, dim, dim_out=None, mult=4):
        super().__init__()
        inner_dim = int(dim * mult)
        # net.1 is sgm's dropout slot: kept as an identity so the output layer stays `net.2`.
        self.net = nn.SequentialCell([GEGLU(dim, inner_dim), nn.Identity(), Linear(inner_dim, dim_out or dim)])

    def construct(self, x):
        return self.net(x)


class CrossAttention(nn.Cell):
    """Multi-head attention of `x` over `context` (over `x` itself when `context` is None)."""

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, attn_impl=None):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads, self.dim_head = heads, dim_head
        self.attn_impl = attn_impl or default_attention_impl()
        self.to_q = Linear(query_dim, inner_dim, bias=False)
        self.to_k = Linear(context_dim, inner_dim, bias=False)
        self.to_v = Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.SequentialCell([Linear(inner_dim, query_dim)])  # sgm's key: to_out.0
        # The same Linear by attribute: where a recomputed block's backward differentiates this cell again
        # (`gm.modules.recompute`), MindSpore 2.10 cannot compile an indexed SequentialCell.
        object.__setattr__(self, "out_proj", self.to_out[0])

    def construct(self, x, context=None):
        if context is None:
            context = x
        if self.attn_impl == "flash" and flash_attention_allowed(x.dtype, self.heads, self.dim_head):
            # Ascend's fused kernel, in token layout (transposes are cheap there)
            return self.out_proj(attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, "flash"))
        out = heads_first_attention(self.to_q.to_columns(x), self.to_k.to_columns(context),
                                    self.to_v.to_columns(context), self.heads)
        return self.out_proj.from_columns(out)


class BasicTransformerBlock(nn.Cell):
    """Pre-norm self-attention, cross-attention over the text context, then a GEGLU feed-forward."""

    def __init__(self, dim, n_heads, d_head, context_dim=None, attn_impl=None):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, n_heads, d_head, attn_impl)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, attn_impl)
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)
        self.norm3 = LayerNorm(dim)

    def construct(self, x, context=None):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Cell):
    """Transformer over the H*W positions of a feature map, with linear in/out projections
    (sgm's `use_linear=True`, the SDXL layout); the output projection starts at zero."""

    def __init__(self, in_channels, n_heads, d_head, depth=1, context_dim=None, attn_impl=None, recompute=False):
        super().__init__()
        inner_dim = n_heads * d_head
        self.norm = GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = Linear(in_channels, inner_dim)
        self.transformer_blocks = nn.CellList(
            [BasicTransformerBlock(inner_dim, n_heads, d_head, context_dim, attn_impl) for _ in range(depth)]
        )
        self.proj_out = zero_module(Linear(inner_dim, in_channels))
        # what runs the blocks (a plain tuple, registering nothing twice): themselves, or recomputed
        self.block_runs = tuple(recomputed(b) if recompute else b for b in self.transformer_blocks)

    def construct(self, x, context=None):
        tokens = self.tokens_in(x)
        for block in self.block_runs:
            tokens = block(tokens, context)
        return self.features_out(tokens, x)

    def tokens_in(self, x):
        """Feature map [B, C, H, W] -> tokens [B, HW, inner]."""
        b, c, h, w = x.shape
        return self.proj_in.from_columns(self.norm(x).reshape(b, c, h * w))

    def features_out(self, tokens, x_in):
        """Tokens back to the feature map's shape, plus the feature map that came in."""
        return self.proj_out.to_columns(tokens).reshape(x_in.shape) + x_in
