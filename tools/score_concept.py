"""Score samples of the tiny SDXL by what its world's renderer knows: the concept score of tools/shape_detector.py
(per attribute, the fraction of samples that show the concept's shape, colour, ring and dot).

    python tools/score_concept.py --textual_inversion_weight runs/toy/toy.safetensors --initializer_token star \
        --prompt "a photo of <toy>" --prompt "a photo of a star" \
        --prompt "a photo of a red star in a yellow ring with a blue dot" \
        --data_path datasets/synthetic_toy --output runs/toy/concept

Every prompt gets --num_samples samples (sample j from seed + j, the same noise for every prompt). With
--initializer_token, a prompt that uses the learned word is scored twice: with the learned vectors and with the
vectors its training started from (that word's token embeddings, as the trainer's --initializer_token sets them).
With --data_path, the folder's images are scored too, as they are and as the model's VAE gives them back (encoded
and decoded): what the VAE lets a sample show at most. Prints a table; writes `scores.json` (the scores, every
picture's detected attributes, the settings) and `grid.png` (one row per scored set, in the table's order) to
--output.
"""
import argparse
import math
import os
import sys
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gm.device import add_device_arguments, resolve_device, set_device  # noqa: E402
from gm.modules.diffusionmodules.sampler_names import SAMPLERS  # noqa: E402
from tools.make_synthetic_dataset import COLORS, SHAPES, TOY  # noqa: E402
from tools.shape_detector import FIELDS  # noqa: E402

NONE = "none"  # --target's word for no ring or no dot


def get_parser():
    parser = argparse.ArgumentParser(
        description="The concept score (shape, colour, ring, dot) of samples of the tiny SDXL.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs/inference/sd_xl_tiny.yaml"),
                        help="model config")
    parser.add_argument("--weight", help="SDXL weights (default: the config's sampling.weight)")
    parser.add_argument("--textual_inversion_weight", metavar="PATH",
                        help="a learned embedding, for prompts that use its word")
    parser.add_argument("--initializer_token", metavar="WORD",
                        help="also score the prompts with the learned word as its training started: its vectors "
                             "from this word")
    parser.add_argument("--prompt", action="append", required=True,
                        help="a prompt to sample and score (repeatable)")
    parser.add_argument("--target", default=",".join(TOY),
                        help="the concept: shape,colour,ring,dot (the world's names; 'none' for no ring or dot)")
    parser.add_argument("--data_path", help="a folder of pictures to score as they are and through the VAE")
    parser.add_argument("--num_samples", type=int, default=16, help="samples per prompt")
    parser.add_argument("--steps", type=int, default=40, help="sampling steps")
    parser.add_argument("--sampler", choices=list(SAMPLERS), default="EulerEDM", help="sampling method")
    parser.add_argument("--guidance_scale", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first sample of every prompt")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for scores.json and grid.png")
    add_device_arguments(parser)
    return parser


def parse_target(text):
    """'star,red,yellow,blue' -> (shape, colour, ring, dot), None for 'none'; ValueError naming what is wrong."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 4:
        raise ValueError(f"--target {text!r}: give shape,colour,ring,dot, e.g. {','.join(TOY)}")
    shape, color, ring, dot = parts
    if shape not in SHAPES:
        raise ValueError(f"--target {text!r}: the shape must be one of {', '.join(SHAPES)}")
    for name, value, absent in (("colour", color, False), ("ring", ring, True), ("dot", dot, True)):
        if value not in COLORS and not (absent and value == NONE):
            raise ValueError(f"--target {text!r}: the {name} must be one of {', '.join(COLORS)}"
                             + (f" or {NONE}" if absent else ""))
    return shape, color, None if ring == NONE else ring, None if dot == NONE else dot


def check_args(parser, args):
    """Flag-level mistakes, found before anything is loaded (argparse exits with status 2)."""
    if not math.isfinite(args.guidance_scale):
        parser.error(f"--guidance_scale must be a finite number, got {args.guidance_scale}")
    for name in ("num_samples", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.initializer_token is not None and not args.textual_inversion_weight:
        parser.error("--initializer_token needs --textual_inversion_weight (the word whose start it scores)")
    try:
        args.target = parse_target(args.target)
        args.device_target, args.precision = resolve_device(args.device_target, args.precision)
    except ValueError as e:
        parser.error(str(e))


def initial_vectors(pipeline, embedding, word):
    """The rows [n, width] per text encoder that training from `word` starts `embedding`'s word with."""
    from gm.textual_inversion.placeholder import initial_rows

    return [initial_rows(e, word, embedding.num_vectors, None) for e in pipeline.engine.conditioner.text_embedders()]


def scored_sets(args):
    """[(label, pictures)] for every prompt (and its start), and the data folder's pictures as they are and
    through the VAE; each picture a uint8 [H, W, 3]."""
    from mindspore import Tensor

    from gm.data.dataset import scan_folder
    from gm.models.loading import create_model, load_config
    from gm.sampling import PlaceholderWarning, SDXLPipeline, load_image, sampling_defaults, to_uint8
    from gm.textual_inversion.embedding_io import load_embedding
    from gm.textual_inversion.placeholder import find_placeholders, set_placeholder_rows

    config = load_config(args.config)
    weight, side = sampling_defaults(config)
    embedding = load_embedding(args.textual_inversion_weight) if args.textual_inversion_weight else None
    token = embedding.token if embedding else ""
    pictures = [load_image(item.path, side, side) for item in scan_folder(args.data_path, token)] \
        if args.data_path else []
    pipeline = SDXLPipeline(create_model(config, args.weight or weight, precision=args.precision))
    pipeline.check_size(side, side)
    if embedding:
        pipeline.add_embedding(embedding)

    def generate(prompt):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PlaceholderWarning)  # prompts without the word are scored too
            return pipeline.generate(prompt, "", args.sampler, args.steps, args.guidance_scale, side, side,
                                     args.seed, args.num_samples)

    sets = [(prompt, generate(prompt)) for prompt in args.prompt]
    if args.initializer_token is not None:
        with_word = [p for p in args.prompt if find_placeholders(p, pipeline.placeholders)]
        set_placeholder_rows(pipeline.engine.conditioner, token, *initial_vectors(pipeline, embedding,
                                                                                  args.initializer_token))
        sets += [(f"{p} (its start: {args.initializer_token})", generate(p)) for p in with_word]
    if pictures:
        pixels = np.stack(pictures).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
        decoded = to_uint8(pipeline.decoder(pipeline.encoder(Tensor(pixels))).asnumpy())
        sets += [(f"{args.data_path} images", pictures), (f"{args.data_path} images through the VAE", list(decoded))]
    return sets


def write_outputs(args, sets, scores, detections):
    from gm.sampling import make_grid, save_png
    from tools.evaluate_embedding import write_json

    os.makedirs(args.output, exist_ok=True)
    cols = max(len(pictures) for _, pictures in sets)
    save_png(os.path.join(args.output, "grid.png"),
             np.concatenate([make_grid(pictures, 1, cols) for _, pictures in sets]),
             {"rows": " | ".join(label for label, _ in sets), "seed": args.seed, "steps": args.steps})
    data = {"target": dict(zip(FIELDS, args.target)),
            "sets": [{"label": label, "scores": s, "detected": d} for (label, _), s, d in zip(sets, scores, detections)],
            "settings": {"seeds": list(range(args.seed, args.seed + args.num_samples)), "steps": args.steps,
                         "sampler": args.sampler, "guidance_scale": args.guidance_scale,
                         "config": os.path.abspath(args.config), "weight": args.weight,
                         "textual_inversion_weight": args.textual_inversion_weight,
                         "initializer_token": args.initializer_token}}
    write_json(os.path.join(args.output, "scores.json"), data)


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)

    from gm.data.dataset import DataError
    from gm.sampling import SamplingError
    from gm.textual_inversion.embedding_io import EmbeddingFormatError
    from gm.textual_inversion.placeholder import PlaceholderError
    from gm.weights.loader import WeightFileError
    from gm.weights.state_dict import WeightMismatchError
    from tools.shape_detector import concept_score, detect

    try:
        set_device(args.device_target, args.ms_mode)
    except ValueError as e:  # a device this MindSpore installation cannot use
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        sets = scored_sets(args)
    except (DataError, EmbeddingFormatError, PlaceholderError, SamplingError, WeightFileError,
            WeightMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    found = [[detect(picture) for picture in pictures] for _, pictures in sets]
    scores = [concept_score(attributes, args.target) for attributes in found]
    detections = [[[getattr(a, f) for f in FIELDS] for a in attributes] for attributes in found]
    try:
        write_outputs(args, sets, scores, detections)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"target: {', '.join(f'{f} {v or NONE}' for f, v in zip(FIELDS, args.target))}")
    print(f"{'shape':>6} {'colour':>6} {'ring':>6} {'dot':>6} {'score':>6} {'all':>6}  pictures")
    for (label, _), s in zip(sets, scores):
        print(" ".join(f"{s[k]:6.2f}" for k in FIELDS + ("score", "all")) + f"  {label}")
    print(f"Wrote scores.json and grid.png to {os.path.abspath(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
