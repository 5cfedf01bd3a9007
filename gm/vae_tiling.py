"""Decoding latents in overlapping tiles, for images whose decode in one piece does not fit in memory: the full-size
SDXL VAE at 1024 px on the CPU beside the loaded model (measured: out of memory at 24.3 GB of the machine's 25.7 GB).

The tiles are `tile` x `tile` latents, all of one size (so the decoder compiles once), spread evenly so that
neighbours overlap by at least `overlap` latents. Each decoded tile is weighted by linear ramps across the
overlaps it shares with its neighbours (1 elsewhere, and along the image's border), and the weighted tiles are
summed and divided by the summed weights: no seam. But the decoder's GroupNorms and its mid-block attention see one
tile at a time, so tones may differ from the image decoded in one piece (as with diffusers' `enable_vae_tiling`):
on the pretrained tiny model, 64 px tiles of a 128 px image differ from the whole by 0.08 on average (of [-1, 1]).
So tiling is asked for (`--vae_tiling True`), never the default.
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


def decode_tiled(decode, z, factor, tile=None, overlap=None):
    """Images [B, C, H * factor, W * factor] (numpy) from latents z [B, c, H, W] (a MindSpore tensor), decoded by
    `decode` (latents -> images tensor) tile by tile (default: TILE, OVERLAP)."""
    tile, overlap = tile or TILE, overlap or OVERLAP
    _, _, height, width = z.shape
    tile_h, tile_w = min(tile, height), min(tile, width)
    rows, cols = tile_starts(height, tile_h, overlap), tile_starts(width, tile_w, overlap)
    row_weights, col_weights = tile_weights(rows, tile_h, factor), tile_weights(cols, tile_w, factor)
    total = weight_sum = None
    for top, w_row in zip(rows, row_weights):
        for left, w_col in zip(cols, col_weights):
            image = decode(z[:, :, top:top + tile_h, left:left + tile_w]).asnumpy()
            if total is None:
                total = np.zeros(image.shape[:2] + (height * factor, width * factor), np.float32)
                weight_sum = np.zeros((height * factor, width * factor), np.float32)
            w = np.outer(w_row, w_col)
            y, x = top * factor, left * factor
            total[:, :, y:y + image.shape[2], x:x + image.shape[3]] += image * w
            weight_sum[y:y + image.shape[2], x:x + image.shape[3]] += w
    return total / weight_sum
