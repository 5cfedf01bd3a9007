"""Training images for textual inversion: a folder of pictures of one concept, with optional captions.

Each example carries SDXL's micro-conditioning (sgm's batch keys): the source size, where the crop
starts in the resized image, and the target size: a square, or with bucketing the SDXL training size
nearest the image's aspect ratio. Randomness (template, crop, flip) is keyed by (seed, epoch, index), so
a resumed run sees exactly the examples it would have seen.
"""
import collections
import dataclasses
import math
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from gm.data.templates import check_template, get_templates
from gm.modules.encoders.modules import TEXT_ENCODERS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_EXTENSION = ".txt"
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# Pillow opens 16-bit grayscale PNGs as one of these (older versions as "I").
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# SDXL's multi-aspect training sizes at 1024 px, (height, width): the SDXL report (Podell et al. 2023,
# arXiv:2307.01952, appendix "Multi-Aspect Training"), the same 40 as ostris/ai-toolkit's toolkit/buckets.py
# (resolutions_1024) and neggles/neurosis' SDXLBucketList. Not symmetric: 704x1344 has no 1344x704.
SDXL_BUCKETS = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)
# Bucket sides are multiples of 32, what SDXL takes (`image_size_multiple` in gm/sampling.py: the VAE's 8 x the
# UNet's 4; the trainer's --resolution check assumes it too, before any model is built), not of the list's 64
# (kohya's default bucket step; it warns only for steps not divisible by 32): at 1024 px either gives the list
# itself, but at 512 px the halved list is in multiples of 32, which rounding to 64 would bend, and at the tiny
# model's 64 px a multiple of 64 leaves the square alone.
BUCKET_MULTIPLE = 32


class DataError(ValueError):
    """Training data that cannot be used; the message names the folder or file."""


def to_rgb(image):
    """Any PIL image as 8-bit RGB; transparent pixels are composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64) / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.has_transparency_data:  # RGBA, LA, PA, or P / L / RGB with a transparent colour
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # L, P, CMYK, YCbCr, 1, ...


def load_image(path):
    """Open an image upright (EXIF orientation applied) as RGB."""
    with Image.open(path) as image:
        return to_rgb(ImageOps.exif_transpose(image))


def bucket_sizes(resolution, multiple=BUCKET_MULTIPLE):
    """SDXL's training sizes scaled to about `resolution`^2 pixels, as (height, width): each side rounded to the
    nearest multiple of `multiple` (at least one), sizes that then coincide listed once."""
    scale = resolution / 1024
    return list(dict.fromkeys(tuple(max(multiple, math.floor(side * scale / multiple + 0.5) * multiple)
                                    for side in size) for size in SDXL_BUCKETS))


def nearest_bucket(size, buckets):
    """The (height, width) of `buckets` whose aspect ratio is nearest (in log scale: 2:1 and 1:2 alike) to that of
    `size` (height, width); the first of them on a tie."""
    ratio = math.log(size[1] / size[0])
    return min(buckets, key=lambda bucket: abs(math.log(bucket[1] / bucket[0]) - ratio))


def resized_size(width, height, size):
    """(width, height) once scaled to cover `size` (height, width): one side fits it, the other overhangs."""
    scale = max(size[0] / height, size[1] / width)
    return max(size[1], round(width * scale)), max(size[0], round(height * scale))


def resize_and_crop(image, size, top_left=None, interpolation="bicubic"):
    """Resize to cover `size` (height, width), then crop it.

    `top_left` is (top, left) in the resized image; None crops the centre. Returns the crop and (top, left).
    """
    crop_height, crop_width = size
    width, height = resized_size(image.width, image.height, size)
    image = image.resize((width, height), INTERPOLATIONS[interpolation])
    if top_left is None:
        top_left = (int(round((height - crop_height) / 2.0)), int(round((width - crop_width) / 2.0)))
    top, left = top_left
    if not (0 <= top <= height - crop_height and 0 <= left <= width - crop_width):
        raise ValueError(f"crop at {top_left} does not fit a {width}x{height} image")
    return image.crop((left, top, left + crop_width, top + crop_height)), (top, left)


def to_array(image):
    """uint8 HWC RGB image -> float32 [3, H, W] in [-1, 1]."""
    return np.ascontiguousarray((np.asarray(image, dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1))


@dataclasses.dataclass(frozen=True)
class ImageItem:
    path: str
    original_size: tuple  # (height, width) of the upright source image
    caption: str = None  # from the .txt beside the image; None: prompts come from the templates
    encoder_captions: tuple = ()  # ((encoder, caption), ...): name.clip_l.txt / name.clip_g.txt, one encoder's own


def _read_caption(path, placeholder_token):
    try:
        with open(path, encoding="utf-8-sig") as f:
            caption = " ".join(f.read().split())
    except UnicodeDecodeError as e:
        raise DataError(f"caption file {path} is not UTF-8 text: {e}") from e
    if placeholder_token not in caption:
        raise DataError(
            f"caption file {path} must contain the placeholder token {placeholder_token!r}, got {caption!r}")
    return caption


def scan_folder(data_root, placeholder_token):
    """The readable images of `data_root` (not recursive, sorted by name) with their captions.

    Unreadable images are skipped with a warning; raises DataError if none is left.
    """
    if not os.path.isdir(data_root):
        raise DataError(f"training data folder not found (or not a folder): {data_root}")
    names = sorted(n for n in os.listdir(data_root) if os.path.isfile(os.path.join(data_root, n)))
    image_names = [n for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    if not image_names:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the training data folder {data_root}")
    captions = {os.path.splitext(n)[0]: n for n in names if os.path.splitext(n)[1].lower() == CAPTION_EXTENSION}

    items = []
    for name in image_names:
        path = os.path.join(data_root, name)
        try:
            width, height = load_image(path).size
        except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for broken files; any of them means skip
            warnings.warn(f"skipping unreadable image {path}: {type(e).__name__}: {e}", stacklevel=2)
            continue
        stem = os.path.splitext(name)[0]
        caption = None
        if stem in captions:
            caption = _read_caption(os.path.join(data_root, captions[stem]), placeholder_token)
        encoder_captions = tuple((encoder, _read_caption(os.path.join(data_root, captions[f"{stem}.{encoder}"]),
                                                         placeholder_token))
                                 for encoder in TEXT_ENCODERS if f"{stem}.{encoder}" in captions)
        items.append(ImageItem(path, (height, width), caption, encoder_captions))
    if not items:
        raise DataError(f"none of the {len(image_names)} image files in {data_root} could be read")
    return items


# an example's random choices; encoder_prompts: ((encoder, prompt), ...) where a caption file is that encoder's own
Choice = collections.namedtuple("Choice", ["top_left", "flipped", "prompt", "encoder_prompts"], defaults=((),))


def prompt_batch(choices):
    """The prompts of `choices` as batch entries: "txt", and "txt_<encoder>" for a text encoder with its own prompt
    in any of them (the shared prompt where an example has none)."""
    batch = {"txt": [c.prompt for c in choices]}
    for encoder in TEXT_ENCODERS:
        own = [dict(c.encoder_prompts).get(encoder) for c in choices]
        if any(prompt is not None for prompt in own):
            batch[f"txt_{encoder}"] = [c.prompt if prompt is None else prompt for c, prompt in zip(choices, own)]
    return batch


def shuffled_tags(caption, keep_tokens, rng):
    """`caption`'s comma-separated tags, the first `keep_tokens` in place and the rest in `rng`'s order."""
    tags = [tag.strip() for tag in caption.split(",")]
    rest = tags[keep_tokens:]
    return ", ".join(tags[:keep_tokens] + [rest[i] for i in rng.permutation(len(rest))])


class TextualInversionDataset:
    """Images of one concept, each cropped to its target size (a square, or its bucket) and given a prompt
    holding the placeholder.

    Args:
        data_root: folder of images (jpg, jpeg, png, webp, bmp); `name.txt` beside `name.png` is its prompt;
            `name.clip_l.txt` / `name.clip_g.txt` one text encoder's prompt instead.
        placeholder_token: the new token; captions must contain it.
        resolution: side of the square training crop; with `bucketing`, the buckets' area is about its square.
        learnable_property: "object", "style" or "face": the built-in templates used when `templates` is None.
        templates: prompt templates, each with one `{}`.
        placeholder_text: what stands for the concept in prompts (e.g. "<t> <t>_1" for two vectors);
            defaults to the token.
        center_crop: crop the centre, else a random position.
        flip_p: probability of a horizontal flip.
        caption_dropout: probability of prompting an image that has a caption with a template instead.
        shuffle_caption: shuffle a caption's comma-separated tags, all but the first `keep_tokens` (kohya's
            sd-scripts' --shuffle_caption / --keep_tokens).
        bucketing: train each image at the size of `bucket_sizes(resolution)` nearest its aspect ratio, not
            at the square.
    """

    def __init__(self, data_root, placeholder_token, resolution=1024, learnable_property="object", templates=None,
                 placeholder_text=None, center_crop=True, flip_p=0.0, interpolation="bicubic", seed=0,
                 caption_dropout=0.0, shuffle_caption=False, keep_tokens=0, bucketing=False):
        if not placeholder_token or not isinstance(placeholder_token, str):
            raise ValueError(f"placeholder_token must be a non-empty string, got {placeholder_token!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
        if not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        if keep_tokens < 0:
            raise ValueError(f"keep_tokens must be >= 0, got {keep_tokens}")
        self.templates = list(templates) if templates is not None else get_templates(learnable_property)
        for template in self.templates:
            check_template(template)
        self.placeholder_token = placeholder_token
        self.placeholder_text = placeholder_text or placeholder_token
        self.resolution = resolution
        self.center_crop = center_crop
        self.flip_p = flip_p
        self.caption_dropout, self.shuffle_caption, self.keep_tokens = caption_dropout, shuffle_caption, keep_tokens
        self.interpolation = interpolation
        self.seed = seed
        self.items = scan_folder(data_root, placeholder_token)
        self.bucketing = bucketing
        # each image's training size (height, width): the crop, the latent's size x 8, sgm's target_size
        if bucketing:
            buckets = bucket_sizes(resolution)
            self.target_sizes = [nearest_bucket(item.original_size, buckets) for item in self.items]
        else:
            self.target_sizes = [(resolution, resolution)] * len(self.items)

    def __len__(self):
        return len(self.items)

    def bucket_counts(self):
        """{(height, width): number of images} of the training sizes, smallest height first."""
        return dict(sorted(collections.Counter(self.target_sizes).items()))

    def draw(self, index, epoch=0):
        """The random choices for example `index` in `epoch`: Choice(top_left: the crop's, None for the centre;
        flipped; prompt).

        Seeded by (seed, epoch, index), so a resumed run draws the same examples."""
        rng = np.random.default_rng([self.seed, epoch, index])
        item = self.items[index]
        top_left = None
        if not self.center_crop:
            crop_height, crop_width = size = self.target_sizes[index]
            width, height = resized_size(item.original_size[1], item.original_size[0], size)
            top_left = (int(rng.integers(0, height - crop_height + 1)), int(rng.integers(0, width - crop_width + 1)))
        flipped = bool(self.flip_p > 0 and rng.random() < self.flip_p)
        # each option draws only when it is on, so that without it a run draws what it always drew
        captions = item.encoder_captions
        if item.caption is not None or captions:
            if self.caption_dropout > 0 and rng.random() < self.caption_dropout:
                return Choice(top_left, flipped, self._template(rng))  # every caption of the image dropped
        prompt = self._prompt(item.caption, rng) if item.caption is not None else self._template(rng)
        return Choice(top_left, flipped, prompt, tuple((encoder, self._prompt(caption, rng))
                                                       for encoder, caption in captions))

    def _template(self, rng):
        return self.templates[int(rng.integers(len(self.templates)))].format(self.placeholder_text)

    def _prompt(self, caption, rng):
        if self.shuffle_caption:
            caption = shuffled_tags(caption, self.keep_tokens, rng)
        return caption.replace(self.placeholder_token, self.placeholder_text)

    def variant(self, index, top_left=None, flipped=False):
        """Image `index` cropped to its target size at `top_left` (None: centre) and maybe mirrored, with its SDXL
        size conditioning: {"jpg": float32 [3, height, width], "original_size_as_tuple", "crop_coords_top_left",
        "target_size_as_tuple"}."""
        image = load_image(self.items[index].path)
        original_size = (image.height, image.width)
        size = self.target_sizes[index]
        width, _ = resized_size(image.width, image.height, size)
        image, (top, left) = resize_and_crop(image, size, top_left, self.interpolation)
        if flipped:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = width - left - size[1]  # where the crop starts in the mirrored resized image
        return {
            "jpg": to_array(image),
            "original_size_as_tuple": original_size,
            "crop_coords_top_left": (top, left),
            "target_size_as_tuple": size,
        }

    def example(self, index, epoch=0):
        """Example `index` as drawn in `epoch`: {"jpg": float32 [3, height, width], "txt": str, size conditioning}, and
        "txt_<encoder>" where that encoder has its own caption."""
        choice = self.draw(index, epoch)
        return dict(self.variant(index, choice.top_left, choice.flipped), txt=choice.prompt,
                    **{f"txt_{encoder}": prompt for encoder, prompt in choice.encoder_prompts})

    def batch(self, draws):
        """Stack the examples of `draws` ((index, epoch) pairs of one target size, e.g. from `data_order`) into
        numpy arrays."""
        choices = [self.draw(index, epoch) for index, epoch in draws]
        examples = [self.variant(index, c.top_left, c.flipped) for (index, _), c in zip(draws, choices)]
        batch = dict(prompt_batch(choices), jpg=np.stack([e["jpg"] for e in examples]))
        for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"):
            batch[key] = np.array([e[key] for e in examples], dtype=np.int64)
        return batch


Draw = collections.namedtuple("Draw", ["index", "epoch"])


class EpochOrder:
    """The data order: a deterministic, resumable stream of example indices, sharded over data-parallel ranks.

    The stream is the concatenation of per-epoch permutations of range(n) (seeded by (seed, epoch));
    each step takes the next `batch_size * world_size` draws and rank r keeps its contiguous slice,
    so ranks never share a draw. A step may cross an epoch boundary, so every batch is full even when
    n is smaller than the global batch. The state (epoch, position) does not depend on the world size:
    a run may resume with a different number of ranks.
    """

    def __init__(self, n, batch_size, seed=0, rank=0, world_size=1, shuffle=True):
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.position = 0, 0
        self._order = None  # (epoch, permutation) cache

    def order(self, epoch):
        """The permutation of range(n) used in `epoch`."""
        if self._order is None or self._order[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
            self._order = (epoch, perm)
        return self._order[1]

    def next_batch(self):
        """This rank's `batch_size` draws for the next step, as Draw(index, epoch); advances the state."""
        draws = []
        for _ in range(self.batch_size * self.world_size):
            draws.append(Draw(int(self.order(self.epoch)[self.position]), self.epoch))
            self.position += 1
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
        return draws[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def state_dict(self):
        """JSON-serialisable state; n, seed and shuffle are kept to refuse a resume on different data."""
        return {"epoch": self.epoch, "position": self.position, "n": self.n, "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state):
        for key in ("n", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the data order: saved {key}={state[key]!r}, now {getattr(self, key)!r}")
        if not 0 <= state["position"] < self.n or state["epoch"] < 0:
            raise ValueError(
                f"invalid data order state: epoch {state['epoch']}, position {state['position']} for n={self.n}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class BucketOrder:
    """The data order with aspect-ratio buckets: as `EpochOrder` (deterministic, resumable, rank-sharded), but all
    the draws of a step, every rank's, come from one bucket, so a micro-batch has one image size.

    An epoch is ceil(n_b / G) steps of each bucket b (G = batch_size * world_size, the global batch), in an order
    shuffled per epoch (seeded by (seed, epoch)): batches within a bucket, batch order shuffled, every image about
    once, as kohya's sd-scripts do. Each bucket deals from its own stream, the concatenation of per-pass
    permutations of its images (seeded by (seed, height, width, pass)), and a step takes its next G draws: a
    bucket smaller than G, or the rest of one, fills the batch from its next pass, so every batch is full and,
    within its bucket, every image comes once per pass. A draw's epoch is its bucket's pass, which keys the
    dataset's random choices: no image is drawn twice with the same choices. Rank r keeps its contiguous slice of
    the step's draws. The state depends on G: a run resumes with the same global batch.
    """

    def __init__(self, sizes, batch_size, seed=0, rank=0, world_size=1):
        # sizes: each image's bucket, (height, width)
        if not sizes or batch_size < 1:
            raise ValueError(f"need images and batch_size >= 1, got {len(sizes)} images, batch_size={batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.buckets = {}  # (height, width): its images' indices, ascending
        for index, size in enumerate(sizes):
            self.buckets.setdefault(tuple(size), []).append(index)
        self.buckets = dict(sorted(self.buckets.items()))
        self.n, self.batch_size, self.seed, self.rank, self.world_size = len(sizes), batch_size, seed, rank, world_size
        self.epoch, self.position = 0, 0
        self.streams = {size: (0, 0) for size in self.buckets}  # bucket: (pass, position in that pass)

    @property
    def global_batch(self):
        return self.batch_size * self.world_size

    def schedule(self, epoch):
        """The bucket of each step of `epoch`, in order."""
        steps = [size for size, images in self.buckets.items() for _ in range(-(-len(images) // self.global_batch))]
        return [steps[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(steps))]

    def permutation(self, size, bucket_pass):
        """The order of bucket `size`'s images in its pass `bucket_pass`."""
        return np.random.default_rng([self.seed, *size, bucket_pass]).permutation(self.buckets[size])

    def next_batch(self):
        """This rank's `batch_size` draws for the next step, as Draw(index, pass of its bucket); advances the
        state."""
        schedule = self.schedule(self.epoch)
        size = schedule[self.position]
        self.position += 1
        if self.position == len(schedule):
            self.epoch, self.position = self.epoch + 1, 0
        bucket_pass, position = self.streams[size]
        order = self.permutation(size, bucket_pass)
        draws = []
        for _ in range(self.global_batch):
            draws.append(Draw(int(order[position]), bucket_pass))
            position += 1
            if position == len(order):
                bucket_pass, position = bucket_pass + 1, 0
                order = self.permutation(size, bucket_pass)
        self.streams[size] = (bucket_pass, position)
        return draws[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def state_dict(self):
        """JSON-serialisable state; the images of each bucket, the seed and the global batch are kept to refuse a
        resume on different data or another global batch."""
        return {"epoch": self.epoch, "position": self.position, "n": self.n, "seed": self.seed,
                "global_batch": self.global_batch,
                "buckets": {f"{h}x{w}": images for (h, w), images in self.buckets.items()},
                "streams": {f"{h}x{w}": list(stream) for (h, w), stream in self.streams.items()}}

    def load_state_dict(self, state):
        now = self.state_dict()
        for key in ("n", "seed", "global_batch"):
            if state.get(key) != now[key]:
                raise ValueError(f"cannot resume the data order: saved {key}={state.get(key)!r}, now {now[key]!r}")
        if state["buckets"] != now["buckets"]:
            def counts(buckets):
                return ", ".join(f"{name}: {len(images)}" for name, images in buckets.items())

            raise ValueError(f"cannot resume the data order: other images in the buckets (h x w: images; saved "
                             f"{counts(state['buckets'])}, now {counts(now['buckets'])})")
        streams = {size: tuple(state["streams"][name]) for size, name in zip(self.buckets, now["buckets"])}
        if (state["epoch"] < 0 or not 0 <= state["position"] < len(self.schedule(state["epoch"]))
                or any(bucket_pass < 0 or not 0 <= position < len(self.buckets[size])
                       for size, (bucket_pass, position) in streams.items())):
            raise ValueError(f"invalid data order state: epoch {state['epoch']}, position {state['position']}, "
                             f"streams {state['streams']}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.streams = {size: (int(bucket_pass), int(position)) for size, (bucket_pass, position) in streams.items()}


def data_order(dataset, batch_size, seed=0, rank=0, world_size=1):
    """The data order of `dataset`: a `BucketOrder` over its buckets with bucketing, else an `EpochOrder`."""
    if dataset.bucketing:
        return BucketOrder(dataset.target_sizes, batch_size, seed, rank, world_size)
    return EpochOrder(len(dataset), batch_size, seed, rank, world_size)
