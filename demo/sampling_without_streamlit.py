"""Generate images with SDXL and learned words from the command line.

    python demo/sampling_without_streamlit.py --weight checkpoints/sd_xl_base_1.0.safetensors \
        --textual_inversion_weight runs/toy/SD-XL-base-1.0_ti.ckpt --prompt "a photo of <toy> on a beach"

Every image is written as a PNG whose text metadata holds the prompt, seed, sampler, steps, guidance and
embeddings; each prompt also gets a grid of its --num_rows x --num_cols images. A run is one call of the pipeline,
which frees each model's weights once its part is done: the text encoders once the prompts are encoded, the UNet
once every image is sampled, then the images are decoded and written. So the full-size SDXL's peak memory is that
of its loaded weights, not of its weights and every graph's memory together.
"""
import argparse
import math
import os
import re
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gm.compile_cache import add_compile_cache_argument  # noqa: E402
from gm.device import add_device_arguments, resolve_device, set_device  # noqa: E402
from gm.modules.diffusionmodules.sampler_names import SAMPLERS  # noqa: E402
from gm.util import str2bool  # noqa: E402

RANDOM_WEIGHTS = "random"  # --weight random: the config's model from random initial weights drawn from --seed


def get_parser():
    parser = argparse.ArgumentParser(
        description="Text-to-image or image-to-image sampling with SDXL and textual-inversion embeddings.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--task", choices=("txt2img", "img2img"), default="txt2img",
                        help="txt2img: from noise; img2img: from --img, partly noised (--strength)")
    parser.add_argument("--img", help="img2img: the starting image (scaled and centre-cropped to H x W)")
    parser.add_argument("--strength", type=float, default=0.75,
                        help="img2img: how much of the schedule to run from --img; 0 keeps it, 1 ignores it")
    parser.add_argument("--config", default=os.path.join(ROOT, "configs/inference/sd_xl_base.yaml"),
                        help="model config (configs/inference/sd_xl_tiny.yaml: the quick start's tiny model)")
    parser.add_argument("--weight",
                        help="SDXL weights: sd_xl_base_1.0.safetensors, a diffusers folder or a .ckpt (default: the "
                             "config's sampling.weight, e.g. the tiny config's shipped pretrained file); "
                             f"'{RANDOM_WEIGHTS}': random initial weights drawn from --seed, for a small config")
    parser.add_argument("--textual_inversion_weight", action="append", default=[], metavar="PATH",
                        help="a learned embedding (.ckpt, SDXL community .safetensors, or diffusers' "
                             "learned_embeds.safetensors / its folder); repeat for several words in one prompt")
    parser.add_argument("--placeholder_token", action="append", default=[], metavar="TOKEN",
                        help="the word to use in prompts instead of the embedding's stored token; "
                             "give one per --textual_inversion_weight, in the same order")
    parser.add_argument("--prompt", help="the prompt, e.g. 'a photo of <toy> on a beach'")
    parser.add_argument("--prompt_file", help="a text file with one prompt a line (instead of --prompt)")
    parser.add_argument("--negative_prompt", default="",
                        help="what to steer away from; empty: SDXL's zero unconditional text embedding")
    parser.add_argument("--sampler", choices=list(SAMPLERS), default="EulerEDM", help="sampling method")
    parser.add_argument("--sample_step", type=int, default=40, help="number of sampling steps")
    parser.add_argument("--guidance_scale", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=42,
                        help="seed of the first image (image j uses seed + j) and of random initial weights")
    parser.add_argument("--num_cols", type=int, default=1, help="grid columns: images per prompt = rows x cols")
    parser.add_argument("--num_rows", type=int, default=1, help="grid rows")
    parser.add_argument("--H", type=int,
                        help="image height in pixels, a multiple of 32 for SDXL (default: the config's "
                             "sampling.resolution, else 1024)")
    parser.add_argument("--W", type=int,
                        help="image width in pixels, a multiple of 32 for SDXL (default: the config's "
                             "sampling.resolution, else 1024)")
    parser.add_argument("--save_path", default="outputs", help="folder the PNGs are written to")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="images per UNet call, across prompts; each image keeps its own seed, so the images do "
                             "not change with it (default: as many as make the latents of one 1024 x 1024 image)")
    parser.add_argument("--blockwise_unet", type=str2bool, default=False,
                        help="run the UNet layer by layer from the host, each distinct layer compiled once: far less "
                             "memory for the full-size SDXL on the CPU (README 'Running the real SDXL')")
    parser.add_argument("--vae_tiling", type=str2bool, default=False,
                        help="decode images (and encode img2img's image) larger than 512 px tile by tile, with the "
                             "same result as in one piece, for less memory: decoding the full-size SDXL's 1024 px "
                             "image, this command holds 9.4 GB in one piece on the CPU, 5.7 GB in tiles (the UNet "
                             "freed by then); for images above 1024 px, or with little memory")
    add_compile_cache_argument(add_device_arguments(parser))  # --device_target ...: the same for every command
    return parser


def check_args(parser, args):
    """Flag-level mistakes, found before anything heavy is loaded (argparse exits with status 2)."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            parser.error(f"--{name} must be a finite number, got {value}")
    if (args.prompt is None) == (args.prompt_file is None):
        parser.error("give exactly one of --prompt and --prompt_file")
    if args.placeholder_token and len(args.placeholder_token) != len(args.textual_inversion_weight):
        parser.error(f"{len(args.placeholder_token)} --placeholder_token for "
                     f"{len(args.textual_inversion_weight)} --textual_inversion_weight: give one per embedding")
    if args.task == "img2img" and not args.img:
        parser.error("--task img2img needs --img")
    if args.task == "txt2img" and args.img:
        parser.error("--img is only used with --task img2img")
    if not 0.0 <= args.strength <= 1.0:
        parser.error(f"--strength must lie in [0, 1], got {args.strength}")
    try:
        args.device_target, args.precision = resolve_device(args.device_target, args.precision)
    except ValueError as e:
        parser.error(str(e))
    for name in ("sample_step", "num_cols", "num_rows", "H", "W", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")


def resolve_defaults(args, config):
    """--weight, --H and --W from the config where not given; --weight random means no weights."""
    from gm.sampling import sampling_defaults

    weight, side = sampling_defaults(config)
    args.weight = None if args.weight == RANDOM_WEIGHTS else args.weight or weight
    args.H = args.H or side
    args.W = args.W or side


def read_prompts(parser, args):
    if args.prompt is not None:
        return [args.prompt]
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"cannot read --prompt_file {args.prompt_file}: {e}")
    if not prompts:
        parser.error(f"--prompt_file {args.prompt_file} holds no prompt")
    return prompts


def next_index(folder):
    """1 + the largest number that starts a file name in `folder`: new files never overwrite old ones."""
    numbers = [int(m.group(1)) for m in map(re.compile(r"^(\d+)_").match, os.listdir(folder)) if m]
    return max(numbers, default=-1) + 1


def format_warning(message, category, filename, lineno, line=None):
    return f"warning: {message}\n"


def open_compile_cache(args, config, num_prompts):
    """This command's compile-cache folder (`gm.compile_cache`); None when off (--compile_cache off, PyNative)."""
    from gm.compile_cache import CompileCache, disable

    if args.compile_cache == "off" or args.ms_mode == 1:
        disable()
        return None
    return CompileCache.open(args.compile_cache, "sample", compile_cache_facts(args, config, num_prompts))


def compile_cache_facts(args, config, num_prompts):
    """All that decides which graphs the command compiles, and in which order: the arguments but the prompts' words,
    the seed, the starting image and where the images go; the number of prompts, the config (its YAML text), the
    weights and embeddings, the convolution kernels chosen (on the CPU, timed before the cache is on)."""
    from gm.compile_cache import fingerprint
    from gm.modules.layers import default_conv_impl

    unused = ("prompt", "prompt_file", "seed", "img", "save_path")
    return {"args": {k: v for k, v in vars(args).items() if k not in unused}, "prompts": num_prompts,
            "config": config, "weight": fingerprint(None if args.weight == RANDOM_WEIGHTS else args.weight),
            "embeddings": [fingerprint(path) for path in args.textual_inversion_weight],
            "convolution": default_conv_impl()}


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    prompts = read_prompts(parser, args)

    # imported here so that --help and flag errors answer at once
    import mindspore as ms
    from omegaconf import OmegaConf
    from tqdm import tqdm

    from gm.models.loading import create_model, load_config
    from gm.sampling import SDXLPipeline, SamplingError, load_image, make_grid, save_png, slug
    from gm.textual_inversion.embedding_io import EmbeddingFormatError, load_embedding
    from gm.weights.loader import WeightFileError
    from gm.weights.state_dict import WeightMismatchError

    warnings.formatwarning = format_warning
    try:
        config = load_config(args.config)
        resolve_defaults(args, config)
        tokens = args.placeholder_token or [None] * len(args.textual_inversion_weight)
        embeddings = [load_embedding(path, token) for path, token in zip(args.textual_inversion_weight, tokens)]
        taken = [e.token for e in embeddings]
        if len(set(taken)) != len(taken):
            raise SamplingError(f"two embeddings use the same token ({', '.join(taken)}): "
                                "give each its own with --placeholder_token")
        init_image = load_image(args.img, args.H, args.W) if args.task == "img2img" else None

        try:
            set_device(args.device_target, args.ms_mode)
        except ValueError as e:  # a device this MindSpore installation cannot use
            raise SamplingError(str(e)) from None
        compile_cache = open_compile_cache(args, OmegaConf.to_yaml(config), len(prompts))
        if compile_cache is not None:
            print(f"Compile cache: {compile_cache.describe()}")
        ms.set_seed(args.seed)  # random initial weights (--weight random) follow --seed
        pipeline = SDXLPipeline(create_model(config, args.weight, precision=args.precision),
                                blockwise_unet=args.blockwise_unet, vae_tiling=args.vae_tiling)
        pipeline.check_size(args.H, args.W)
        for embedding in embeddings:
            pipeline.add_embedding(embedding)
            print(f"Loaded {embedding.describe()}")
        os.makedirs(args.save_path, exist_ok=True)
        if not os.access(args.save_path, os.W_OK):
            raise PermissionError(f"--save_path {args.save_path} is not writable")

        num_images = args.num_rows * args.num_cols
        common = {"negative_prompt": args.negative_prompt, "sampler": args.sampler, "steps": args.sample_step,
                  "guidance_scale": args.guidance_scale, "size": f"{args.H}x{args.W}", "task": args.task,
                  "embeddings": ", ".join(f"{e.token}={os.path.basename(e.source)}" for e in embeddings),
                  "config": os.path.basename(args.config),
                  "weight": args.weight or f"random initial weights (seed {args.seed})"}
        if args.task == "img2img":
            common.update(init_image=args.img, strength=args.strength)
        first = next_index(args.save_path)
        stems = [f"{first + k:05d}_{slug(prompt)}" for k, prompt in enumerate(prompts)]
        written, batch = [], []
        bar = tqdm(desc="Sampling", unit="step", dynamic_ncols=True)

        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)

        def on_image(i, image):
            """Write each image as soon as it is made, and a prompt's grid after its last image."""
            k, j = divmod(i, num_images)
            prompt = prompts[k]
            if j == 0:
                batch.clear()
            batch.append(image)
            path = os.path.join(args.save_path, f"{stems[k]}_seed{args.seed + j}.png")
            written.append(save_png(path, image, dict(common, prompt=prompt, seed=args.seed + j)))
            if j == num_images - 1:
                path = os.path.join(args.save_path, f"{stems[k]}_grid.png")
                seeds = f"{args.seed}..{args.seed + num_images - 1}"
                written.append(save_png(path, make_grid(batch, args.num_rows, args.num_cols),
                                        dict(common, prompt=prompt, seed=seeds)))

        pipeline.generate(prompts, args.negative_prompt, args.sampler, args.sample_step, args.guidance_scale,
                         args.H, args.W, args.seed, num_images, init_image, args.strength, progress, on_image,
                         args.batch_size, release_models=True)  # one call: each model freed once done
        bar.close()
        if compile_cache is not None:
            compile_cache.mark_complete()
    except (SamplingError, EmbeddingFormatError, WeightFileError, WeightMismatchError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Wrote {len(prompts) * num_images} images and {len(prompts)} grids to {os.path.abspath(args.save_path)}:")
    for path in written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
