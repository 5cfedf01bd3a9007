"""Teach Stable Diffusion XL a new word: textual inversion on MindSpore.

    python train_textual_inversion.py --data_path datasets/cat_toy --placeholder_token "<cat-toy>" \
        --initializer_token toy --num_vectors 10 --total_step 3000 --gradient_accumulation_steps 4

Every model weight stays frozen. The placeholder (and <tok>_1 ... <tok>_{n-1} for n vectors) is added to both
SDXL tokenizers, and its learned rows in both CLIP text encoders are the only trainable parameters. The run
writes the embedding (our .ckpt and the community .safetensors), a loss log and picture, sample grids and a
training state to resume from, all under --save_path.

The flow, top to bottom: arguments (checked before anything is built or written) -> `Training`: data and its
order, the frozen model with the placeholder tokens, cached latents, the compiled train step, and the `resume`
and `save` of its state -> `main`: resume or start afresh -> the loop under `stop_on_signal` (draw, step, log,
sample, save) -> the final files. Ctrl-C saves and stops after the current step. One training at a time per
--save_path: the run holds a lock there until it ends.
"""
import argparse
import collections
import contextlib
import hashlib
import math
import os
import re
import shutil
import signal
import sys
import time

import numpy as np
from omegaconf import OmegaConf
from tqdm import tqdm

import mindspore as ms
from mindspore import Tensor

import gm
from gm.compile_cache import CompileCache, CompileCacheError, add_compile_cache_argument, fingerprint
from gm.compile_cache import disable as disable_compile_cache
from gm.data.dataset import DataError, TextualInversionDataset, data_order, prompt_batch
from gm.data.templates import TemplateError, load_templates
from gm.device import add_device_arguments, resolve_device, set_device
from gm.models.loading import create_model, load_config
from gm.modules.encoders.modules import TEXT_ENCODERS
from gm.modules.layers import default_conv_impl
from gm.modules.diffusionmodules.denoiser_weighting import EpsMinSNRWeighting, EpsWeighting
from gm.sampling import SDXLPipeline, guidance_batch, make_grid, save_png
from gm.textual_inversion.checkpointing import (
    STATE_DIR, ResumeError, RunFolderInUse, embedding_name, embedding_paths, find_train_state, latest_train_state,
    load_train_state, read_train_state, run_folder_lock, save_learned_embeddings, save_train_state,
)
from gm.textual_inversion.embedding_io import EmbeddingFormatError
from gm.textual_inversion.encoding_check import EncodingCheck
from gm.textual_inversion.latent_cache import TrainingLatents
from gm.textual_inversion.loss_log import LossLog, vector_health
from gm.textual_inversion.optim import SCHEDULES, AdamW, learning_rate
from gm.textual_inversion.placeholder import (
    PlaceholderError, add_trainable_placeholder, expand_placeholders, nearest_words, placeholder_tokens,
    vocabulary_norms,
)
from gm.textual_inversion.train_step import (
    BlockwiseTrainStep, TextualInversionLoss, TextualInversionTrainStep, compile_ahead, loss_inputs,
)
from gm.textual_inversion.validation import Validation, ValidationLoss
from gm.util import str2bool
from gm.weights.loader import WeightFileError, layout_fingerprint, weight_format
from gm.weights.state_dict import WeightMismatchError

DEFAULT_CONFIG = "configs/training/sd_xl_base_finetune_textual_inversion.yaml"
DEFAULT_WEIGHT = "checkpoints/sd_xl_base_1.0_ms.ckpt"
PROJECT_ROOT = os.path.dirname(os.path.abspath(__file__))
# flags whose default a config's `training:` section may set, and their defaults otherwise
CONFIG_DEFAULTS = {"resolution": 1024, "total_step": 3000, "save_interval": 500, "infer_interval": 500}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
INTERRUPTED = 130  # the shell's code for Ctrl-C
ENCODERS = tuple(name.removeprefix("clip_") for name in TEXT_ENCODERS)  # "l", "g": --train_encoders' letters
TRAIN_ENCODERS = ("l,g", "l", "g")
VALIDATION_PROMPTS = {"object": "a photo of {}", "style": "a painting in the style of {}", "face": "a photo of {}"}
# a word the run learns: its token, its images, its vectors, what it stands for (the templates), and the flag that
# gave it (for messages)
Concept = collections.namedtuple("Concept", ["token", "data_path", "num_vectors", "learnable_property", "flag"])


class UsageError(ValueError):
    """A bad command-line argument; the message names the flag."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (a full disk, a diverged embedding); the message says what was kept."""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and outputs")
    g.add_argument("--data_path", default=None, help="folder of 3-20 images (jpg, png, webp, bmp) of the concept")
    g.add_argument("--save_path", default=None,
                   help="where outputs go, one training at a time (default: runs/<placeholder name>)")
    g.add_argument("--learnable_property", choices=list(VALIDATION_PROMPTS), default="object",
                   help="what the word stands for; picks the prompt templates (default: %(default)s)")
    g.add_argument("--template_file", default=None,
                   help="a text file of prompt templates, one per line, each with {} for the placeholder")
    g.add_argument("--resolution", type=int, default=None,
                   help="training image size (default: the config's training.resolution, else 1024)")
    g.add_argument("--bucketing", type=str2bool, default=False,
                   help="aspect-ratio buckets: train each image at the one of SDXL's training sizes (its 1024 px "
                        "list scaled to about --resolution^2 pixels, sides multiples of 32) nearest its aspect "
                        "ratio, not at the --resolution square; each micro-batch from one bucket. Each bucket's size "
                        "compiles its own training graph at its first step, kept for the run: on the CPU each one "
                        "stays in memory (0.3 GB on the tiny model at 64 px; more for the full-size model), so many "
                        "buckets cost more; so does the validation loss's graph, which takes each image at its "
                        "bucket's size (default: False, the square centre crop)")
    g.add_argument("--flip_p", type=float, default=0.5, help="probability of a horizontal flip (default: 0.5)")
    g.add_argument("--caption_dropout", type=float, default=0.0,
                   help="probability of prompting an image that has a caption (name.txt) with a template instead "
                        "(default: 0)")
    g.add_argument("--shuffle_caption", type=str2bool, default=False,
                   help="shuffle each caption's comma-separated tags at every draw, but the first --keep_tokens")
    g.add_argument("--keep_tokens", type=int, default=0,
                   help="with --shuffle_caption: leading tags kept in place (default: 0)")
    g.add_argument("--cache_latents", type=str2bool, default=True,
                   help="encode each image once before training and release the VAE encoder (default: True)")
    g.add_argument("--overwrite", action="store_true", help="start afresh in a --save_path holding another run")

    g = p.add_argument_group("model")
    g.add_argument("--config", default=DEFAULT_CONFIG, help="model config (default: %(default)s)")
    g.add_argument("--weight", default=None,
                   help=f"SDXL weights: our .ckpt, the original .safetensors or a diffusers folder (default: the "
                        f"config's training.weight, else {DEFAULT_WEIGHT} for the SDXL config; a small config without "
                        f"either starts from random weights)")
    g.add_argument("--recompute", type=str2bool, default=False,
                   help="recompute the UNet's blocks (and, on Ascend, the text encoders' layers) in the backward "
                        "pass instead of keeping their activations: less memory, more time (benchmarks/README.md)")
    g.add_argument("--blockwise_unet", type=str2bool, default=False,
                   help="run the UNet layer by layer from the host, each distinct layer compiled once and each "
                        "layer recomputed in the backward pass: what makes the full-size SDXL's step fit in 24 GB "
                        "on the CPU at 1024 px, or at 512 px beside validation grids (slower per step; README "
                        "'Running the real SDXL'); the validation grids' UNet runs so too")
    g.add_argument("--vae_tiling", type=str2bool, default=False,
                   help="decode the validation grids' images tile by tile, with the same result as in one piece: "
                        "less memory beside the loaded UNet (the full-size decoder at 1024 px alone: 5.1 GB against "
                        "10.1 GB in one piece, slower; benchmarks/bench_vae.py)")

    g = p.add_argument_group("the new word")
    g.add_argument("--placeholder_token", default=None, help='the new word, e.g. "<cat-toy>" (with --data_path)')
    g.add_argument("--concept", action="append", default=None, metavar="TOKEN:DATA_PATH[:NUM_VECTORS[:PROPERTY]]",
                   help="one more word to learn in the same run from its own folder (repeatable), e.g. "
                        "'<my-dog>:photos/dog:4:object'; vectors and property default to --num_vectors and "
                        "--learnable_property. Each micro-batch comes from one word's images, in turn, and each word "
                        "gets its own embedding files")
    g.add_argument("--initializer_token", default=None,
                   help='a word or phrase, e.g. "plush cat toy": its tokens\' embeddings start the vectors in order, '
                        "cycling when there are more vectors than tokens (default: small random vectors)")
    g.add_argument("--num_vectors", type=int, default=1, help="vectors per encoder for the word (default: 1)")
    g.add_argument("--train_encoders", default="l,g",
                   help="the text encoders whose rows train: l,g (both), l (CLIP ViT-L) or g (OpenCLIP bigG); the "
                        "other's rows keep their initial values and are saved with them (default: %(default)s)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--total_step", type=int, default=None,
                   help="optimizer steps (default: the config's training.total_step, else 3000)")
    g.add_argument("--train_batch_size", type=int, default=1,
                   help="images per micro-batch per device (default: 1)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="micro-batches averaged per optimizer step (default: 1)")
    g.add_argument("--learning_rate", type=float, default=5e-4, help="AdamW learning rate (default: %(default)s)")
    g.add_argument("--learning_rate_clip_l", type=float, default=None,
                   help="learning rate of the CLIP ViT-L rows, on the same schedule (default: --learning_rate)")
    g.add_argument("--learning_rate_clip_g", type=float, default=None,
                   help="learning rate of the OpenCLIP bigG rows, on the same schedule (default: --learning_rate)")
    g.add_argument("--scale_lr", type=str2bool, default=False,
                   help="multiply the learning rate by the effective batch size (as diffusers does)")
    g.add_argument("--lr_scheduler", choices=SCHEDULES, default="constant",
                   help="learning-rate schedule after the warm-up, the shapes of diffusers' get_scheduler: "
                        "%(choices)s (default: %(default)s)")
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="steps of linear warm-up from 0 (default: 0; ignored by 'constant')")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay (default: 1e-2)")
    g.add_argument("--max_grad_norm", type=float, default=1.0,
                   help="clip the gradient's global norm to this; 0 turns clipping off (default: 1.0)")
    g.add_argument("--snr_gamma", type=float, default=None,
                   help="min-SNR-gamma loss weighting (Hang et al. 2023): each sample's eps loss weighted by "
                        "min(SNR, gamma) / SNR; 5 is the paper's choice (default: off, the plain eps loss)")
    g.add_argument("--noise_offset", type=float, default=0.0,
                   help="offset noise, as kohya's: add this times an N(0, 1) constant per sample and channel to the "
                        "noise, e.g. 0.05 (default: 0, off)")
    g.add_argument("--embedding_norm", choices=("free", "preserve"), default="free",
                   help="preserve: after every update, scale each learned vector back to its initial norm (with "
                        "random initial vectors, the vocabulary's mean norm), as OneTrainer can; free: leave it "
                        "(default: %(default)s)")
    g.add_argument("--seed", type=int, default=42,
                   help="seed of initialisation, data order, augmentation and noise (default: %(default)s)")

    g = p.add_argument_group("checkpoints, samples, resume")
    g.add_argument("--save_interval", type=int, default=None,
                   help="save the embeddings and the training state every N steps (default: the config's "
                        "training.save_interval, else 500)")
    g.add_argument("--max_num_ckpt", type=int, default=None,
                   help="keep at most N step-numbered embedding pairs (default: all; the best pair is always kept)")
    g.add_argument("--validation_interval", type=int, default=None,
                   help="evaluate the validation loss (the loss on fixed held-out draws of image, flip, prompt, noise "
                        "and timestep) at step 0, every N steps and at the end, and keep the embedding with the lowest "
                        "as <name>_best; 0 turns it off and saves its time and the memory of its graphs (the UNet's is "
                        "the sample grids' when they are on) (default: the config's "
                        "training.validation_interval, else --save_interval)")
    g.add_argument("--validation_draws", type=int, default=64,
                   help="draws of the validation loss, rounded up to a multiple of the number of images "
                        "(default: %(default)s)")
    g.add_argument("--resume", default=None,
                   help='continue a run: "latest" (the newest state in --save_path), a run folder, or one of its '
                        'train_state/step_<n> folders; the placeholder, vectors and model must match')
    g.add_argument("--infer_during_train", type=str2bool, default=False,
                   help="sample the validation prompt every --infer_interval steps and at the end")
    g.add_argument("--infer_interval", type=int, default=None,
                   help="steps between validation samples (default: the config's training.infer_interval, else 500)")
    g.add_argument("--validation_prompt", default=None,
                   help='prompt for validation samples (default by property, e.g. "a photo of <tok>")')
    g.add_argument("--num_validation_images", type=int, default=4, help="images per validation grid (default: %(default)s)")
    g.add_argument("--validation_sample_step", type=int, default=25, help="sampler steps for validation (default: %(default)s)")

    g = add_device_arguments(p)  # --device_target, --ms_mode, --precision: the same for every command
    add_compile_cache_argument(g)
    g.add_argument("--is_parallel", type=str2bool, default=False,
                   help="data parallel across the workers started by msrun")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def concepts_of(args):
    """The words this run learns, in the order their rows are added: --placeholder_token with --data_path, then each
    --concept."""
    concepts = []
    if args.placeholder_token is not None or args.data_path is not None:
        if args.placeholder_token is None or args.data_path is None:
            raise UsageError("--placeholder_token and --data_path go together (the word and its images); or give "
                             "each word as --concept TOKEN:DATA_PATH.")
        concepts.append(Concept(args.placeholder_token, args.data_path, args.num_vectors, args.learnable_property,
                                "--placeholder_token"))
    concepts += [parse_concept(text, args.num_vectors, args.learnable_property) for text in args.concept or ()]
    if not concepts:
        raise UsageError("nothing to learn: give --placeholder_token and --data_path, or --concept TOKEN:DATA_PATH.")
    return concepts


def parse_concept(text, num_vectors, learnable_property):
    """--concept TOKEN:DATA_PATH[:NUM_VECTORS[:PROPERTY]] as a Concept; the path may hold colons."""
    flag = f"--concept {text!r}"
    token, _, rest = text.partition(":")
    parts = rest.split(":")
    if len(parts) > 1 and parts[-1] in VALIDATION_PROMPTS:
        learnable_property = parts.pop()
    if len(parts) > 1 and parts[-1].lstrip("-").isdigit():
        num_vectors = int(parts.pop())
    data_path = ":".join(parts)
    if not token or not data_path:
        raise UsageError(f"{flag}: expected TOKEN:DATA_PATH[:NUM_VECTORS[:PROPERTY]], e.g. '<my-dog>:photos/dog:4:object'.")
    return Concept(token, data_path, num_vectors, learnable_property, flag)


def check_concepts(concepts):
    """Each word's folder exists, its token is one word with at least one vector, and no two words share a token
    (the tokenizers lower-case prompts, so neither may they differ only in case)."""
    owners = {}
    for concept in concepts:
        given = concept.flag == "--placeholder_token"  # the word of --placeholder_token and --data_path
        token_flag, path_flag = ("--placeholder_token", "--data_path") if given else (concept.flag, concept.flag)
        if concept.num_vectors < 1:
            raise UsageError(f"{concept.flag}: NUM_VECTORS must be at least 1, got {concept.num_vectors}")
        if not os.path.isdir(concept.data_path):
            raise UsageError(f"{path_flag} {concept.data_path}: no such folder.")
        if not concept.token.strip() or any(c.isspace() for c in concept.token):
            raise UsageError(f"{token_flag} {concept.token!r}: must be one word without spaces.")
        for token in placeholder_tokens(concept.token, concept.num_vectors):
            owner = owners.setdefault(token.lower(), concept.token)
            if owner != concept.token:
                raise UsageError(f"{concept.flag}: {token!r} is already a token of the word {owner!r} in this run; "
                                 "each word needs a token of its own.")
    names = [embedding_name(concept.token) for concept in concepts]
    for i, (concept, name) in enumerate(zip(concepts, names)):
        # one file name per word, and <w>_<n>.safetensors (<w>_best) is the word <w> at step n (its best step): no
        # other word may be named so
        clash = [concepts[j].token for j, other in enumerate(names)
                 if j != i and (other == name or re.fullmatch(re.escape(other) + r"_(\d+|best)", name))]
        if clash:
            raise UsageError(f"{concept.flag}: its embedding files ({name}.safetensors, ...) would clash with those "
                             f"of the word {clash[0]!r}; rename one of the two words.")


def check_args(args):
    """Reject bad arguments before anything is built or written (the weights first: the most likely miss)."""
    for flag, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):  # NaN passes every range check below
            raise UsageError(f"--{flag} must be a finite number, got {value}")
    for flag in ("num_vectors", "total_step", "gradient_accumulation_steps", "train_batch_size",
                 "save_interval", "infer_interval", "num_validation_images", "validation_sample_step"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.validation_interval < 0:
        raise UsageError(f"--validation_interval must be at least 0 (0: off), got {args.validation_interval}")
    if args.validation_draws < 1:
        raise UsageError(f"--validation_draws must be at least 1, got {args.validation_draws}")
    if args.max_num_ckpt is not None and args.max_num_ckpt < 1:
        raise UsageError(f"--max_num_ckpt must be at least 1, got {args.max_num_ckpt}")
    if args.lr_warmup_steps < 0:
        raise UsageError(f"--lr_warmup_steps must be at least 0, got {args.lr_warmup_steps}")
    for flag in ("flip_p", "caption_dropout"):
        if not 0.0 <= getattr(args, flag) <= 1.0:
            raise UsageError(f"--{flag} must be between 0 and 1, got {getattr(args, flag)}")
    if args.keep_tokens < 0:
        raise UsageError(f"--keep_tokens must not be negative, got {args.keep_tokens}")
    for flag in ("learning_rate", "learning_rate_clip_l", "learning_rate_clip_g"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise UsageError(f"--{flag} must be positive, got {getattr(args, flag)}")
    if args.train_encoders not in TRAIN_ENCODERS:
        raise UsageError(f"--train_encoders must be l,g (both text encoders), l (CLIP ViT-L) or g (OpenCLIP bigG), "
                         f"got {args.train_encoders!r}")
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        raise UsageError(f"--snr_gamma must be positive (5 is the paper's choice), got {args.snr_gamma}")
    for flag in ("seed", "max_grad_norm", "adam_weight_decay", "noise_offset"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag} must not be negative, got {getattr(args, flag)}")
    # The UNet halves the latent twice (three levels) and the VAE divides by 8: sides must be multiples of 32.
    if args.resolution < 64 or args.resolution % 32:
        raise UsageError(f"--resolution {args.resolution}: SDXL takes multiples of 32 from 64 up (e.g. 1024).")
    try:
        args.device_target, args.precision = resolve_device(args.device_target, args.precision)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.weight:
        weight_format(args.weight)  # a missing or unreadable file is reported now, not after minutes of setup
    check_concepts(args.concepts)
    if args.template_file:
        load_templates(args.template_file)
    check_writable(args.save_path)
    run_files = [n for n in (STATE_DIR, "loss.csv", "args.yaml") if os.path.exists(os.path.join(args.save_path, n))]
    if run_files and not (args.resume or args.overwrite):
        raise UsageError(f"--save_path {args.save_path} holds another run's files ({', '.join(run_files)}): "
                         "pass --resume latest to continue it, --overwrite to start afresh, or another --save_path.")


def check_writable(save_path):
    """--save_path must be a folder this process can create or write in (checked on its nearest existing
    ancestor, without writing anything)."""
    existing = os.path.abspath(save_path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"--save_path {save_path}: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--save_path {save_path}: cannot write in {existing} (a read-only file system, or no "
                         "permission); choose another --save_path.")


def resolve_defaults(args, config):
    """Fill defaults that depend on the config or on other flags; `args.concepts`: the words to learn."""
    args.concepts = concepts_of(args)
    for flag, default in CONFIG_DEFAULTS.items():  # a small model's config may set shorter runs
        if getattr(args, flag) is None:
            setattr(args, flag, int(OmegaConf.select(config, f"training.{flag}", default=default)))
    if args.validation_interval is None:
        args.validation_interval = int(OmegaConf.select(config, "training.validation_interval",
                                                        default=args.save_interval))
    if args.save_path is None:
        args.save_path = os.path.join("runs", embedding_name(args.concepts[0].token))
    if args.weight is None and OmegaConf.select(config, "training.weight"):
        # the tiny quick-start config names its shipped pretrained file, relative to the project's top folder
        args.weight = os.path.relpath(os.path.join(PROJECT_ROOT, config.training.weight))
    if args.weight is None and config.model.params.get("requires_weights", True):
        args.weight = DEFAULT_WEIGHT


def set_loss_options(loss_fn, snr_gamma, noise_offset):
    """--snr_gamma and --noise_offset on the config's loss (sgm's StandardDiffusionLoss); off, it stays as the
    config built it."""
    if snr_gamma is not None:
        if not isinstance(loss_fn.loss_weighting, EpsWeighting):
            raise UsageError(f"--snr_gamma weights the eps objective, but the config weights the loss with "
                             f"{type(loss_fn.loss_weighting).__name__}, not EpsWeighting.")
        loss_fn.loss_weighting = EpsMinSNRWeighting(snr_gamma)
    if noise_offset:
        loss_fn.offset_noise_level = noise_offset


def setup_device(args):
    """MindSpore context; (rank, world size) of this process."""
    try:
        set_device(args.device_target, args.ms_mode)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not args.is_parallel:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init

    # msrun's scheduler (this script too) ends the run when a worker's heartbeat is late by MS_NODE_TIMEOUT seconds;
    # on a loaded CPU the heartbeats stalled while the workers compiled (a CI run: two tiny workers, 300 s)
    os.environ.setdefault("MS_NODE_TIMEOUT", "1800")
    init()
    return get_rank(), get_group_size()


def run_identity(args, config, world_size):
    """What a training state must share with this run to be resumed by it."""
    return {"words": [[concept.token, concept.num_vectors] for concept in args.concepts],
            "model": hashlib.sha256(OmegaConf.to_yaml(config.model).encode()).hexdigest()[:16],
            "weight": os.path.abspath(args.weight) if args.weight else None,
            "resolution": args.resolution, "seed": args.seed, "world_size": world_size,
            # the bucketed data order's epochs are in steps of the global batch; None: the square order, as before
            "bucketing": {"train_batch_size": args.train_batch_size} if args.bucketing else None}


def embedding_facts(args, learning_rate_used):
    """What an embedding file records of its training, besides its step (read back by the samplers)."""
    return {"base_config": os.path.basename(args.config),
            "base_layout": layout_fingerprint(args.weight) if args.weight else "random initial weights",
            "learning_rate": learning_rate_used, "seed": args.seed, "trainer": f"sdxl-ti-mindspore {gm.__version__}"}


class Training:
    """Everything a run trains with, built from the arguments: data and its order, the frozen model with the
    placeholder tokens added, cached latents, and the compiled train step over the learned rows; `resume` and
    `save` read and write its training state."""

    def __init__(self, args, config, rank=0, world_size=1, compile_cache=None):
        self.compile_cache = compile_cache  # where this run's graphs are saved or loaded from (None: off)
        # ---- data: each word's images and their prompts, where its placeholder stands for all its vectors
        self.concepts = args.concepts
        templates = load_templates(args.template_file) if args.template_file else None
        self.datasets = [TextualInversionDataset(
            concept.data_path, concept.token, args.resolution, concept.learnable_property, templates,
            placeholder_text=expand_placeholders(concept.token, {concept.token: concept.num_vectors}),
            flip_p=args.flip_p, seed=args.seed, caption_dropout=args.caption_dropout,
            shuffle_caption=args.shuffle_caption, keep_tokens=args.keep_tokens, bucketing=args.bucketing)
            for concept in self.concepts]
        self.orders = [data_order(dataset, args.train_batch_size, args.seed, rank, world_size)
                       for dataset in self.datasets]

        # ---- the frozen model, with the placeholder tokens added to both text encoders
        ms.set_seed(args.seed)
        self.model = create_model(config, args.weight, precision=args.precision, recompute=args.recompute)
        for param in self.model.get_parameters():
            param.requires_grad = False  # every weight is frozen; the rows added below are the only trainables
        set_loss_options(self.model.loss_fn, args.snr_gamma, args.noise_offset)
        init_rng = np.random.RandomState(args.seed)
        for concept in self.concepts:  # each word's rows after the previous word's
            self.learned_rows = add_trainable_placeholder(self.model.conditioner, concept.token, concept.num_vectors,
                                                          args.initializer_token, init_rng)
        self.tokens = [t for concept in self.concepts for t in placeholder_tokens(concept.token, concept.num_vectors)]
        self.initial_rows = self.rows()  # (kept for the log: how far each vector moved)

        # ---- latents of the training images, encoded once (the VAE encoder is released after the last word's)
        variants = (False, True) if args.flip_p > 0 else (False,)
        self.latents = [TrainingLatents(self.model.first_stage_model, dataset, variants, cache=args.cache_latents,
                                        progress=rank == 0, release_encoder=k == len(self.datasets) - 1)
                        for k, dataset in enumerate(self.datasets)]

        # ---- the train step over the learned rows only (compiled at its first call)
        self.effective_batch = args.train_batch_size * args.gradient_accumulation_steps * world_size
        self.base_lr = base_learning_rate(args.learning_rate, args.scale_lr, self.effective_batch)
        random_start = args.embedding_norm == "preserve" and not args.initializer_token
        row_norms = vocabulary_norms(self.model.conditioner, self.learned_rows) if random_start else None
        self.optimizer, self.train_step = build_train_step(TextualInversionLoss(self.model), self.learned_rows, args,
                                                           world_size, row_norms)
        # what a training state holds besides the host side (step, data order)
        self.state_params = self.learned_rows + self.train_step.update.state_parameters()

        # ---- the validation loss on fixed held-out draws (its graphs compile at the first evaluation at each size)
        self.validation, self.validation_pipeline = None, None
        if args.infer_during_train:  # the validation grids' sampling pipeline (its graphs compile at the first grid)
            self.validation_pipeline = SDXLPipeline(
                self.model, placeholders={concept.token: concept.num_vectors for concept in self.concepts},
                blockwise_unet=args.blockwise_unet, vae_tiling=args.vae_tiling)
        if args.validation_interval:
            net, batch_size = None, None  # a ValidationLoss of its own, as many draws a call as a sampling call has
            if args.blockwise_unet:  # layer by layer: the train step's own graphs, at its batch
                net, batch_size = self.train_step.loss, args.train_batch_size
            elif self.validation_pipeline is not None:  # the grids' compiled UNet serves it too, at their batch
                net = ValidationLoss(self.model, self.validation_pipeline.denoiser)
                batch_size = guidance_batch(len(validation_prompts(args)) * args.num_validation_images,
                                            args.resolution, args.resolution)
            self.validation = Validation(self.model, self.datasets, self.latents, args.validation_draws, args.seed,
                                         batch_size, args.flip_p > 0, self.learned_rows, rank, world_size, net)
        self.identity, self.schedule = run_identity(args, config, world_size), schedule_flags(args)
        self.embedding_facts = embedding_facts(args, self.base_lr)
        # every embedding file written must change the encoding of its word's prompt (checked as read back)
        self.encoding_check = EncodingCheck(self.model.conditioner, [
            (concept.token, concept.num_vectors, word_prompt(concept)) for concept in self.concepts], args.resolution)
        self.args, self.rank, self.world_size = args, rank, world_size
        self.start_step, self.log = 0, None
        self.step_shapes = set()  # the micro-batch shapes the train step has run at: one compiled graph each

    def resume(self, state_dir, host):
        """Continue from the training state `state_dir` (its host state `host`, checked by `read_resume_state`)."""
        load_train_state(state_dir, self.state_params)
        try:
            for order, state in zip(self.orders, host["data_orders"], strict=True):
                order.load_state_dict(state)
        except (KeyError, ValueError) as e:
            raise ResumeError(f"{state_dir}: the training images changed since it was saved ({e}).") from None
        self.start_step = host["step"]
        if self.validation is not None and "validation" in host:
            self.resume_validation(state_dir, host["validation"])
        saved_schedule = host.get("schedule", self.schedule)
        if self.rank == 0 and schedule_changed(saved_schedule, self.schedule, self.start_step, self.effective_batch):
            print(f"warning: the learning-rate schedule differs from the resumed run's {saved_schedule} in the "
                  f"steps already taken; the continuation will not match an uninterrupted run.", file=sys.stderr)

    def resume_validation(self, state_dir, saved):
        """Keep the resumed run's validation draws and its best (step, loss and rows)."""
        validation = self.validation
        if len(saved["draws"]) != len(validation.draws) and self.rank == 0:
            print(f"warning: the resumed run's {len(saved['draws'])} validation draws are kept (--validation_draws "
                  f"{self.args.validation_draws} would give {len(validation.draws)}), so that its validation losses "
                  "stay comparable.", file=sys.stderr)
        validation.load_state_dict(saved)
        for word, index, flipped, *_ in validation.draws:
            if word >= len(self.datasets) or index >= len(self.datasets[word]) or (flipped and self.args.flip_p == 0):
                raise ResumeError(f"{state_dir}: its validation draws do not fit this run's images (image {index} of "
                                  f"word {word}{', mirrored, but --flip_p is 0' if flipped else ''}).")
        if validation.best_step is not None:
            load_train_state(state_dir, validation.best_rows)

    def begin(self, config):
        """The run folder's first writes (rank 0): args.yaml, the loss log from the start step, a resumed run's best
        embeddings."""
        if self.rank != 0:
            return
        args = self.args
        resolved = {"world_size": self.world_size, "effective_batch_size": self.effective_batch,
                    "learning_rate_used": self.base_lr, "tokens": self.tokens, "start_step": self.start_step,
                    "words": [dict(concept._asdict()) for concept in self.concepts],
                    "validation_prompts": validation_prompts(args)}
        flags = {flag: value for flag, value in vars(args).items() if flag != "concepts"}
        OmegaConf.save(OmegaConf.create({"args": flags, "resolved": resolved, "config": config}),
                       os.path.join(args.save_path, "args.yaml"))
        self.log = LossLog(args.save_path, self.start_step, TEXT_ENCODERS, self.tokens)
        if self.validation is not None and self.validation.best_step is not None:
            self.save_best()  # the resumed run's: the folder may hold none, or a later step's of an abandoned run

    def run_step(self, step, lr):
        """One optimizer step (all its micro-batches, each from one word's images, the words in turn); returns the
        mean loss of its micro-batches."""
        losses = []
        accumulation = self.args.gradient_accumulation_steps
        for micro in range(accumulation):
            # noise drawn from (seed, rank, step, micro-batch): reproducible on resume, different per rank
            noise_rng = np.random.RandomState([self.args.seed, self.rank, step, micro])
            k = (step * accumulation + micro) % len(self.concepts)
            inputs = draw_micro_batch(self.model, self.datasets[k], self.latents[k], self.orders[k], noise_rng)
            args = (Tensor(lr, ms.float32), Tensor(micro == accumulation - 1)) + tuple(inputs)
            if inputs[0].shape not in self.step_shapes:  # a new one (a bucket's first micro-batch) compiles a graph
                self.step_shapes.add(inputs[0].shape)
                compile_ahead(self.train_step, *args)
            loss = self.train_step(*args)
            losses.append(float(loss.asnumpy()))
        return float(np.mean(losses))

    def cached_graphs(self):
        """How many graphs the compile cache's folder holds (0 when the cache is off)."""
        return 0 if self.compile_cache is None else self.compile_cache.graphs()

    def rows(self, learned_rows=None):
        """The learned rows of both encoders as float32 arrays ([n, d1], [n, d2]), every word's in order (of
        `learned_rows`, default: the training's)."""
        return tuple(p.asnumpy().astype(np.float32) for p in learned_rows or self.learned_rows)

    def word_rows(self, learned_rows=None):
        """[(concept, its rows [n, d1], [n, d2])] for each word (of `learned_rows`, default: the training's)."""
        rows, start, words = self.rows(learned_rows), 0, []
        for concept in self.concepts:
            end = start + concept.num_vectors
            words.append((concept, rows[0][start:end], rows[1][start:end]))
            start = end
        return words

    def save(self, step, final=False):
        """Write each word's embeddings and the training state at `step` (rank 0; the noise needs no saving, it is
        a function of seed and step); `final` also writes the embeddings under their unnumbered names."""
        if self.rank != 0:
            return
        args, facts = self.args, dict(self.embedding_facts, step=step)
        several = len(self.concepts) > 1
        for concept, rows_l, rows_g in self.word_rows():
            save_learned_embeddings(args.save_path, concept.token, rows_l, rows_g, step, args.max_num_ckpt, facts,
                                    several, self.encoding_check)
            if final:
                save_learned_embeddings(args.save_path, concept.token, rows_l, rows_g, None, None, facts, several,
                                        self.encoding_check)
        host_state = {"identity": self.identity, "data_orders": [order.state_dict() for order in self.orders],
                      "schedule": self.schedule}
        params = self.state_params
        if self.validation is not None:
            host_state["validation"] = self.validation.state_dict()
            params = params + self.validation.best_rows
        save_train_state(args.save_path, step, params, host_state)
        self.log.plot()

    def validate(self, step):
        """The validation loss at `step` (every rank evaluates its share of the draws: all ranks call this at the
        same steps); a new lowest writes each word's best embeddings."""
        loss = float(np.mean(self.validation.losses()))
        if self.validation.improved(step, loss, self.learned_rows):
            self.save_best()
        return loss

    def save_best(self):
        """Write each word's embeddings of the best validation loss as <name>_best (rank 0), with its step and loss
        in their metadata; --max_num_ckpt never prunes them."""
        if self.rank != 0:
            return
        validation = self.validation
        facts = dict(self.embedding_facts, step=validation.best_step, val_loss=f"{validation.best_loss:.6f}")
        for concept, rows_l, rows_g in self.word_rows(validation.best_rows):
            save_learned_embeddings(self.args.save_path, concept.token, rows_l, rows_g, "best", None, facts,
                                    len(self.concepts) > 1, self.encoding_check)


def main(args):
    """Train; returns the exit code (0, or INTERRUPTED after a Ctrl-C that saved a checkpoint)."""
    # until the loop starts, and after it, a stop has nothing to save: it interrupts (KeyboardInterrupt)
    with signal_handler(interrupt):
        config = load_config(args.config)
        resolve_defaults(args, config)
        check_args(args)
        rank, world_size = setup_device(args)
        # rank 0 alone writes the run folder, and holds its lock for the whole run: a second training there refuses
        with run_folder_lock(args.save_path) if rank == 0 else contextlib.nullcontext():
            resumed = read_resume_state(args, run_identity(args, config, world_size))
            if world_size > 1:
                barrier()  # every rank has checked the arguments before rank 0 writes anything
            compile_cache = open_compile_cache(args, config, world_size, resumed)
            run = Training(args, config, rank, world_size, compile_cache)
            if resumed:
                run.resume(*resumed)
            elif args.overwrite and rank == 0:
                for name in (STATE_DIR, "samples"):  # the other run's; its embeddings and logs are overwritten
                    shutil.rmtree(os.path.join(args.save_path, name), ignore_errors=True)
            with stop_on_write_error(args.save_path):
                run.begin(config)
                return train_and_save(run)


def open_compile_cache(args, config, world_size, resumed):
    """This run's compile-cache folder (`gm.compile_cache`); None when off: --compile_cache off, PyNative mode,
    data-parallel runs (not tried with the cache), or another run using the same folder."""
    if args.compile_cache == "off" or args.ms_mode == 1 or world_size > 1:
        disable_compile_cache()
        return None
    return CompileCache.open(args.compile_cache, "train", compile_cache_facts(args, config, resumed))


def compile_cache_facts(args, config, resumed):
    """All that decides which graphs a run compiles, and in which order: every argument but where the outputs go
    (a run repeated elsewhere, or with --overwrite, loads the graphs too), the config, the weights, the images, the
    training state resumed and the convolution kernels chosen (on the CPU, timed before the cache is on)."""
    return {"args": {k: v for k, v in vars(args).items() if k not in ("save_path", "overwrite")},
            "config": OmegaConf.to_yaml(config), "weight": fingerprint(args.weight),
            "images": [fingerprint(concept.data_path) for concept in args.concepts],
            "templates": fingerprint(args.template_file), "resumed": fingerprint(resumed[0]) if resumed else None,
            "convolution": default_conv_impl()}


def read_resume_state(args, identity):
    """(state folder, its host state) that --resume names, checked against this run's `identity` before anything
    is built; None without --resume."""
    if not args.resume:
        return None
    state_dir = find_train_state(args.save_path, args.resume)
    return state_dir, read_train_state(state_dir, identity)


def interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def signal_handler(handler):
    """`handler` for the stop signals within the block, the previous handlers after it."""
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class StopRequest:
    """The first stop signal asks the loop to stop after the current step; a second one stops at once."""

    def __init__(self, announce):
        self.signal, self.announce = None, announce

    def __call__(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        if self.announce:
            tqdm.write("Stopping after this step (press Ctrl-C again to stop at once, without saving)...")


@contextlib.contextmanager
def stop_on_signal(announce):
    """Within the block, Ctrl-C finishes the current step (the loop then saves and exits); yields the
    `StopRequest`. MindSpore turns a SIGINT that arrives while a graph runs into a SIGTERM, so both mean Ctrl-C."""
    stop = StopRequest(announce)
    with signal_handler(stop):
        yield stop


def build_train_step(loss_net, learned_rows, args, world_size=1, row_norms=None):
    """(AdamW, the train step) over the learned rows of the encoders --train_encoders names, each at its encoder's
    learning rate (a constant multiple of the scheduled one). The other encoder's rows get no gradient and no
    update: they stay their initial values, bit for bit. With --embedding_norm preserve, each row is scaled back to
    its norm in `row_norms` ([n] per encoder; default: its initial norm) after every update."""
    rates = encoder_learning_rates(args)
    if row_norms is None:
        row_norms = [np.linalg.norm(rows.asnumpy().astype(np.float32), axis=1) for rows in learned_rows]
    params, lr_scales, norms = [], [], []
    for name, rows, row_norm in zip(ENCODERS, learned_rows, row_norms):
        rows.requires_grad = name in rates
        if rows.requires_grad:
            params.append(rows)
            lr_scales.append(rates[name] / args.learning_rate)
            norms.append(row_norm)
    optimizer = AdamW(params, weight_decay=args.adam_weight_decay, lr_scales=lr_scales)
    step_class = BlockwiseTrainStep if args.blockwise_unet else TextualInversionTrainStep
    train_step = step_class(loss_net, params, optimizer, accumulation_steps=args.gradient_accumulation_steps,
                            max_grad_norm=args.max_grad_norm, dynamic_loss_scale=args.precision == "fp16",
                            world_size=world_size, row_norms=norms if args.embedding_norm == "preserve" else None)
    return optimizer, train_step


def encoder_learning_rates(args):
    """{encoder: its learning rate} of the encoders --train_encoders names, before --scale_lr and the schedule."""
    return {name: getattr(args, f"learning_rate_clip_{name}") or args.learning_rate
            for name in args.train_encoders.split(",")}


def schedule_flags(args):
    """The flags that set the learning rate of each step: saved with the state, to warn when a resume changes it."""
    return {"lr_scheduler": args.lr_scheduler, "learning_rate": args.learning_rate, "scale_lr": args.scale_lr,
            "lr_warmup_steps": args.lr_warmup_steps, "total_step": args.total_step,
            "learning_rate_clip_l": args.learning_rate_clip_l, "learning_rate_clip_g": args.learning_rate_clip_g}


def base_learning_rate(learning_rate, scale_lr, effective_batch):
    return learning_rate * (effective_batch if scale_lr else 1)


def schedule_changed(saved, schedule, steps, effective_batch):
    """Whether the schedule flags `schedule` give any of optimizer steps 0 .. steps-1 another learning rate than
    the `saved` ones did: only then does a resumed run differ from one started with these flags (e.g. a longer
    --total_step changes nothing under 'constant', but the past rates of 'linear')."""
    def rates(flags):
        rates = []
        for name in ENCODERS:  # a state saved before the per-encoder rates has neither: both at --learning_rate
            encoder_lr = flags.get(f"learning_rate_clip_{name}") or flags["learning_rate"]
            base = base_learning_rate(encoder_lr, flags["scale_lr"], effective_batch)
            rates += [learning_rate(flags["lr_scheduler"], base, step, flags["total_step"], flags["lr_warmup_steps"])
                      for step in range(steps)]
        return rates

    return rates(saved) != rates(schedule)


@contextlib.contextmanager
def stop_on_write_error(save_path):
    """A write that fails (a full disk, a vanished folder, a file that does not read back as written) stops the
    run with one line that names the last complete training state; the files written before stay."""
    try:
        yield
    except OSError as e:
        raise TrainingStopped(f"{e.strerror or e} ({e.filename or save_path}): the run stopped; "
                              f"{resume_hint(save_path)}.") from None
    except EmbeddingFormatError as e:
        raise TrainingStopped(f"{e} The run stopped; {resume_hint(save_path)}.") from None


def resume_hint(save_path):
    state = latest_train_state(save_path)
    if state is None:
        return "no training state was saved"
    return f"the last complete training state is {state} (--resume latest continues from it)"


def train_and_save(run):
    """The loop and the files it writes at its end; returns the exit code."""
    args, is_main = run.args, run.rank == 0
    if is_main:
        print_summary(args, run)
    with stop_on_signal(announce=is_main) as stop:
        step, timing, stopped = train_loop(run, stop)
    if stopped:
        run.save(step)
        if is_main:
            print(f"\nInterrupted at step {step}: saved the embeddings and the training state. "
                  f"Continue with the same command and --resume latest.")
        return INTERRUPTED
    run.save(step, final=True)
    if run.compile_cache is not None:
        run.compile_cache.mark_complete()
    if run.world_size > 1:
        # each rank's learned rows, to check they agree (data parallel keeps them identical)
        print(f"rank {run.rank}/{run.world_size}: learned rows sha256 {rows_digest(run.rows())}", flush=True)
    if is_main:
        print_outputs(args, run, step, timing)
    return 0


def train_loop(run, stop):
    """Optimizer steps from the start step to --total_step, or until a rank got a stop signal; returns (last step,
    timing, whether it stopped early)."""
    args, is_main = run.args, run.rank == 0
    progress = tqdm(total=args.total_step, initial=run.start_step, desc="Training", disable=not is_main,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
    if is_main and run.start_step < args.total_step:
        reused = run.compile_cache is not None and run.compile_cache.reused
        tqdm.write("Loading the training graph from the compile cache..." if reused else
                   "Compiling the training graph (the first step takes longer)...")
    # compile: the seconds of the steps that compiled a graph (the first; with --bucketing, the first at each
    # bucket's size), loaded: whether each came from the compile cache; steps: the seconds of the others;
    # validation: each evaluation's seconds
    timing = {"compile": [], "loaded": [], "steps": [], "validation": []}
    step = run.start_step
    stopped = False
    with progress:  # closed before an error is printed, too
        if run.validation is not None and step == 0:  # the initial embedding's: the baseline
            val_loss = validate(run, step, timing)
            if is_main:
                run.log.append(step, None, None, None, vector_health(run.rows(), run.initial_rows), val_loss)
        while step < args.total_step:
            if stop_requested(stop, run.world_size):
                stopped = True
                break
            started = time.time()
            lr = learning_rate(args.lr_scheduler, run.base_lr, step, args.total_step, args.lr_warmup_steps)
            graphs, cached_graphs = len(run.step_shapes), run.cached_graphs()
            loss = run.run_step(step, lr)
            step += 1
            rows = run.rows()
            if not all(np.isfinite(r).all() for r in rows):
                raise TrainingStopped(
                    f"at step {step} the learned embedding became NaN or infinite (learning rate {lr:g}), so the run "
                    f"stopped before writing it; {resume_hint(args.save_path)}. Try a lower --learning_rate.")
            seconds = time.time() - started
            if len(run.step_shapes) > graphs:
                timing["compile"].append(seconds)
                loaded = run.compile_cache is not None and run.cached_graphs() == cached_graphs
                timing["loaded"].append(loaded)
                if is_main:
                    at = " at this bucket's size" if len(timing["compile"]) > 1 else ""
                    source, work = ("loaded from the compile cache", "load") if loaded else ("compiled", "compile")
                    tqdm.write(f"Graph {source} in {seconds:.1f} s (first step{at}, {work} included).")
            else:
                timing["steps"].append(seconds)
            val_loss = None
            if run.validation is not None and (step % args.validation_interval == 0 or step == args.total_step):
                val_loss = validate(run, step, timing)
            if is_main:
                run.log.append(step, loss, lr, seconds, vector_health(rows, run.initial_rows), val_loss)
                postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"}
                if timing["steps"]:  # speed and ETA from the steps after the compile (the last 50)
                    per_step = float(np.mean(timing["steps"][-50:]))
                    postfix.update(s_per_step=f"{per_step:.2f}", eta=_duration(per_step * (args.total_step - step)))
                progress.set_postfix(postfix, refresh=False)
                progress.update(1)
            if args.infer_during_train and is_main and (step % args.infer_interval == 0 or step == args.total_step):
                sample_validation_grid(run, args, step)
            if step % args.save_interval == 0 and step != args.total_step:
                run.save(step)
    return step, timing, stopped


def validate(run, step, timing):
    """The validation loss at `step` (on every rank), timed, and its line in the log."""
    started = time.time()
    loss = run.validate(step)
    timing["validation"].append(time.time() - started)
    if run.rank == 0:
        validation = run.validation
        best = (f"best {validation.best_loss:.5f} at step {validation.best_step}" if validation.best_step is not None
                else "none finite yet")
        tqdm.write(f"step {step}: validation loss {loss:.5f} ({best})")
    return loss


def stop_requested(stop, world_size):
    """Whether any rank got a stop signal: all ranks must stop after the same step, or the others would wait
    in the next step's all-reduce for ever."""
    if world_size == 1:
        return stop.signal is not None
    from mindspore.mint.distributed import all_reduce

    flag = Tensor([0.0 if stop.signal is None else 1.0], ms.float32)
    all_reduce(flag)  # sum over ranks, in place
    return float(flag.asnumpy()[0]) > 0


def rows_digest(rows):
    return hashlib.sha256(b"".join(np.ascontiguousarray(r, np.float32).tobytes() for r in rows)).hexdigest()[:16]


def _duration(seconds):
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


def barrier():
    from mindspore.mint.distributed import barrier as ms_barrier

    ms_barrier()


def draw_micro_batch(model, dataset, latents, order, rng):
    """Host side of one micro-batch: which images (the data order), their flips and prompts (the dataset), then
    the noise from `rng` (`loss_inputs`)."""
    draws = order.next_batch()
    choices = [dataset.draw(draw.index, draw.epoch) for draw in draws]
    batch = latents.batch([(draw.index, choice.flipped) for draw, choice in zip(draws, choices)])
    batch.update(prompt_batch(choices))
    return loss_inputs(model, batch.pop("moments"), model.conditioner.tokenize(batch), rng)


def validation_prompts(args):
    """--validation_prompt, or by default one prompt per word, by its property (e.g. "a photo of <tok>")."""
    if args.validation_prompt is not None:
        return [args.validation_prompt]
    return [word_prompt(concept) for concept in args.concepts]


def word_prompt(concept):
    """The word's prompt by its property, e.g. "a photo of <tok>"."""
    return VALIDATION_PROMPTS[concept.learnable_property].format(concept.token)


def sample_validation_grid(run, args, step):
    """Sample the validation prompts with the current learned rows; save one grid (a row per prompt) as
    samples/step_<n>.png.

    The run's sampling pipeline shares the model, so it sees the rows as they are now; it draws its own noise and
    leaves the training RNGs alone."""
    prompts = validation_prompts(args)
    images = run.validation_pipeline.generate(  # prompt by prompt, all of them in UNet batches
        prompts, steps=args.validation_sample_step, height=args.resolution, width=args.resolution, seed=args.seed,
        num_images=args.num_validation_images)
    save_png(os.path.join(args.save_path, "samples", f"step_{step}.png"),
             make_grid(images, len(prompts), args.num_validation_images),
             {"prompt": " | ".join(prompts), "step": str(step), "seed": str(args.seed)})


def print_summary(args, run):
    tokens, rates = run.tokens, encoder_learning_rates(args)
    words = ", ".join(f"{concept.token!r} ({concept.learnable_property})" for concept in run.concepts)
    data = []  # per word: its images and, with --bucketing, how many went to each bucket
    for concept, dataset in zip(run.concepts, run.datasets):
        word = f" for {concept.token}" if len(run.concepts) > 1 else ""
        data.append(f"  images found      : {len(dataset)} in {concept.data_path}{word}")
        if args.bucketing:
            data.append("  buckets (h x w)   : " + ", ".join(f"{h}x{w}: {count}" for (h, w), count in
                                                         dataset.bucket_counts().items()) + word)
    lines = [
        "",
        f"Textual inversion of {words} on {args.config}",
        *data,
        f"  tokens added      : {len(tokens)} to each text encoder ({', '.join(tokens[:4])}"
        f"{' ...' if len(tokens) > 4 else ''})"
        f"{f', initialised from {args.initializer_token!r}' if args.initializer_token else ', random initial vectors'}",
        f"  trainable params  : {sum(p.size for p in run.train_step.update.params):,} "
        f"({' + '.join(str(tuple(p.shape)) for p in run.train_step.update.params)}); every model weight frozen",
        f"  effective batch   : {run.effective_batch} = {args.train_batch_size} per device x "
        f"{args.gradient_accumulation_steps} accumulation x {run.world_size} device(s)",
        f"  steps             : {run.start_step} -> {args.total_step} at {args.resolution}px, lr {run.base_lr:g} "
        f"({args.lr_scheduler}), {args.precision}",
        "  text encoders     : " + ", ".join(f"{encoder} lr {run.base_lr * rates[name] / args.learning_rate:g}"
                                             if name in rates else f"{encoder} frozen"
                                             for name, encoder in zip(ENCODERS, TEXT_ENCODERS)),
        "  validation loss   : " + (f"{len(run.validation.draws)} fixed draws every {args.validation_interval} "
                                     f"steps, the lowest's embedding kept as <name>_best" if run.validation else
                                     "off (--validation_interval 0)"),
        f"  outputs           : {args.save_path}",
        f"  compile cache     : {compile_cache_status(args, run.compile_cache)}",
        "",
    ]
    print("\n".join(lines))


def compile_cache_status(args, compile_cache):
    """The summary's line on the compile cache: where, and whether this run's graphs are loaded or compiled."""
    if compile_cache is not None:
        return compile_cache.describe()
    if args.compile_cache == "off":
        return "off (--compile_cache off)"
    if args.ms_mode == 1 or args.is_parallel:
        return "off (used in graph mode by single-process runs only)"
    return "off for this run: another run is using its folder"


def print_outputs(args, run, step, timing):
    skipped = int(run.train_step.update.skipped_steps.asnumpy())
    print(f"\nDone: step {step}{f', {skipped} steps skipped (non-finite gradients)' if skipped else ''}.")
    if timing["compile"]:
        speed = f", then {np.mean(timing['steps']):.2f} s/step" if timing["steps"] else ""
        seconds = " + ".join(f"{s:.1f}" for s in timing["compile"])
        source = "loaded from the compile cache" if all(timing["loaded"]) else "compiled"
        if len(timing["compile"]) == 1:
            compiled = f"graph {source} in {seconds} s (first step)"
        else:
            compiled = f"{len(timing['compile'])} graphs {source} in {seconds} s (first step at each bucket's size)"
        print(f"  time                  : {compiled}{speed}")
    if timing["validation"]:
        evaluations = len(timing["validation"])
        grids = run.validation_pipeline
        shared_unet = grids is not None and getattr(run.validation.net, "denoiser", None) is grids.denoiser
        shared = ", the UNet's shared with the sample grids" if shared_unet else ""
        print(f"  validation loss       : {evaluations} evaluation{'s' if evaluations > 1 else ''} of "
              f"{len(run.validation.draws)} draws in {sum(timing['validation']):.1f} s (the first, with its graphs' "
              f"compile{shared}: {timing['validation'][0]:.1f} s); {run.log.val_losses[0]:.5f} at step "
              f"{run.log.val_steps[0]} -> {run.log.val_losses[-1]:.5f} at step {run.log.val_steps[-1]}")
    health = np.array(vector_health(run.rows(), run.initial_rows)).reshape(len(TEXT_ENCODERS), 2, -1)
    for name, embedder, rows, (norms, cosines) in zip(TEXT_ENCODERS, run.model.conditioner.text_embedders(),
                                                      run.rows(), health):
        words = nearest_words(embedder, rows)
        print(f"  {'vectors ' + name:<22}: " + "; ".join(
            f"{token}: norm {norm:.3g}, cosine to its start {cosine:.3f}, near {', '.join(near)}"
            for token, norm, cosine, near in zip(run.tokens, norms, cosines, words)))
    several = len(run.concepts) > 1
    for concept in run.concepts:
        ckpt, safetensors_path = embedding_paths(args.save_path, concept.token, None, several)
        print(f"  embedding of {concept.token} (MindSpore): {ckpt}")
        print(f"  embedding of {concept.token} (SDXL community format, for kohya/A1111/ComfyUI): {safetensors_path}")
    validation = run.validation
    if validation is not None and validation.best_step is not None:
        best = [path for concept in run.concepts for path in embedding_paths(args.save_path, concept.token, "best",
                                                                             several)]
        print(f"  best validation loss  : {validation.best_loss:.5f} at step {validation.best_step}, its embeddings: "
              f"{', '.join(best)}")
    print(f"  loss log and curve    : {os.path.join(args.save_path, 'loss.csv')}, loss.png")
    print(f"  training state        : {os.path.join(args.save_path, STATE_DIR)} (continue with --resume latest)")
    if args.infer_during_train:
        print(f"  samples               : {os.path.join(args.save_path, 'samples')}/")
    weight = f" --weight {args.weight}" if args.weight else ""
    size = f" --H {args.resolution} --W {args.resolution}" if args.resolution != 1024 else ""  # the command's default
    embeddings = "".join(f" --textual_inversion_weight {embedding_paths(args.save_path, concept.token, None, several)[0]}"
                         for concept in run.concepts)
    print(f"Sample with: python demo/sampling_without_streamlit.py --config {args.config}{weight}{size}{embeddings} "
          f'--prompt "{validation_prompts(args)[0]}"')


# what a user can get wrong (arguments, images, weight files, a run folder in use): one `error:` line, exit 2
USER_ERRORS = (UsageError, DataError, TemplateError, PlaceholderError, WeightFileError, WeightMismatchError,
               ResumeError, RunFolderInUse, CompileCacheError)


def cli(argv=None):
    """The command: parse `argv` (default: sys.argv), train, and return the exit code. A user's error is one
    `error:` line and exit 2; a run stopped by a failed save or non-finite rows, one line and exit 1."""
    args = parse_args(argv)
    try:
        return main(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nInterrupted; nothing saved since the last checkpoint.", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(cli())
