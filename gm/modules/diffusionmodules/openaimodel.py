"""SDXL's denoising UNet, after sgm's `sgm/modules/diffusionmodules/openaimodel.py`.

Parameter names equal the original checkpoint's keys under `model.diffusion_model.`
(`time_embed.0.weight`, `input_blocks.1.0.in_layers.2.weight`, `out.2.weight`, ...).
Parameters are fp32; `dtype` is the compute dtype (fp16/bf16 on Ascend), cast inside each layer.
"""
import mindspore as ms
from mindspore import nn, ops

from gm.modules.attention import SpatialTransformer
from gm.modules.layers import Conv2d, GroupNorm, Linear, timestep_embedding, zero_module
from gm.modules.recompute import recomputed


def normalization(channels):
    """sgm's GroupNorm32: 32 groups, torch's default eps, fp32 math."""
    return GroupNorm(32, channels, eps=1e-5)


class Downsample(nn.Cell):
    """Halve H and W with a stride-2 3x3 convolution."""

    def __init__(self, channels, out_channels=None, conv_impl=None):
        super().__init__()
        self.op = Conv2d(channels, out_channels or channels, 3, stride=2, padding=1, impl=conv_impl)

    def construct(self, x):
        return self.op(x)


class Upsample(nn.Cell):
    """Double H and W (nearest neighbour), then a 3x3 convolution."""

    def __init__(self, channels, out_channels=None, conv_impl=None):
        super().__init__()
        self.conv = Conv2d(channels, out_channels or channels, 3, padding=1, impl=conv_impl)

    def construct(self, x):
        b, c, h, w = x.shape
        # Nearest-neighbour 2x as a broadcast: exact, and a kernel every device has.
        x = ops.broadcast_to(x.reshape(b, c, h, 1, w, 1), (b, c, h, 2, w, 2)).reshape(b, c, h * 2, w * 2)
        return self.conv(x)


class ResBlock(nn.Cell):
    """Residual block: two 3x3 convolutions with the time embedding added in between."""

    def __init__(self, channels, emb_channels, out_channels=None, conv_impl=None):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.SequentialCell(
            [normalization(channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1, impl=conv_impl)]
        )
        self.emb_layers = nn.SequentialCell([nn.SiLU(), Linear(emb_channels, out_channels)])
        # out_layers.2 is sgm's dropout slot: an identity keeps the convolution at `out_layers.3`.
        self.out_layers = nn.SequentialCell([
            normalization(out_channels),
            nn.SiLU(),
            nn.Identity(),
            zero_module(Conv2d(out_channels, out_channels, 3, padding=1, impl=conv_impl)),
        ])
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = Conv2d(channels, out_channels, 1, impl=conv_impl)

    def construct(self, x, emb):
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).astype(h.dtype)
        h = h + emb_out.reshape(emb_out.shape[0], emb_out.shape[1], 1, 1)
        return self.skip_connection(x) + self.out_layers(h)


class TimestepEmbedSequential(nn.SequentialCell):
    """A sequence of layers, each given what it takes: ResBlocks the time embedding,
    SpatialTransformers the text context, the rest only the feature map. With `recompute`, ResBlocks are recomputed
    in the backward pass (`gm.modules.recompute`; the layers stay registered here, under their checkpoint names)."""

    def __init__(self, layers, recompute=False):
        super().__init__(layers)
        self.takes = tuple("emb" if isinstance(layer, ResBlock) else
                           "context" if isinstance(layer, SpatialTransformer) else "x" for layer in layers)
        self.runs = tuple(recomputed(layer) if recompute and isinstance(layer, ResBlock) else layer
                          for layer in layers)

    def construct(self, x, emb, context=None):
        for i in range(len(self.runs)):
            if self.takes[i] == "emb":
                x = self.runs[i](x, emb)
            elif self.takes[i] == "context":
                x = self.runs[i](x, context)
            else:
                x = self.runs[i](x)
        return x


class UNetModel(nn.Cell):
    """The SDXL UNet: (x [B,C,H,W], timesteps [B], context [B,L,context_dim], y [B,adm_in_channels]) -> eps.

    Takes sgm's config params (`configs/inference/sd_xl_base.yaml`) for the layouts SDXL uses: linear
    transformer projections and `num_classes: sequential` (the vector `y` embedded by an MLP). Added:
    `attn_impl` / `conv_impl` (kernels, see `gm.modules.layers`), `dtype` (compute dtype) and
    `use_recompute` (keep only each ResBlock's and transformer block's inputs for the backward pass, which runs the
    block again: `gm.modules.recompute`).
    """

    def __init__(
        self,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        channel_mult=(1, 2, 4, 8),
        num_heads=-1,
        num_head_channels=-1,
        transformer_depth=1,
        transformer_depth_middle=None,
        context_dim=None,
        num_classes=None,
        adm_in_channels=None,
        use_linear_in_transformer=True,
        legacy=False,
        attn_impl=None,
        conv_impl=None,
        dtype=ms.float32,
        use_recompute=False,
    ):
        super().__init__()
        if not use_linear_in_transformer:
            raise NotImplementedError("only linear transformer projections (use_linear_in_transformer: True)")
        if num_classes not in (None, "sequential"):
            raise NotImplementedError(f"num_classes={num_classes!r}: only None or 'sequential' is supported")
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError("set exactly one of num_heads and num_head_channels")
        # sgm's `legacy` switches between two head-width formulas that agree for transformer blocks.
        del legacy
        if isinstance(transformer_depth, int):
            transformer_depth = [transformer_depth] * len(channel_mult)
        if transformer_depth_middle is None:
            transformer_depth_middle = transformer_depth[-1]
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.dtype = getattr(ms, dtype) if isinstance(dtype, str) else dtype

        time_embed_dim = model_channels * 4
        self.time_embed = nn.SequentialCell(
            [Linear(model_channels, time_embed_dim), nn.SiLU(), Linear(time_embed_dim, time_embed_dim)]
        )
        if num_classes == "sequential":
            self.label_emb = nn.SequentialCell([nn.SequentialCell(
                [Linear(adm_in_channels, time_embed_dim), nn.SiLU(), Linear(time_embed_dim, time_embed_dim)]
            )])

        def res_block(ch_in, ch_out):
            return ResBlock(ch_in, time_embed_dim, ch_out, conv_impl)

        def transformer(ch, depth):
            if num_heads == -1:
                heads, dim_head = ch // num_head_channels, num_head_channels
            else:
                heads, dim_head = num_heads, ch // num_heads
            return SpatialTransformer(ch, heads, dim_head, depth, context_dim, attn_impl, use_recompute)

        def sequence(layers):
            return TimestepEmbedSequential(layers, use_recompute)

        self.input_blocks = nn.CellList(
            [sequence([Conv2d(in_channels, model_channels, 3, padding=1, impl=conv_impl)])]
        )
        input_block_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch, transformer_depth[level]))
                self.input_blocks.append(sequence(layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(sequence([Downsample(ch, ch, conv_impl)]))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = sequence([res_block(ch, ch), transformer(ch, transformer_depth_middle), res_block(ch, ch)])

        self.output_blocks = nn.CellList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + input_block_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch, transformer_depth[level]))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, ch, conv_impl))
                    ds //= 2
                self.output_blocks.append(sequence(layers))

        self.out = nn.SequentialCell([
            normalization(ch),
            nn.SiLU(),
            zero_module(Conv2d(model_channels, out_channels, 3, padding=1, impl=conv_impl)),
        ])

    def construct(self, x, timesteps, context=None, y=None):
        out_dtype = x.dtype
        h, emb, context = self.prepare(x, timesteps, context, y)
        hs = []
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for i, module in enumerate(self.output_blocks):
            h = module(ops.cat([h, hs[-1 - i]], axis=1), emb, context)  # skips, last in first out
        return self.out(h).astype(out_dtype)

    def prepare(self, x, timesteps, context=None, y=None):
        """(x, the time (+ label) embedding, context), all in the compute dtype."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).astype(self.dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y.astype(self.dtype))
        if context is not None:
            context = context.astype(self.dtype)
        return x.astype(self.dtype), emb, context
