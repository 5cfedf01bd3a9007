"""Decoding and encoding in tiles (`gm.vae_tiling`): the tiles' layout and blending are exact (a decoder or encoder
that works pixel by pixel gives the same result tiled and whole); on the pretrained tiny model a tiled image is near
the whole one, not equal: each tile's GroupNorms and attention see the tile only."""
import os

import numpy as np
import pytest
from mindspore import Tensor
from PIL import Image

from gm import vae_tiling
from gm.sampling import SDXLPipeline, build_engine
from gm.vae_tiling import decode_tiled, encode_tiled, tile_starts, tile_weights


@pytest.mark.parametrize("size, tile, overlap", [(128, 64, 16), (100, 64, 16), (64, 64, 16), (33, 8, 3), (65, 64, 16)])
def test_tiles_cover_each_axis_and_their_weights_sum_to_one(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == size
    assert all(overlap <= previous + tile - start < tile for previous, start in zip(starts, starts[1:]))
    factor = 3
    covered = np.zeros(size * factor, np.float32)
    for start, weight in zip(starts, tile_weights(starts, tile, factor)):
        covered[start * factor:(start + tile) * factor] += weight
    np.testing.assert_allclose(covered, 1.0, atol=1e-6)


def test_a_decoder_that_works_pixel_by_pixel_is_decoded_exactly():
    """Latents 40 x 56 in 16 x 16 tiles: the tiles, their ramps and their sum give back the whole decode."""
    z = Tensor(np.random.default_rng(0).standard_normal((2, 4, 40, 56)).astype(np.float32))

    def decode(latents):  # nearest-neighbour upsampling by 8 of three channels
        return Tensor(np.repeat(np.repeat(latents.asnumpy()[:, :3] * 2.0 + 1.0, 8, 2), 8, 3))

    tiled = decode_tiled(decode, z, 8, tile=16, overlap=4)
    np.testing.assert_allclose(tiled, decode(z).asnumpy(), rtol=0, atol=1e-5)


def test_an_encoder_that_works_pixel_by_pixel_is_encoded_exactly():
    """Images 320 x 448 (latents 40 x 56) in tiles of 16 x 16 latents: the tiles give back the whole encode."""
    x = Tensor(np.random.default_rng(2).standard_normal((2, 3, 320, 448)).astype(np.float32))

    def encode(images):  # 8 x 8 average pooling of each channel, and a fourth channel
        pooled = images.asnumpy().reshape(images.shape[0], 3, images.shape[2] // 8, 8, images.shape[3] // 8, 8)
        pooled = pooled.mean((3, 5))
        return Tensor(np.concatenate([pooled, pooled[:, :1] * 2.0 - 1.0], 1))

    tiled = encode_tiled(encode, x, 8, tile=16, overlap=4)
    np.testing.assert_allclose(tiled, encode(x).asnumpy(), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def shapes_pipeline(root):
    engine = build_engine(os.path.join(root, "configs", "inference", "sd_xl_tiny.yaml"),
                          os.path.join(root, "checkpoints", "sd_xl_tiny_shapes.safetensors"))
    return SDXLPipeline(engine)


def test_an_image_within_one_tile_is_decoded_whole(shapes_pipeline, monkeypatch):
    assert not shapes_pipeline.vae_tiling  # asked for, never the default
    monkeypatch.setattr(shapes_pipeline, "vae_tiling", True)
    z = Tensor(np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32))
    np.testing.assert_array_equal(shapes_pipeline.decode(z), shapes_pipeline.decoder(z).asnumpy())


def test_tiled_decode_of_the_tiny_model_stays_near_the_whole(shapes_pipeline, root, monkeypatch):
    """A toy picture at 128 px (latents 16 x 16) in 8 x 8 tiles (64 px, the size the tiny VAE was trained at), 3 x 3
    of them: measured mean difference 0.082 of [-1, 1] (issue 10 asks for 1e-2: not met, as each tile's GroupNorms
    see the tile only); the bound keeps it from getting worse."""
    monkeypatch.setattr(shapes_pipeline, "vae_tiling", True)
    monkeypatch.setattr(vae_tiling, "TILE", 8)
    monkeypatch.setattr(vae_tiling, "OVERLAP", 2)
    picture = Image.open(os.path.join(root, "datasets", "synthetic_toy", "toy_00.png")).convert("RGB")
    pixels = np.asarray(picture.resize((128, 128)), np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0
    z = shapes_pipeline.encoder(Tensor(pixels))
    whole, tiled = shapes_pipeline.decoder(z).asnumpy(), shapes_pipeline.decode(z)
    assert tiled.shape == whole.shape == (1, 3, 128, 128)
    assert np.abs(tiled - whole).mean() < 0.09


def test_tiled_encode_of_the_tiny_model_stays_near_the_whole(shapes_pipeline, root, monkeypatch):
    """img2img's image, 128 px, encoded in 64 px tiles (8 x 8 latents, the size the tiny VAE was trained at) and in one
    piece: the tiled latents stay near the whole image's (measured: mean difference 0.125 of their mean magnitude, 0.049
    of [-1, 1] once decoded; the bound keeps it from getting worse); an image within one tile is encoded whole."""
    monkeypatch.setattr(shapes_pipeline, "vae_tiling", True)
    monkeypatch.setattr(vae_tiling, "TILE", 8)
    monkeypatch.setattr(vae_tiling, "OVERLAP", 2)
    picture = Image.open(os.path.join(root, "datasets", "synthetic_toy", "toy_00.png")).convert("RGB")
    pixels = np.asarray(picture.resize((128, 128)), np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0
    whole, tiled = shapes_pipeline.encoder(Tensor(pixels)).asnumpy(), shapes_pipeline.encode(Tensor(pixels)).asnumpy()
    assert tiled.shape == whole.shape == (1, 4, 16, 16)
    assert np.abs(tiled - whole).mean() < 0.14 * np.abs(whole).mean()
    small = Tensor(pixels[:, :, :64, :64].copy())
    np.testing.assert_array_equal(shapes_pipeline.encode(small).asnumpy(), shapes_pipeline.encoder(small).asnumpy())
