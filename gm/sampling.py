"""SDXL text-to-image and image-to-image sampling with learned words: the one pipeline behind
`demo/sampling_without_streamlit.py`, the streamlit app `demo/sampling.py` and the trainer's periodic samples.

sgm's SDXL conventions: the sampler walks `steps` sigmas of the DDPM schedule (LegacyDDPMDiscretization);
classifier-free guidance (VanillaCFG) takes the negative prompt as the unconditional prompt, whose text
embeddings are zeros when it is empty (sgm's force_uc_zero_embeddings=["txt"], diffusers'
force_zeros_for_empty_prompt); size conditioning says original = target = (H, W), crop (0, 0).
"""
import io
import os
import re
import warnings

import numpy as np
from mindspore import Tensor, nn, ops
from omegaconf import OmegaConf
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from gm import vae_tiling
from gm.models.loading import create_model, load_config
from gm.modules.diffusionmodules.blockwise import BlockwiseDenoiser
from gm.modules.diffusionmodules.denoiser import BoundDenoiser
from gm.modules.diffusionmodules.discretizer import Img2ImgDiscretizationWrapper
from gm.modules.diffusionmodules.openaimodel import Downsample
from gm.modules.diffusionmodules.sampler_names import SAMPLERS
from gm.modules.diffusionmodules.sampling_utils import img2img_noised_input, randn_like_fn
from gm.textual_inversion.embedding_io import check_widths, load_embedding
from gm.textual_inversion.placeholder import (add_placeholder_tokens, expand_placeholders, find_placeholders,
                                              set_placeholder_rows)
from gm.util import atomic_write, instantiate_from_config, release_free_memory, release_weights

DISCRETIZATION = {"target": "gm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # a config's sampling.weight is under it


class SamplingError(ValueError):
    """A request the model cannot carry out (size, sampler, steps, image, embedding); the message says why."""


class PlaceholderWarning(UserWarning):
    """A prompt that uses none of the learned words loaded into the pipeline."""


def build_engine(config_path, weight=None, precision="fp32"):
    """The DiffusionEngine of a config file with its weights, in inference mode (`create_model` refuses a
    config that needs weights before building anything)."""
    return create_model(load_config(config_path), weight, precision=precision)


def sampling_defaults(config):
    """(weights, image side) that a config's `sampling:` section names: the tiny config names its shipped
    pretrained file (relative to the project folder) and its 64 px size. Else no weights and 1024 px."""
    weight = OmegaConf.select(config, "sampling.weight")
    side = int(OmegaConf.select(config, "sampling.resolution", default=1024))
    return (os.path.join(PROJECT_ROOT, weight) if weight else None), side


def images_per_call(height, width):
    """Images of height x width per UNet call by default: as many as make the latents of one 1024 x 1024 image
    (SDXL's native size: what the model's memory is planned for), at least one."""
    return max(1, 1024 * 1024 // (height * width))  # sizes are multiples of the latent factor: its ratio


def guidance_batch(num_images, height, width, batch_size=None):
    """The batch the denoiser is called at when `SDXLPipeline.generate` makes `num_images` images of height x width
    (its first call's, if the last is smaller): the images of one call (`batch_size`, default `images_per_call`),
    twice, for the two halves of classifier-free guidance."""
    return 2 * min(num_images, batch_size or images_per_call(height, width))


def prompt_batch_at_size(prompt, height, width):
    """The conditioner's batch of one prompt for an uncropped image of height x width (SDXL's size conditioning)."""
    size = np.array([[height, width]], np.float32)
    return {"txt": [prompt], "original_size_as_tuple": size, "crop_coords_top_left": np.zeros((1, 2), np.float32),
            "target_size_as_tuple": size}


def latent_factor(engine):
    """Pixels per latent along H and W: the VAE's downsampling (8 for SDXL)."""
    return 2 ** (engine.first_stage_model.decoder.num_resolutions - 1)


def image_size_multiple(engine):
    """H and W must be multiples of this: the VAE's downsampling times the UNet's (8 x 4 = 32 for SDXL),
    since the UNet concatenates each upsampled map with the skip of the same size."""
    unet = 2 ** sum(isinstance(cell, Downsample) for _, cell in engine.model.diffusion_model.cells_and_names())
    return latent_factor(engine) * unet


def load_image(image, height, width):
    """A path, PIL image or uint8 array -> uint8 [height, width, 3]: scaled to cover the size, centre-cropped."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        try:
            with Image.open(image) as f:
                image = f.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise SamplingError(f"cannot read the image {image}: {e}") from None
    image = image.convert("RGB")
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.LANCZOS)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return np.asarray(image.crop((left, top, left + width, top + height)), np.uint8)


def to_uint8(images):
    """Decoded images [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    images = np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)
    return np.round(images * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)


def png_bytes(image, metadata=None):
    """A uint8 image [H, W, 3] as PNG bytes, with `metadata` {key: value} as its text chunks."""
    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, str(value))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(path, image, metadata=None):
    """Write a uint8 image [H, W, 3] as a PNG with text metadata, atomically (never a half-written file)."""
    data = png_bytes(image, metadata)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write, ".png")


def slug(prompt):
    """A file-name-safe short form of a prompt."""
    return re.sub(r"[^A-Za-z0-9]+", "-", prompt).strip("-")[:48] or "prompt"


def make_grid(images, num_rows, num_cols):
    """uint8 images [H, W, 3], row by row -> one uint8 image [rows H, cols W, 3] (missing cells stay black)."""
    h, w, _ = images[0].shape
    grid = np.zeros((num_rows * h, num_cols * w, 3), np.uint8)
    for k, image in enumerate(images[:num_rows * num_cols]):
        row, col = divmod(k, num_cols)
        grid[row * h:(row + 1) * h, col * w:(col + 1) * w] = image
    return grid


class LatentEncoder(nn.Cell):
    """Image [B, 3, H, W] in [-1, 1] -> latents, compiled as one graph."""

    def __init__(self, engine):
        super().__init__(auto_prefix=False)  # the engine's parameters keep their checkpoint names
        self.engine = engine

    def construct(self, x):
        return self.engine.encode_first_stage(x)


class LatentDecoder(nn.Cell):
    """Latents -> images [B, 3, H, W] in [-1, 1], compiled as one graph."""

    def __init__(self, engine):
        super().__init__(auto_prefix=False)  # the engine's parameters keep their checkpoint names
        self.engine = engine

    def construct(self, z):
        return self.engine.decode_first_stage(z)


class TextConditioner(nn.Cell):
    """The conditioner compiled as a graph of its own. A new one is made after placeholder tokens are added:
    a graph compiled before keeps the old token tables."""

    def __init__(self, conditioner):
        super().__init__(auto_prefix=False)  # the learned rows keep their names (the training state's keys)
        self.conditioner = conditioner

    def construct(self, *inputs):
        return self.conditioner(*inputs)


class SDXLPipeline:
    """Images from prompts with an engine (`gm.models.diffusion.DiffusionEngine`) and learned words.

    placeholders: {token: num_vectors} of tokens already added to the engine's text encoders (the trainer's);
    `load_embedding` adds more. Prompts are expanded (`<tok>` -> `<tok> <tok>_1 ...`) before tokenization.
    Keep one pipeline per engine: its compiled graphs (conditioner, denoiser, VAE) are reused across calls.
    """

    def __init__(self, engine, placeholders=None, blockwise_unet=False, vae_tiling=False):
        self.engine = engine
        self.placeholders = dict(placeholders or {})
        self.size_multiple = image_size_multiple(engine)
        self.latent_channels, self.latent_factor = engine.first_stage_model.embed_dim, latent_factor(engine)
        # the UNet in one graph, or layer by layer from the host (the full-size model on the CPU: less memory)
        denoiser_class = BlockwiseDenoiser if blockwise_unet else BoundDenoiser
        self.denoiser = denoiser_class(engine.denoiser, engine.model)
        self.encoder, self.decoder = LatentEncoder(engine), LatentDecoder(engine)
        self.vae_tiling = vae_tiling  # images larger than a tile decoded and encoded tile by tile (`gm.vae_tiling`)
        self.conditioner = TextConditioner(engine.conditioner)
        self.released = False  # generate(..., release_models=True) freed the models' weights

    # ------------------------------------------------------------------------------------------ embeddings

    def load_embedding(self, path, token=None):
        """Read an embedding file (any format of `gm.textual_inversion.embedding_io`) and add it; its token
        is the stored one unless `token` is given. Returns the LearnedEmbedding."""
        embedding = load_embedding(path, token)
        self.add_embedding(embedding)
        return embedding

    def add_embedding(self, embedding):
        """Make `embedding.token` mean its learned rows in both text encoders.

        A token this pipeline already knows with the same number of vectors gets its rows overwritten in place (a
        newer embedding of the same word; no recompile); a new token is added to the vocabularies.
        """
        conditioner = self.engine.conditioner
        check_widths(embedding, *(e.token_embedding.weight.shape[1] for e in conditioner.text_embedders()))
        token, n = embedding.token, embedding.num_vectors
        if token in self.placeholders:
            if self.placeholders[token] != n:
                raise SamplingError(
                    f"{embedding.source}: token {token!r} is already loaded with {self.placeholders[token]} vectors, "
                    f"this embedding has {n}; give it another token")
            set_placeholder_rows(conditioner, token, embedding.clip_l, embedding.clip_g)
        else:
            try:
                add_placeholder_tokens(conditioner, token, embedding.clip_l, embedding.clip_g)
            except ValueError as e:
                raise SamplingError(f"{embedding.source}: {e}") from None
            self.placeholders[token] = n
            self.conditioner = TextConditioner(conditioner)  # recompiled with the new tokens

    def prompts_without_placeholders(self, prompts):
        """The prompts that use none of the loaded learned words (all of them count when none is loaded: [])."""
        if not self.placeholders:
            return []
        return [p for p in prompts if not find_placeholders(p, self.placeholders)]

    # ------------------------------------------------------------------------------------------ conditioning

    def _size_batch(self, prompt, height, width):
        return prompt_batch_at_size(expand_placeholders(prompt, self.placeholders), height, width)

    def encode_prompt(self, prompt, negative_prompt, height, width):
        """(c, uc): conditioning dicts {"crossattn", "vector"} of the prompt and of the negative prompt, one batch."""
        tokenize = self.engine.conditioner.tokenize
        c_inputs = tokenize(self._size_batch(prompt, height, width))
        zero_txt = None if negative_prompt.strip() else ["txt"]
        uc_inputs = tokenize(self._size_batch(negative_prompt, height, width), force_zero_embeddings=zero_txt)
        inputs = [Tensor(np.concatenate([u.asnumpy(), c.asnumpy()])) for u, c in zip(uc_inputs, c_inputs)]
        crossattn, vector = self.conditioner(*inputs)
        return ({"crossattn": crossattn[1:], "vector": vector[1:]},
                {"crossattn": crossattn[:1], "vector": vector[:1]})

    # ------------------------------------------------------------------------------------------ sampling

    def make_sampler(self, sampler, steps, guidance_scale, strength=None):
        """A sampler by name (SAMPLERS) with VanillaCFG; img2img (`strength`) prunes its schedule."""
        if sampler not in SAMPLERS:
            raise SamplingError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not 1 <= steps <= 1000:
            raise SamplingError(f"steps must lie in [1, 1000], got {steps}")
        config = {"target": f"gm.modules.diffusionmodules.sampling.{SAMPLERS[sampler]}",
                  "params": {"discretization_config": DISCRETIZATION, "num_steps": steps,
                             "guider_config": {"target": "gm.modules.diffusionmodules.guiders.VanillaCFG",
                                               "params": {"scale": float(guidance_scale)}}}}
        sampler = instantiate_from_config(config)
        if strength is not None:
            sampler.discretization = Img2ImgDiscretizationWrapper(sampler.discretization, strength)
        return sampler

    def sample_latents(self, c, uc, sampler, height, width, seed, init_latents=None, on_step=None):
        """Latents [B, C, H/f, W/f], a sample per seed of `seed` (an int, or a list of B): numpy RandomState(seed)
        draws each sample's initial noise, then any noise a stochastic sampler adds, so a sample does not depend
        on the batch it is drawn in. c, uc: conditioning with B rows. `init_latents` (img2img): clean latents
        noised to the first sigma."""
        seeds = [seed] if isinstance(seed, int) else list(seed)
        noise_fn = randn_like_fn(seeds)
        shape = (len(seeds), self.latent_channels, height // self.latent_factor, width // self.latent_factor)
        x = noise_fn(Tensor(np.zeros(shape, np.float32)))
        if init_latents is not None:
            x = img2img_noised_input(init_latents, x, float(sampler.discretization(sampler.num_steps)[0]))
        return sampler(self.denoiser.denoise, x, c, uc, noise_fn=noise_fn, on_step=on_step)

    def check_size(self, height, width):
        """SamplingError unless the model can take images of height x width."""
        m = self.size_multiple
        if height < m or width < m or height % m or width % m:
            raise SamplingError(f"H and W must be positive multiples of {m} for this model (VAE and UNet "
                                f"downsampling), got H={height}, W={width}")

    def generate(self, prompts, negative_prompt="", sampler="EulerEDM", steps=40, guidance_scale=5.0,
                 height=1024, width=1024, seed=0, num_images=1, init_image=None, strength=0.75,
                 progress=None, on_image=None, batch_size=None, release_models=False):
        """Images for each prompt: a list of uint8 arrays [H, W, 3], prompt by prompt, `num_images` each.

        The j-th image of every prompt uses seed + j, so the same arguments give the same images, whatever the
        batch. The images of all prompts go through the UNet `batch_size` at a time (default
        `images_per_call`). init_image: None (txt2img) or a path / PIL image / uint8 array for img2img, which
        keeps the last `strength` fraction of the schedule (1.0: start from pure noise). progress(done, total) is
        called after every sampler step (done counts an image's steps), on_image(index, image) after every image.

        release_models: this is the pipeline's last call (a one-shot command's). Each model's weights are freed
        once its part is done (`gm.util.release_weights`): the text encoders (and img2img's VAE encoder) once the
        prompts and the image are encoded, the UNet once every image is sampled; the images are decoded after that
        (without it, each batch as soon as it is sampled). The full-size SDXL holds 3.3 GB in its text encoders and
        10.3 GB in its UNet (fp32).
        """
        if self.released:
            raise SamplingError("this pipeline released its models (generate(..., release_models=True) was its last "
                                "call); build a new one")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise SamplingError("no prompt given")
        if num_images < 1:
            raise SamplingError(f"num_images must be at least 1, got {num_images}")
        if not 0 <= seed <= 2**32 - num_images:
            raise SamplingError(f"seed must lie in [0, {2**32 - num_images}] for {num_images} images, got {seed}")
        if batch_size is not None and batch_size < 1:
            raise SamplingError(f"batch_size must be at least 1, got {batch_size}")
        self.check_size(height, width)
        sampler = self.make_sampler(sampler, steps, guidance_scale, None if init_image is None else strength)
        for prompt in self.prompts_without_placeholders(prompts):
            warnings.warn(f"the prompt {prompt!r} uses none of the learned words {', '.join(self.placeholders)}",
                          PlaceholderWarning, stacklevel=2)
        init_latents = None
        if init_image is not None:
            pixels = load_image(init_image, height, width).astype(np.float32) / 127.5 - 1.0
            init_latents = self.encode(Tensor(pixels.transpose(2, 0, 1)[None]))

        conditioning = [self.encode_prompt(prompt, negative_prompt, height, width) for prompt in prompts]
        if release_models:
            self.released = True
            release_weights(self.engine.conditioner, self.engine.first_stage_model.encoder)
        jobs = [(p, seed + j) for p in range(len(prompts)) for j in range(num_images)]
        batch_size = batch_size or images_per_call(height, width)
        steps_per_image = len(sampler.discretization(steps)) - 1
        total, images, sampled = len(jobs) * steps_per_image, [], []
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            c, uc = ({key: ops.cat([conditioning[p][half][key] for p, _ in batch]) for key in conditioning[0][half]}
                     for half in (0, 1))

            def on_step(info, done=start * steps_per_image, n=len(batch)):
                if progress is not None:
                    progress(done + (info["i"] + 1) * n, total)

            z = self.sample_latents(c, uc, sampler, height, width, [s for _, s in batch], init_latents, on_step)
            release_free_memory()  # what compiling the conditioner and UNet graphs freed, before the decoder's
            if release_models:
                sampled.append(z)  # decoded once the UNet is freed
            else:
                self._decode(z, images, on_image)  # each batch's images as soon as it is sampled
        if release_models:  # every image sampled: the UNet's work is done, then the decoder's begins
            self.denoiser = None  # with it the layer-by-layer UNet's own handles on the weights
            release_weights(self.engine.model)
            for z in sampled:
                self._decode(z, images, on_image)
        return images

    def _decode(self, z, images, on_image):
        """Decode latents z [B, C, h, w] image by image into `images`, telling `on_image` of each."""
        for i in range(z.shape[0]):
            images.append(to_uint8(self.decode(z[i:i + 1]))[0])
            if on_image is not None:
                on_image(len(images) - 1, images[-1])

    def encode(self, x):
        """Latents from images [B, 3, H, W] in [-1, 1] (a tensor): in one piece, or with `vae_tiling` tile by tile."""
        if self.vae_tiling and max(x.shape[2:]) > vae_tiling.TILE * self.latent_factor:
            return vae_tiling.encode_tiled(self.engine.first_stage_model, x) * self.engine.scale_factor
        return self.encoder(x)

    def decode(self, z):
        """Images [B, 3, H, W] in [-1, 1] (numpy) from latents: in one piece, or with `vae_tiling` tile by tile."""
        if self.vae_tiling and max(z.shape[2:]) > vae_tiling.TILE:
            return vae_tiling.decode_tiled(self.engine.first_stage_model, z / self.engine.scale_factor)
        return self.decoder(z).asnumpy()
