"""Decoding latents and encoding images in overlapping tiles, for images whose decode or encode in one piece does not
fit in memory: the full-size SDXL VAE at 1024 px on the CPU beside the loaded model (measured: the decode out of
memory at 24.3 GB of the machine's 25.7 GB; the encoder alone peaks at 5.0 GB in one piece, 2.2 GB in 512 px tiles).

The tiles are `tile` x `tile` latents (x 8 pixels when encoding), all of one size (so the decoder or encoder
compiles once), spread evenly so that neighbours overlap by at least `overlap` latents. Each tile's output is
weighted by linear ramps across the overlaps it shares with its neighbours (1 elsewhere, and along the image's
border), and the weighted tiles are summed and divided by the summed weights: no seam. But the VAE's GroupNorms and
its mid-block attention see one tile at a time, so tones may differ from the image decoded in one piece (as with
diffusers' `enable_vae_tiling`): on the pretrained tiny model, 64 px tiles of a 128 px image differ from the whole by
0.08 on average (of [-1, 1]). So tiling is asked for (`--vae_tiling True`), never the default.
"""
import numpy as np

TILE = 64  # latents: 512 px tiles, SDXL's decode at the size where it fits beside the full model on the CPU
OVERLAP = 16  # latents: 128 px


def tile_starts(size, tile, overlap):
    """The first latent row (or column) of each tile along an axis of `size` latents: one tile when it covers the
    axis, else as few as overlap by at least `overlap`, spread evenly, the last ending at the axis' end."""
    if size <= tile:
        return [0]
    count = -(-(size - overlap) // (tile - overlap))
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def tile_weights(starts, tile, factor):
    """Per tile, its pixels' weights along one axis: a linear ramp up across the overlap with the tile before, down
    across the overlap with the tile after (so that two overlapping tiles' weights sum to one), 1 elsewhere."""
    weights = []
    for i, start in enumerate(starts):
        w = np.ones(tile * factor, np.float32)
        if i > 0:
            width = (starts[i - 1] + tile - start) * factor
            w[:width] = (np.arange(width, dtype=np.float32) + 0.5) / width
        if i + 1 < len(starts):
            width = (start + tile - starts[i + 1]) * factor
            w[-width:] = np.minimum(w[-width:], (np.arange(width, 0, -1, dtype=np.float32) - 0.5) / width)
        weights.append(w)
    return weights


def blend_tiles(fn, x, in_factor, out_factor, tile=None, overlap=None):
    """`fn` over overlapping tiles of x, blended (numpy): x [B, C, H * in_factor, W * in_factor] (a MindSpore tensor)
    spans H x W latents; `fn` maps the input of a tile of t x t latents to its output [B, C', t * out_factor,
    t * out_factor] (a tensor). Tiles of `tile` latents overlapping by at least `overlap` (default: TILE, OVERLAP)."""
    tile, overlap = tile or TILE, overlap or OVERLAP
    height, width = x.shape[2] // in_factor, x.shape[3] // in_factor
    tile_h, tile_w = min(tile, height), min(tile, width)
    rows, cols = tile_starts(height, tile_h, overlap), tile_starts(width, tile_w, overlap)
    row_weights, col_weights = tile_weights(rows, tile_h, out_factor), tile_weights(cols, tile_w, out_factor)
    total = weight_sum = None
    for top, w_row in zip(rows, row_weights):
        for left, w_col in zip(cols, col_weights):
            out = fn(x[:, :, top * in_factor:(top + tile_h) * in_factor,
                       left * in_factor:(left + tile_w) * in_factor]).asnumpy()
            if total is None:
                total = np.zeros(out.shape[:2] + (height * out_factor, width * out_factor), np.float32)
                weight_sum = np.zeros((height * out_factor, width * out_factor), np.float32)
            w = np.outer(w_row, w_col)
            y, x0 = top * out_factor, left * out_factor
            total[:, :, y:y + out.shape[2], x0:x0 + out.shape[3]] += out * w
            weight_sum[y:y + out.shape[2], x0:x0 + out.shape[3]] += w
    return total / weight_sum


def decode_tiled(decode, z, factor, tile=None, overlap=None):
    """Images [B, C, H * factor, W * factor] (numpy) from latents z [B, c, H, W] (a MindSpore tensor), decoded by
    `decode` (latents -> images tensor) tile by tile (default: TILE, OVERLAP)."""
    return blend_tiles(decode, z, 1, factor, tile, overlap)


def encode_tiled(encode, x, factor, tile=None, overlap=None):
    """Latents [B, c, H / factor, W / factor] (numpy) from images x [B, C, H, W] (a MindSpore tensor), encoded by
    `encode` (images -> latents tensor) tile by tile of `tile` latents (default: TILE, OVERLAP)."""
    return blend_tiles(encode, x, factor, 1, tile, overlap)
