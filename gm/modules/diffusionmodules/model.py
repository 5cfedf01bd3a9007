"""The convolutional encoder and decoder of SDXL's KL autoencoder (sgm's `diffusionmodules/model.py`).

Parameter names follow sgm, so the original checkpoint's `first_stage_model.encoder.*` / `decoder.*` keys
load as they are. The autoencoder never uses a timestep embedding, so the residual blocks have none.
"""
from mindspore import nn, ops

from gm.modules.layers import Conv2d, GroupNorm, attention, default_attention_impl


def nonlinearity(x):
    """swish"""
    return x * ops.sigmoid(x)


def Normalize(in_channels, num_groups=32):
    return GroupNorm(num_groups, in_channels, eps=1e-6)


class Upsample(nn.Cell):
    """Nearest-neighbour x2, then (with_conv) a 3x3 conv."""

    def __init__(self, in_channels, with_conv, conv_impl=None):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = Conv2d(in_channels, in_channels, 3, padding=1, impl=conv_impl)

    def construct(self, x):
        x = ops.interpolate(x, size=(x.shape[2] * 2, x.shape[3] * 2), mode="nearest")
        if self.with_conv:
            x = self.conv(x)
        return x


def pad_right_bottom(x):
    """x with one zero column on the right and one zero row at the bottom, as sgm's `pad(x, (0, 1, 0, 1))`.

    Written as concatenations because MindSpore 2.10's CPU kernel for the gradient of `ops.pad` never returns on
    some calls of a compiled graph (its 9th to 17th, by input size), which froze VAE training at the encoder.
    """
    n, c, h, w = x.shape
    x = ops.concat((x, ops.zeros((n, c, h, 1), x.dtype)), 3)
    return ops.concat((x, ops.zeros((n, c, 1, w + 1), x.dtype)), 2)


class Downsample(nn.Cell):
    """Stride-2 3x3 conv after padding right and bottom only (sgm's asymmetric pad), or 2x2 average pooling."""

    def __init__(self, in_channels, with_conv, conv_impl=None):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = Conv2d(in_channels, in_channels, 3, stride=2, padding=0, impl=conv_impl)

    def construct(self, x):
        if self.with_conv:
            return self.conv(pad_right_bottom(x))
        return ops.avg_pool2d(x, 2, 2)


class ResnetBlock(nn.Cell):
    """norm-swish-conv twice plus a skip; a 1x1 `nin_shortcut` when the channel count changes."""

    def __init__(self, *, in_channels, out_channels=None, dropout=0.0, conv_impl=None):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, impl=conv_impl)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(p=dropout)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, impl=conv_impl)
        self.has_shortcut = in_channels != out_channels
        if self.has_shortcut:
            self.nin_shortcut = Conv2d(in_channels, out_channels, 1, impl=conv_impl)

    def construct(self, x):
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.has_shortcut:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Cell):
    """Single-head self-attention over the H*W positions, projections as 1x1 convs `q`, `k`, `v`, `proj_out`.

    At 1024 px the mid blocks attend over 128*128 = 16384 positions, so the plain (non-flash) path splits the
    queries into chunks of `query_chunk`, run one after the other: a fp32 score block is then 1024 x 16384
    (64 MiB), not 16384 x 16384 (1 GiB). Measured on CPU, graph mode, AttnBlock(512) at 128x128: the
    attention adds 0.25 GiB to peak memory chunked, 2.1 GiB unchunked.
    """

    query_chunk = 1024

    def __init__(self, in_channels, conv_impl=None, attn_impl=None):
        super().__init__()
        self.norm = Normalize(in_channels)
        self.q = Conv2d(in_channels, in_channels, 1, impl=conv_impl)
        self.k = Conv2d(in_channels, in_channels, 1, impl=conv_impl)
        self.v = Conv2d(in_channels, in_channels, 1, impl=conv_impl)
        self.proj_out = Conv2d(in_channels, in_channels, 1, impl=conv_impl)
        self.attn_impl = attn_impl or default_attention_impl()

    def construct(self, x):
        h_ = self.norm(x)
        b, c, height, width = h_.shape
        n = height * width
        q = self.q(h_).reshape(b, c, n).transpose(0, 2, 1)
        k = self.k(h_).reshape(b, c, n).transpose(0, 2, 1)
        v = self.v(h_).reshape(b, c, n).transpose(0, 2, 1)
        if self.attn_impl == "flash" or n <= self.query_chunk:
            h_ = attention(q, k, v, 1, self.attn_impl)
        else:
            chunks = []
            for start in range(0, n, self.query_chunk):
                q_chunk = q[:, start:start + self.query_chunk]
                if chunks:  # one chunk after the other, so the graph can reuse the score memory
                    q_chunk = ops.depend(q_chunk, chunks[-1])
                chunks.append(attention(q_chunk, k, v, 1, self.attn_impl))
            h_ = ops.cat(chunks, axis=1)
        h_ = h_.transpose(0, 2, 1).reshape(b, c, height, width)
        return x + self.proj_out(h_)


class Encoder(nn.Cell):
    """Image [B, in_channels, H, W] -> [B, 2*z_channels (double_z) or z_channels, H/f, W/f], f = 2**(levels-1).

    `ddconfig` is shared with the Decoder, so keys meant for it (`out_ch`) are accepted and ignored, as in sgm.
    """

    def __init__(self, *, ch, ch_mult=(1, 2, 4, 8), num_res_blocks, attn_resolutions, dropout=0.0,
                 resamp_with_conv=True, in_channels, resolution, z_channels, double_z=True,
                 conv_impl=None, attn_impl=None, **ignore_kwargs):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = Conv2d(in_channels, ch, 3, padding=1, impl=conv_impl)

        curr_res = resolution
        in_ch_mult = (1,) + tuple(ch_mult)
        levels = []
        for i_level in range(self.num_resolutions):
            block, attn = [], []
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout,
                                         conv_impl=conv_impl))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in, conv_impl, attn_impl))
            down = nn.Cell()
            down.block = nn.CellList(block)
            down.attn = nn.CellList(attn)
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv, conv_impl)
                curr_res //= 2
            levels.append(down)
        self.down = nn.CellList(levels)

        self.mid = nn.Cell()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout,
                                       conv_impl=conv_impl)
        self.mid.attn_1 = AttnBlock(block_in, conv_impl, attn_impl)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout,
                                       conv_impl=conv_impl)

        self.norm_out = Normalize(block_in)
        self.conv_out = Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1, impl=conv_impl)

    def construct(self, x):
        h = self.conv_in(x)
        for i_level in range(self.num_resolutions):
            down = self.down[i_level]
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)

        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Cell):
    """Latent [B, z_channels, h, w] -> image [B, out_ch, h*f, w*f]; `up.0` is the full-resolution level.

    Keys of the shared `ddconfig` meant for the Encoder (`in_channels`, `double_z`) are ignored, as in sgm.
    """

    def __init__(self, *, ch, out_ch, ch_mult=(1, 2, 4, 8), num_res_blocks, attn_resolutions, dropout=0.0,
                 resamp_with_conv=True, resolution, z_channels, conv_impl=None, attn_impl=None, **ignore_kwargs):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = Conv2d(z_channels, block_in, 3, padding=1, impl=conv_impl)

        self.mid = nn.Cell()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout,
                                       conv_impl=conv_impl)
        self.mid.attn_1 = AttnBlock(block_in, conv_impl, attn_impl)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout,
                                       conv_impl=conv_impl)

        levels = []  # built from the lowest resolution up, stored highest first
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = [], []
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout,
                                         conv_impl=conv_impl))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in, conv_impl, attn_impl))
            up = nn.Cell()
            up.block = nn.CellList(block)
            up.attn = nn.CellList(attn)
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv, conv_impl)
                curr_res *= 2
            levels.insert(0, up)
        self.up = nn.CellList(levels)

        self.norm_out = Normalize(block_in)
        self.conv_out = Conv2d(block_in, out_ch, 3, padding=1, impl=conv_impl)

    def construct(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))
