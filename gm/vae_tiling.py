"""Decoding latents and encoding images tile by tile, exactly: for images whose decode or encode in one piece does
not fit in memory (the full-size SDXL VAE at 1024 px on the CPU beside the loaded model: the decoder's graph alone
peaks at 10.1 GB there).

The VAE's convolutions see a pixel's neighbours only, but its GroupNorms normalize with the whole image's
statistics and its mid block attends over the whole image. So:
- the levels at up to `WHOLE_FACTOR` pixels a latent run in one piece: the mid block with its attention, and the
  levels next to it (1/16 of the pixels or fewer);
- the rest runs tile by tile. The image is cut into a grid of cores of about `tile` x `tile` latents; each tile is
  its core grown by a halo towards the cores beside it. A tile's edge is wrong (zero padding where its neighbour's
  pixels should be), and the error creeps inward by one pixel per 3x3 convolution; the halo is as wide as all the
  convolutions of the tiled part together (`decoder_halo`, `encoder_halo`: 3 latents for SDXL's VAE), so the cores
  stay exact;
- each GroupNorm takes its statistics over all the cores together, the whole image's, then normalizes each tile.
The cores, put together, are the output: the tiles agree with the image decoded in one piece to float rounding (no
seams, no tone shifts; diffusers' `enable_vae_tiling` normalizes each tile by itself and blends the overlaps).

The layers run op by op, in MindSpore's PyNative mode for the call (`gm.device.eager_mode`): compiled, every tile
size of every layer would keep a graph's memory for the process's life. Between layers the tiles are numpy arrays
(freed to the system when dropped; MindSpore's CPU pool keeps what it once held), the whole image's activation plus
the halos; a layer's larger buffers (its normalized input, the convolution's unfolded input) exist for one tile at
a time. Measured, the full-size decoder alone at 1024 px: 5.1 GB peak and 218 s in 512 px tiles, against 10.1 GB
and 135 s for its graph in one piece (`benchmarks/bench_vae.py`).
"""
import math

import mindspore as ms
import numpy as np
from mindspore import Tensor

from gm.device import eager_mode
from gm.modules.diffusionmodules.model import nonlinearity

TILE = 64  # latents: 512 px cores, SDXL's decode at the size where it fits beside the full model on the CPU
WHOLE_FACTOR = 2  # pixels a latent: the levels at this resolution or below (1/16 of the pixels) run in one piece


class TileGrid:
    """An image of `height` x `width` latents as a grid of cores of about `tile` latents a side (spread evenly),
    each inside a tile grown by `halo` latents towards its neighbours (clipped to the image)."""

    def __init__(self, height, width, tile, halo):
        self.rows = self._spans(height, tile, halo)
        self.cols = self._spans(width, tile, halo)

    @staticmethod
    def _spans(size, tile, halo):
        """Per core along an axis: (tile start, tile end, core start, core end), in latents."""
        count = -(-size // tile)
        bounds = [round(i * size / count) for i in range(count + 1)]
        return [(max(start - halo, 0), min(end + halo, size), start, end) for start, end in zip(bounds, bounds[1:])]

    def cut(self, x, factor):
        """x [B, C, H * factor, W * factor] (numpy) -> its tiles (views, row by row)."""
        return [x[:, :, top * factor:bottom * factor, left * factor:right * factor]
                for top, bottom, _, _ in self.rows for left, right, _, _ in self.cols]

    def cores(self, tiles, factor):
        """The core of each tile (tiles [B, C, h * factor, w * factor])."""
        spans = [(row, col) for row in self.rows for col in self.cols]
        return [t[:, :, (core_top - top) * factor:(core_bottom - top) * factor,
                  (core_left - left) * factor:(core_right - left) * factor]
                for t, ((top, _, core_top, core_bottom), (left, _, core_left, core_right)) in zip(tiles, spans)]

    def assemble(self, tiles, factor):
        """The image [B, C, H * factor, W * factor] (numpy) that the tiles' cores make up."""
        cores = self.cores(tiles, factor)
        per_row = len(self.cols)
        return np.concatenate([np.concatenate(cores[i:i + per_row], 3) for i in range(0, len(cores), per_row)], 2)


def _halo(convolutions):
    """Latents a tile's edge error reaches through `convolutions`, (reach in pixels, pixels per latent) each."""
    return math.ceil(sum(reach / factor for reach, factor in convolutions))


def decoder_halo(decoder):
    """The halo the decoder's tiled part needs: the 3x3 convolutions above `WHOLE_FACTOR` pixels a latent (its
    levels', the upsamplings', `conv_out`), each reaching one pixel at its resolution (SDXL's VAE: 2.75 latents)."""
    convolutions = []
    for level in range(decoder.num_resolutions):  # lowest resolution first, one latent a pixel
        factor = 2 ** level
        convolutions += [(1, factor)] * 2 * (decoder.num_res_blocks + 1)
        if level < decoder.num_resolutions - 1:
            convolutions.append((1, 2 * factor))  # the upsampling's convolution
    convolutions.append((1, 2 ** (decoder.num_resolutions - 1)))  # conv_out
    return _halo([c for c in convolutions if c[1] > WHOLE_FACTOR])


def encoder_halo(encoder):
    """The halo the encoder's tiled part needs: the convolutions on inputs above `WHOLE_FACTOR` pixels a latent
    (`conv_in`, its levels' 3x3 ones reaching one pixel, the downsamplings' stride-2 ones two; SDXL's VAE:
    2.375 latents)."""
    top = 2 ** (encoder.num_resolutions - 1)
    convolutions = [(1, top)]  # conv_in
    for level in range(encoder.num_resolutions):
        factor = top // 2 ** level
        convolutions += [(1, factor)] * 2 * encoder.num_res_blocks
        if level < encoder.num_resolutions - 1:
            convolutions.append((2, factor))
    return _halo([c for c in convolutions if c[1] > WHOLE_FACTOR])


def _drain(items):
    """The list's items, each taken off the list as it is handed out: the caller's list no longer keeps it alive."""
    while items:
        yield items.pop(0)


def _group_norm(norm, tiles, grid, factor):
    """`norm` (a `gm.modules.layers.GroupNorm`) applied to each tile, one at a time (a generator of tensors that
    drains `tiles`), with the statistics of all the cores together.

    Each core's per-group mean and sum of squared deviations are merged in float64 (Chan et al.'s pairwise
    formula), then folded with the norm's affine into one scale and shift per channel."""
    batch, channels = tiles[0].shape[:2]
    groups = norm.num_groups
    count, mean, m2 = 0, np.zeros((batch, groups)), np.zeros((batch, groups))
    for core in grid.cores(tiles, factor):
        x = core.reshape(batch, groups, -1)
        n = x.shape[2]
        core_mean = x.mean(2, dtype=np.float64)
        core_m2 = np.square(x - core_mean[:, :, None].astype(x.dtype), dtype=np.float64).sum(2)
        delta = core_mean - mean
        total = count + n
        mean = mean + delta * n / total
        m2 = m2 + core_m2 + delta ** 2 * count * n / total
        count = total
    rstd = 1.0 / np.sqrt(m2 / count + norm.eps)  # the biased variance, as torch's and the kernel's
    per_channel = channels // groups
    scale = np.repeat(rstd, per_channel, 1) * norm.weight.asnumpy()
    shift = norm.bias.asnumpy() - np.repeat(mean, per_channel, 1) * scale
    scale = scale.reshape(batch, channels, 1, 1).astype(tiles[0].dtype)
    shift = shift.reshape(batch, channels, 1, 1).astype(tiles[0].dtype)
    return (Tensor(t * scale + shift) for t in _drain(tiles))


def _each(cell, tiles):
    """`cell` over the tiles (drained)."""
    return [cell(Tensor(t)).asnumpy() for t in _drain(tiles)]


def _resnet_block(block, tiles, grid, factor):
    """`ResnetBlock.construct` over the tiles (drained), its GroupNorms with the statistics of the whole image."""
    hidden = [block.conv1(nonlinearity(t)).asnumpy() for t in _group_norm(block.norm1, list(tiles), grid, factor)]
    hidden = [block.conv2(block.dropout(nonlinearity(t))).asnumpy()
              for t in _group_norm(block.norm2, hidden, grid, factor)]
    return [(block.nin_shortcut(Tensor(t)).asnumpy() if block.has_shortcut else t) + h
            for t, h in zip(_drain(tiles), _drain(hidden))]


def _check_attention_in_mid_block_only(levels):
    if any(len(level.attn) for level in levels):
        raise ValueError("VAE tiling needs a VAE whose only attention is its mid block's (as SDXL's); this one "
                         "attends at other levels too (attn_resolutions): decode it in one piece")


def decode_tiled(vae, z, tile=None):
    """Images [B, 3, 8h, 8w] (numpy) from unscaled latents z [B, embed_dim, h, w] with `vae` (an
    `AutoencoderKL`), in tiles of about `tile` x `tile` latents (default `TILE`); as `vae.decode(z)`."""
    decoder = vae.decoder
    _check_attention_in_mid_block_only(decoder.up)
    height, width = z.shape[2:]
    whole = TileGrid(height, width, max(height, width), 0)  # one tile: the image
    grid = TileGrid(height, width, tile or TILE, decoder_halo(decoder))
    with eager_mode():
        h = decoder.conv_in(vae.post_quant_conv(z.astype(vae.dtype)))
        tiles, layout, factor = [decoder.mid.block_2(decoder.mid.attn_1(decoder.mid.block_1(h))).asnumpy()], whole, 1
        del h
        for level in reversed(range(decoder.num_resolutions)):
            up = decoder.up[level]
            for block in up.block:
                tiles = _resnet_block(block, tiles, layout, factor)
            if level != 0:
                if layout is whole and 2 * factor > WHOLE_FACTOR:
                    tiles, layout = grid.cut(tiles[0], factor), grid
                tiles, factor = _each(up.upsample, tiles), factor * 2
        tiles = [decoder.conv_out(nonlinearity(t)).asnumpy()
                 for t in _group_norm(decoder.norm_out, tiles, layout, factor)]
        return layout.assemble(tiles, factor).astype(np.float32)


def encode_tiled(vae, x, tile=None):
    """Posterior means [B, embed_dim, H/8, W/8] (a tensor) of images x [B, 3, H, W] in [-1, 1] with `vae` (an
    `AutoencoderKL`), in tiles of about `tile` x `tile` latents (default `TILE`); as `vae.encode_mean(x)`."""
    encoder = vae.encoder
    _check_attention_in_mid_block_only(encoder.down)
    factor = 2 ** (encoder.num_resolutions - 1)
    height, width = x.shape[2] // factor, x.shape[3] // factor
    whole = TileGrid(height, width, max(height, width), 0)
    grid = TileGrid(height, width, tile or TILE, encoder_halo(encoder))
    layout = grid if factor > WHOLE_FACTOR else whole
    with eager_mode():
        tiles = [encoder.conv_in(Tensor(t).astype(vae.dtype)).asnumpy() for t in layout.cut(x.asnumpy(), factor)]
        for level in range(encoder.num_resolutions):
            down = encoder.down[level]
            for block in down.block:
                tiles = _resnet_block(block, tiles, layout, factor)
            if level != encoder.num_resolutions - 1:
                tiles, factor = _each(down.downsample, tiles), factor // 2
                if layout is grid and factor <= WHOLE_FACTOR:
                    tiles, layout = [grid.assemble(tiles, factor)], whole
        h = encoder.mid.block_2(encoder.mid.attn_1(encoder.mid.block_1(Tensor(tiles[0]))))
        del tiles
        moments = vae.quant_conv(encoder.conv_out(nonlinearity(encoder.norm_out(h))))
        return moments[:, :vae.embed_dim].astype(ms.float32)
