"""Score a learned embedding with the textual-inversion paper's two CLIP figures (Gal et al. 2022, section 5.1).

    python tools/evaluate_embedding.py --config configs/inference/sd_xl_tiny.yaml \
        --textual_inversion_weight runs/toy/toy.safetensors --data_path datasets/synthetic_toy \
        --clip_model ~/models/clip-vit-base-patch32 --output runs/toy/evaluation

Image similarity (the paper's reconstruction): samples of "a photo of <tok>"; the mean, over every (sample,
training image) pair, of the cosine between their CLIP image embeddings.

Text similarity (the paper's editability): for each prompt that puts the word in a new context ("a photo of <tok>
on the moon"), samples; the cosine between the mean of their CLIP image embeddings (each of unit length, as the
paper's evaluator normalises them) and the CLIP text embedding of the prompt with the word left out ("a photo of
on the moon": the paper omits the placeholder, it does not put a class word in its place). The figure is the
mean over the prompts. The paper used 64 samples per prompt, 50 steps and CLIP ViT-B/32; its 14 prompts are
not published, the default ones below are of its three kinds (background, style, composition).

For context, the same two figures for
- the baseline: the same prompts and seeds with `--baseline_word` in place of the word. Its default, no word, is
  the paper's "prompt only" reference (the prompt followed, the concept ignored); give the initializer word
  (e.g. `--baseline_word toy`) to compare with where training started. `--no_baseline` skips it (half the time);
- the training images themselves, the paper's "image only" reference: their image similarity among themselves
  (distinct pairs) and their text similarity to each prompt. No sampling is needed for it.

Sample j of every prompt uses seed + j, so the embedding and the baseline are compared on the same noise and a run
repeats exactly. Writes to --output: one grid per prompt and word (`embedding_<k>_<prompt>.png`,
`baseline_<k>_<prompt>.png`, samples row by row), `scores.json` (the figures, per prompt, the settings, the
embedding file's metadata) and `scores.png` (a bar chart). The CLIP model is a transformers `CLIPModel` folder the
user has (save_pretrained's layout with its processor files), read offline; it needs PyTorch (`pip install torch`),
which the rest of the project does not.
"""
import argparse
import json
import math
import os
import sys
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gm.device import add_device_arguments, resolve_device, set_device  # noqa: E402
from gm.modules.diffusionmodules.sampler_names import SAMPLERS  # noqa: E402

RECONSTRUCTION_PROMPT = "a photo of {}"  # the paper's prompt for image similarity
# new contexts for text similarity, of the paper's kinds: background, style, composition ("{}": the word)
DEFAULT_PROMPTS = ("a photo of {} on the moon", "a photo of {} on the beach", "an oil painting of {}",
                   "elmo holding a {}")
CLIP_BATCH = 16  # images per CLIP forward pass
GRID_COLUMNS = 4


class EvaluationError(ValueError):
    """Input this tool cannot use; the message names the flag or file."""


def get_parser():
    parser = argparse.ArgumentParser(
        description="The textual-inversion paper's CLIP image and text similarity of a learned embedding.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs/inference/sd_xl_base.yaml"),
                        help="model config (configs/inference/sd_xl_tiny.yaml: the quick start's tiny model)")
    parser.add_argument("--weight", help="SDXL weights: a .safetensors, diffusers folder or .ckpt (default: the "
                                         "config's sampling.weight)")
    parser.add_argument("--textual_inversion_weight", required=True, metavar="PATH",
                        help="the learned embedding (.ckpt, SDXL community .safetensors, or diffusers' files)")
    parser.add_argument("--data_path", required=True, help="folder of the embedding's training images")
    parser.add_argument("--clip_model", required=True, metavar="DIR",
                        help="a transformers CLIPModel folder with its processor files (e.g. a saved "
                             "openai/clip-vit-base-patch32, the paper's CLIP), read offline")
    parser.add_argument("--prompts", metavar="FILE",
                        help="text file, one prompt a line with '{}' where the word goes, for text similarity "
                             f"(default: {'; '.join(DEFAULT_PROMPTS)})")
    parser.add_argument("--baseline_word", default="",
                        help="what stands in the word's place for the baseline, e.g. the initializer word; empty: "
                             "the prompt without the word (the paper's 'prompt only' reference)")
    parser.add_argument("--no_baseline", action="store_true", help="score the embedding alone (half the sampling)")
    parser.add_argument("--num_samples", type=int, default=8, help="samples per prompt (the paper: 64)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (the paper: 50)")
    parser.add_argument("--sampler", choices=list(SAMPLERS), default="EulerEDM", help="sampling method")
    parser.add_argument("--guidance_scale", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--H", type=int, help="sample height in pixels (default: the config's sampling.resolution, "
                                              "else 1024)")
    parser.add_argument("--W", type=int, help="sample width in pixels (default: the config's sampling.resolution, "
                                              "else 1024)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first sample of every prompt (sample j: "
                                                            "seed + j)")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the grids, scores.json and "
                                                                       "scores.png")
    add_device_arguments(parser)
    return parser


def check_args(parser, args):
    """Flag-level mistakes, found before anything is loaded (argparse exits with status 2)."""
    if not math.isfinite(args.guidance_scale):
        parser.error(f"--guidance_scale must be a finite number, got {args.guidance_scale}")
    for name in ("num_samples", "steps", "H", "W"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.no_baseline and args.baseline_word:
        parser.error("--baseline_word has no use with --no_baseline")
    try:
        args.device_target, args.precision = resolve_device(args.device_target, args.precision)
    except ValueError as e:
        parser.error(str(e))


def fill(template, word):
    """`template` with `word` for its `{}`; with no word, the prompt without it ("a photo of on the moon")."""
    return " ".join(template.format(word).split())


# ------------------------------------------------------------------------------------------------- CLIP


class ClipScorer:
    """Unit-length CLIP image and text embeddings from a transformers CLIPModel folder, on the CPU in float32."""

    def __init__(self, folder):
        try:
            import torch
        except ImportError:
            raise EvaluationError("--clip_model needs PyTorch, which is not installed: pip install torch "
                                  "(only this tool uses it)") from None
        import transformers

        transformers.logging.set_verbosity_error()  # no notice about optional image backends, no load bars
        transformers.logging.disable_progress_bar()
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
        if not os.path.isdir(folder):
            raise EvaluationError(f"--clip_model {folder}: no such folder")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise EvaluationError(f"--clip_model {folder}: no config.json, not a transformers model folder (write "
                                  "one with CLIPModel.save_pretrained)")
        try:
            config = CLIPConfig.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise EvaluationError(f"--clip_model {folder}: not a CLIP model ({' '.join(str(e).split())[:200]})") \
                from None
        if config.model_type != "clip":
            raise EvaluationError(f"--clip_model {folder}: a {config.model_type!r} model, not a CLIPModel")
        if not os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
            raise EvaluationError(f"--clip_model {folder}: no preprocessor_config.json (CLIP's image "
                                  "preprocessing); save the model's CLIPProcessor or CLIPImageProcessor beside it")
        if not (os.path.isfile(os.path.join(folder, "tokenizer.json"))
                or all(os.path.isfile(os.path.join(folder, n)) for n in ("vocab.json", "merges.txt"))):
            raise EvaluationError(f"--clip_model {folder}: no tokenizer (vocab.json + merges.txt or tokenizer.json); "
                                  "save the model's CLIPProcessor or CLIPTokenizer beside it")
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).float().eval()
            self.image_processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
            self.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise EvaluationError(f"--clip_model {folder}: cannot load it ({' '.join(str(e).split())[:200]})") \
                from None
        self.torch = torch

    @staticmethod
    def _unit(features):
        features = features.numpy().astype(np.float64)
        return features / np.linalg.norm(features, axis=-1, keepdims=True)

    def images(self, images):
        """PIL images or uint8 arrays [H, W, 3] -> [N, D] unit image embeddings."""
        model, rows = self.model, []
        with self.torch.no_grad():
            for i in range(0, len(images), CLIP_BATCH):
                pixels = self.image_processor(images=list(images[i:i + CLIP_BATCH]), return_tensors="pt")
                pooled = model.vision_model(pixel_values=pixels.pixel_values).pooler_output
                rows.append(self._unit(model.visual_projection(pooled)))
        return np.concatenate(rows)

    def texts(self, texts):
        """Strings -> [N, D] unit text embeddings."""
        model = self.model
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt",
                                max_length=model.config.text_config.max_position_embeddings)
        with self.torch.no_grad():
            pooled = model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
            return self._unit(model.text_projection(pooled))


def image_similarity(samples, references):
    """Mean cosine over every (sample, reference) pair of unit embeddings [N, D] and [M, D]."""
    return float(np.mean(samples @ references.T))


def pairwise_similarity(embeddings):
    """Mean cosine over the distinct pairs of unit embeddings [N, D]; None for fewer than two."""
    n = len(embeddings)
    if n < 2:
        return None
    cosines = embeddings @ embeddings.T
    return float((cosines.sum() - np.trace(cosines)) / (n * (n - 1)))


def text_similarity(samples, text):
    """Cosine between the mean of unit image embeddings [N, D] and a unit text embedding [D]."""
    mean = samples.mean(axis=0)
    return float(mean @ text / np.linalg.norm(mean))


# ------------------------------------------------------------------------------------------------- outputs


def write_json(path, data):
    from gm.util import atomic_write

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")

    atomic_write(path, write, ".json")


def plot_scores(path, scores, labels):
    """scores.png: both figures per word and the training images, and the text similarity per prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gm.util import atomic_write

    per_prompt = scores["text_similarity_per_prompt"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=100,
                                      gridspec_kw={"width_ratios": [2, max(2, len(per_prompt))]})
    width = 0.8 / len(labels)
    for k, (name, label) in enumerate(labels.items()):
        values = [scores[figure][name] for figure in ("image_similarity", "text_similarity")]  # None: one image
        bars = left.bar([i + k * width for i in range(2)], [np.nan if v is None else v for v in values], width,
                        label=label)
        left.bar_label(bars, ["n/a" if v is None else f"{v:.3f}" for v in values], fontsize=7)
        right.bar([i + k * width for i in range(len(per_prompt))], [p[name] for p in per_prompt], width)
    centres = width * (len(labels) - 1) / 2
    left.set_xticks([i + centres for i in range(2)], ["image similarity", "text similarity"])
    right.set_xticks([i + centres for i in range(len(per_prompt))], [p["text"] for p in per_prompt], rotation=20,
                     ha="right", fontsize=8)
    left.set_ylabel("CLIP cosine")
    right.set_title("text similarity per prompt (word left out)", fontsize=9)
    left.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), ".png")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- main


def sample(pipeline, clip, name, word, templates, args, height, width):
    """Sample every template with `word` in it (sample j from seed + j), write a grid per prompt; returns the grids'
    file names and the samples' unit CLIP image embeddings, per template."""
    from PIL import Image
    from tqdm import tqdm

    from gm.sampling import PlaceholderWarning, make_grid, save_png, slug

    prompts = [fill(template, word) for template in templates]
    n, cols = args.num_samples, min(args.num_samples, GRID_COLUMNS)
    bar = tqdm(desc=f"Sampling ({name}: {word or 'no word'})", unit="step", dynamic_ncols=True)

    def progress(done, total):
        bar.total = total
        bar.update(done - bar.n)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PlaceholderWarning)  # the baseline's prompts hold no learned word
        images = pipeline.generate(prompts, "", args.sampler, args.steps, args.guidance_scale, height, width,
                                   args.seed, n, progress=progress)
    bar.close()
    files, embeddings = [], []
    for k, prompt in enumerate(prompts):
        samples = images[k * n:(k + 1) * n]
        files.append(f"{name}_{k}_{slug(prompt)}.png")
        save_png(os.path.join(args.output, files[-1]), make_grid(samples, -(-n // cols), cols),
                 {"prompt": prompt, "seed": f"{args.seed}..{args.seed + n - 1}", "sampler": args.sampler,
                  "steps": args.steps, "guidance_scale": args.guidance_scale})
        embeddings.append(clip.images([Image.fromarray(image) for image in samples]))
    return files, embeddings


def evaluate(args, templates):
    """Check the inputs, sample, score, write the outputs; returns the scores."""
    from gm.data.dataset import load_image, scan_folder
    from gm.models.loading import create_model, load_config
    from gm.sampling import SDXLPipeline, sampling_defaults
    from gm.textual_inversion.embedding_io import load_embedding

    # everything the user gave is read before the diffusion model is built
    config = load_config(args.config)
    config_weight, side = sampling_defaults(config)
    weight, height, width = args.weight or config_weight, args.H or side, args.W or side
    embedding = load_embedding(args.textual_inversion_weight)
    items = scan_folder(args.data_path, embedding.token)
    clip = ClipScorer(args.clip_model)
    training = clip.images([load_image(item.path) for item in items])
    texts = [fill(template, "") for template in templates]  # the paper's text side: the word left out
    text_embeddings = clip.texts(texts)

    try:
        set_device(args.device_target, args.ms_mode)
    except ValueError as e:  # a device this MindSpore installation cannot use
        raise EvaluationError(str(e)) from None
    pipeline = SDXLPipeline(create_model(config, weight, precision=args.precision))
    pipeline.check_size(height, width)
    pipeline.add_embedding(embedding)
    os.makedirs(args.output, exist_ok=True)

    words = {"embedding": embedding.token}
    if not args.no_baseline:
        words["baseline"] = args.baseline_word
    grids, image_scores, text_scores = {}, {}, {}
    for name, word in words.items():
        grids[name], embeddings = sample(pipeline, clip, name, word, [RECONSTRUCTION_PROMPT] + templates, args,
                                         height, width)
        image_scores[name] = image_similarity(embeddings[0], training)
        text_scores[name] = [text_similarity(e, t) for e, t in zip(embeddings[1:], text_embeddings)]
    text_scores["training_images"] = [text_similarity(training, t) for t in text_embeddings]

    cols = min(args.num_samples, GRID_COLUMNS)
    scores = {
        "image_similarity": dict(image_scores, training_images=pairwise_similarity(training)),
        "image_similarity_grids": {name: files[0] for name, files in grids.items()},
        "text_similarity": {name: float(np.mean(values)) for name, values in text_scores.items()},
        "text_similarity_per_prompt": [
            dict({name: values[k] for name, values in text_scores.items()}, prompt=template, text=texts[k],
                 grids={name: files[k + 1] for name, files in grids.items()})
            for k, template in enumerate(templates)],
        "words": words,
        "grid": {"rows": -(-args.num_samples // cols), "cols": cols, "order": "row by row; sample j from seed + j"},
        "settings": {
            "seeds": list(range(args.seed, args.seed + args.num_samples)), "num_samples": args.num_samples,
            "steps": args.steps, "sampler": args.sampler, "guidance_scale": args.guidance_scale, "H": height,
            "W": width, "config": os.path.abspath(args.config), "weight": weight and os.path.abspath(weight),
            "device_target": args.device_target, "precision": args.precision,
            "clip_model": os.path.abspath(args.clip_model), "data_path": os.path.abspath(args.data_path),
            "training_images": [os.path.basename(item.path) for item in items],
            "embedding": {"path": os.path.abspath(embedding.source), "token": embedding.token,
                          "num_vectors": embedding.num_vectors, "format": embedding.format,
                          "metadata": embedding.metadata},
            "reconstruction_prompt": RECONSTRUCTION_PROMPT,
        },
    }
    write_json(os.path.join(args.output, "scores.json"), scores)
    labels = {"embedding": embedding.token}
    if "baseline" in words:
        labels["baseline"] = f"baseline: {args.baseline_word}" if args.baseline_word else "baseline: no word"
    labels["training_images"] = "training images"
    plot_scores(os.path.join(args.output, "scores.png"), scores, labels)
    return scores


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)

    from gm.data.dataset import DataError
    from gm.data.templates import TemplateError, load_templates
    from gm.sampling import SamplingError
    from gm.textual_inversion.embedding_io import EmbeddingFormatError
    from gm.weights.loader import WeightFileError
    from gm.weights.state_dict import WeightMismatchError

    try:
        templates = load_templates(args.prompts) if args.prompts else list(DEFAULT_PROMPTS)
        scores = evaluate(args, templates)
    except (EvaluationError, DataError, TemplateError, EmbeddingFormatError, SamplingError, WeightFileError,
            WeightMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # writing the outputs
        print(f"error: {e}", file=sys.stderr)
        return 1
    image, text = scores["image_similarity"], scores["text_similarity"]
    for name, word in scores["words"].items():
        print(f"{name} ({word or 'no word'}): image similarity {image[name]:.4f}, text similarity {text[name]:.4f}")
    reference = "n/a (one image)" if image["training_images"] is None else f"{image['training_images']:.4f}"
    print(f"training images: image similarity {reference}, text similarity {text['training_images']:.4f}")
    print(f"Wrote the grids, scores.json and scores.png to {os.path.abspath(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
