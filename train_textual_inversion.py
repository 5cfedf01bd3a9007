"""Teach Stable Diffusion XL a new word: textual inversion on MindSpore.

    python train_textual_inversion.py --data_path datasets/cat_toy --placeholder_token "<cat-toy>" \
        --initializer_token toy --num_vectors 10 --total_step 3000 --gradient_accumulation_steps 4

Every model weight stays frozen. The placeholder (and <tok>_1 ... <tok>_{n-1} for n vectors) is added to both
SDXL tokenizers, and its rows in both CLIP text encoders are the only trainable parameters. The run writes the
learned embedding (our .ckpt and the community .safetensors), a loss log and picture, sample grids and a
training state to resume from, all under --save_path.

The flow, top to bottom: arguments -> model -> placeholder tokens -> data and cached latents -> the compiled
train step -> the loop (draw, step, log, sample, save).
"""
import argparse
import hashlib
import os
import shutil
import signal
import sys
import time

import numpy as np
from omegaconf import OmegaConf
from tqdm import tqdm

import mindspore as ms
from mindspore import Tensor

from gm.data.dataset import DataError, EpochSampler, TextualInversionDataset
from gm.data.templates import TemplateError, load_templates
from gm.models.loading import create_model, load_config
from gm.textual_inversion.checkpointing import (
    STATE_DIR, ResumeError, embedding_name, find_train_state, load_train_state, save_learned_embeddings,
    save_train_state,
)
from gm.textual_inversion.latent_cache import TrainingLatents
from gm.textual_inversion.loss_log import LossLog
from gm.textual_inversion.optim import SCHEDULES, AdamW, learning_rate
from gm.textual_inversion.placeholder import (
    PlaceholderError, add_placeholder_tokens, expand_placeholders, initial_rows, placeholder_tokens,
)
from gm.textual_inversion.train_step import TextualInversionLoss, TextualInversionTrainStep
from gm.weights.loader import WeightFileError, weight_format
from gm.weights.state_dict import WeightMismatchError

DEFAULT_CONFIG = "configs/training/sd_xl_base_finetune_textual_inversion.yaml"
DEFAULT_WEIGHT = "checkpoints/sd_xl_base_1.0_ms.ckpt"
VALIDATION_PROMPTS = {"object": "a photo of {}", "style": "a painting in the style of {}", "face": "a photo of {}"}


class UsageError(ValueError):
    """A bad command-line argument; the message names the flag."""


def str2bool(value):
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and outputs")
    g.add_argument("--data_path", required=True, help="folder of 3-20 images (jpg, png, webp, bmp) of the concept")
    g.add_argument("--save_path", default=None, help="where outputs go (default: runs/<placeholder name>)")
    g.add_argument("--learnable_property", choices=["object", "style", "face"], default="object",
                   help="what the word stands for; picks the prompt templates (default: %(default)s)")
    g.add_argument("--template_file", default=None,
                   help="a text file of prompt templates, one per line, each with {} for the placeholder")
    g.add_argument("--resolution", type=int, default=None,
                   help="training image size (default: the config's, 1024 for SDXL base)")
    g.add_argument("--flip_p", type=float, default=0.5, help="probability of a horizontal flip (default: 0.5)")
    g.add_argument("--cache_latents", type=str2bool, default=True,
                   help="encode each image once before training and release the VAE encoder (default: True)")
    g.add_argument("--overwrite", action="store_true", help="start afresh in a --save_path holding another run")

    g = p.add_argument_group("model")
    g.add_argument("--config", default=DEFAULT_CONFIG, help="model config (default: %(default)s)")
    g.add_argument("--weight", default=None,
                   help=f"SDXL weights: our .ckpt, the original .safetensors or a diffusers folder (default for "
                        f"the SDXL config: {DEFAULT_WEIGHT}; a small config without weights starts from random ones)")
    g.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="compute precision of the frozen model; learned rows and optimizer stay fp32")
    g.add_argument("--recompute", type=str2bool, default=False,
                   help="recompute UNet and text-encoder blocks in the backward pass to save memory")

    g = p.add_argument_group("the new word")
    g.add_argument("--placeholder_token", required=True, help='the new word, e.g. "<cat-toy>"')
    g.add_argument("--initializer_token", default=None,
                   help="a word whose embedding starts every vector (default: small random vectors)")
    g.add_argument("--num_vectors", type=int, default=1, help="vectors per encoder for the word (default: 1)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--total_step", type=int, default=3000, help="optimizer steps (default: %(default)s)")
    g.add_argument("--train_batch_size", type=int, default=1, help="images per micro-batch per device")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="micro-batches averaged per optimizer step (default: 1)")
    g.add_argument("--learning_rate", type=float, default=5e-4, help="AdamW learning rate (default: %(default)s)")
    g.add_argument("--scale_lr", type=str2bool, default=False,
                   help="multiply the learning rate by the effective batch size (as diffusers does)")
    g.add_argument("--lr_scheduler", choices=SCHEDULES, default="constant", help="(default: %(default)s)")
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="linear warm-up steps (default: 0)")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay (default: 1e-2)")
    g.add_argument("--max_grad_norm", type=float, default=1.0,
                   help="clip the gradient's global norm to this; 0 turns clipping off (default: 1.0)")
    g.add_argument("--seed", type=int, default=42, help="seed of initialisation, data order and noise")

    g = p.add_argument_group("checkpoints, samples, resume")
    g.add_argument("--save_interval", type=int, default=500, help="save embeddings and state every N steps")
    g.add_argument("--max_num_ckpt", type=int, default=None, help="keep at most N step-numbered embeddings")
    g.add_argument("--resume", default=None, help='"latest" (in --save_path) or a train_state/step_<n> folder')
    g.add_argument("--infer_during_train", type=str2bool, default=False,
                   help="sample the validation prompt every --infer_interval steps and at the end")
    g.add_argument("--infer_interval", type=int, default=500, help="steps between validation samples")
    g.add_argument("--validation_prompt", default=None,
                   help='prompt for validation samples (default by property, e.g. "a photo of <tok>")')
    g.add_argument("--num_validation_images", type=int, default=4, help="images per validation grid")
    g.add_argument("--validation_sample_step", type=int, default=25, help="sampler steps for validation")

    g = p.add_argument_group("device")
    g.add_argument("--device_target", choices=["Ascend", "GPU", "CPU"], default="Ascend")
    g.add_argument("--ms_mode", type=int, choices=[0, 1], default=0, help="0: graph mode (default), 1: PyNative")
    g.add_argument("--is_parallel", type=str2bool, default=False,
                   help="data parallel across the workers started by msrun")
    return p.parse_args(argv)


def check_args(args, config):
    """Reject bad arguments before anything is built or written."""
    for flag in ("num_vectors", "total_step", "gradient_accumulation_steps", "train_batch_size",
                 "save_interval", "infer_interval", "num_validation_images", "validation_sample_step"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.max_num_ckpt is not None and args.max_num_ckpt < 1:
        raise UsageError(f"--max_num_ckpt must be at least 1, got {args.max_num_ckpt}")
    if not 0.0 <= args.flip_p <= 1.0:
        raise UsageError(f"--flip_p must be between 0 and 1, got {args.flip_p}")
    if args.learning_rate <= 0:
        raise UsageError(f"--learning_rate must be positive, got {args.learning_rate}")
    # The UNet halves the latent twice (three levels) and the VAE divides by 8: sides must be multiples of 32.
    if args.resolution < 64 or args.resolution % 32:
        raise UsageError(f"--resolution {args.resolution}: SDXL takes multiples of 32 from 64 up (e.g. 1024).")
    if not os.path.isdir(args.data_path):
        raise UsageError(f"--data_path {args.data_path}: no such folder.")
    if args.template_file:
        load_templates(args.template_file)
    if not args.placeholder_token.strip() or " " in args.placeholder_token:
        raise UsageError(f"--placeholder_token {args.placeholder_token!r}: must be one word without spaces.")
    run_files = [n for n in (STATE_DIR, "loss.csv", "args.yaml") if os.path.exists(os.path.join(args.save_path, n))]
    if run_files and not (args.resume or args.overwrite):
        raise UsageError(f"--save_path {args.save_path} holds another run's files ({', '.join(run_files)}): "
                         "pass --resume latest to continue it, --overwrite to start afresh, or another --save_path.")
    if args.precision == "bf16" and args.device_target == "CPU":
        raise UsageError("--precision bf16 needs Ascend (MindSpore has no CPU kernels for it); use fp32 on CPU.")
    if args.weight:
        weight_format(args.weight)  # a missing or unreadable file is reported now, not after minutes of setup


def resolve_defaults(args, config):
    """Fill defaults that depend on the config or on other flags."""
    if args.resolution is None:
        args.resolution = int(OmegaConf.select(config, "training.resolution", default=1024))
    if args.save_path is None:
        args.save_path = os.path.join("runs", embedding_name(args.placeholder_token))
    if args.weight is None and config.model.params.get("requires_weights", True):
        args.weight = DEFAULT_WEIGHT
    if args.validation_prompt is None:
        args.validation_prompt = VALIDATION_PROMPTS[args.learnable_property].format(args.placeholder_token)


def setup_device(args):
    """MindSpore context; (rank, world size) of this process."""
    ms.set_context(mode=ms.GRAPH_MODE if args.ms_mode == 0 else ms.PYNATIVE_MODE)
    ms.set_device(args.device_target)
    if not args.is_parallel:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init

    init()
    return get_rank(), get_group_size()


def main(args):
    config = load_config(args.config)
    resolve_defaults(args, config)
    check_args(args, config)
    rank, world_size = setup_device(args)
    is_main = rank == 0
    ms.set_seed(args.seed)

    # ---- data: images and their prompts, where the placeholder stands for all its vectors
    placeholder = {args.placeholder_token: args.num_vectors}
    templates = load_templates(args.template_file) if args.template_file else None
    dataset = TextualInversionDataset(
        args.data_path, args.placeholder_token, args.resolution, args.learnable_property, templates,
        placeholder_text=expand_placeholders(args.placeholder_token, placeholder), flip_p=args.flip_p, seed=args.seed)

    # ---- the frozen model, with the placeholder tokens added to both text encoders
    model = create_model(config, args.weight, precision=args.precision, recompute=args.recompute)
    init_rng = np.random.RandomState(args.seed)
    rows = [initial_rows(embedder, args.initializer_token, args.num_vectors, init_rng)
            for embedder in model.conditioner.text_embedders()]
    add_placeholder_tokens(model.conditioner, args.placeholder_token, *rows)
    tokens = placeholder_tokens(args.placeholder_token, args.num_vectors)
    learned = model.conditioner.learned_embeddings()

    # ---- latents of the training images, encoded once
    variants = (False, True) if args.flip_p > 0 else (False,)
    latents = TrainingLatents(model.first_stage_model, dataset, variants, cache=args.cache_latents)
    if args.cache_latents:
        del model.first_stage_model.encoder  # its memory is not needed any more
    sampler = EpochSampler(len(dataset), args.train_batch_size, args.seed, rank, world_size)

    # ---- the compiled train step over the learned rows only
    effective_batch = args.train_batch_size * args.gradient_accumulation_steps * world_size
    base_lr = args.learning_rate * (effective_batch if args.scale_lr else 1)
    optimizer = AdamW(learned, weight_decay=args.adam_weight_decay)
    train_step = TextualInversionTrainStep(
        TextualInversionLoss(model), learned, optimizer, args.gradient_accumulation_steps, args.max_grad_norm,
        dynamic_loss_scale=args.precision == "fp16", world_size=world_size)
    state_params = learned + train_step.state_parameters()

    # ---- resume
    identity = {"placeholder_token": args.placeholder_token, "num_vectors": args.num_vectors,
                "model": hashlib.sha256(OmegaConf.to_yaml(config.model).encode()).hexdigest()[:16],
                "weight": os.path.abspath(args.weight) if args.weight else None,
                "resolution": args.resolution, "world_size": world_size}
    start_step = 0
    if args.resume:
        host = load_train_state(find_train_state(args.save_path, args.resume), state_params, identity)
        start_step = host["step"]
        sampler.load_state_dict(host["sampler"])
    elif args.overwrite and is_main:
        for name in (STATE_DIR, "samples"):
            shutil.rmtree(os.path.join(args.save_path, name), ignore_errors=True)

    if is_main:
        os.makedirs(args.save_path, exist_ok=True)
        OmegaConf.save(OmegaConf.create({"args": vars(args), "config": config}), os.path.join(args.save_path, "args.yaml"))
        log = LossLog(args.save_path, start_step)
        print_summary(args, dataset, tokens, learned, effective_batch, world_size, start_step)

    def save(step, final=False):
        """Write the embeddings and the training state (the noise RNG is a function of seed and step)."""
        if not is_main:
            return
        rows_l, rows_g = (p.asnumpy() for p in learned)
        save_learned_embeddings(args.save_path, args.placeholder_token, rows_l, rows_g, step, args.max_num_ckpt)
        if final:
            save_learned_embeddings(args.save_path, args.placeholder_token, rows_l, rows_g)
        save_train_state(args.save_path, step, state_params, {"identity": identity, "sampler": sampler.state_dict()})
        log.plot()

    # Ctrl-C (or SIGTERM) finishes the current step, saves, and exits cleanly.
    stop = {"requested": False}

    def request_stop(signum, frame):
        stop["requested"] = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    # ---- the loop
    step = start_step
    progress = tqdm(range(start_step, args.total_step), initial=start_step, total=args.total_step,
                    desc="Training", disable=not is_main)
    for step in progress:
        started = time.time()
        lr = learning_rate(args.lr_scheduler, base_lr, step, args.total_step, args.lr_warmup_steps)
        losses = []
        for micro in range(args.gradient_accumulation_steps):
            # noise drawn from (seed, rank, step, micro-batch): reproducible on resume, different per rank
            noise_rng = np.random.RandomState([args.seed, rank, step, micro])
            inputs = draw_micro_batch(model, dataset, latents, sampler, noise_rng)
            apply = micro == args.gradient_accumulation_steps - 1
            loss = train_step(Tensor(lr, ms.float32), Tensor(apply), *inputs)
            losses.append(float(loss.asnumpy()))
        step += 1
        seconds = time.time() - started
        if is_main:
            log.append(step, float(np.mean(losses)), lr, seconds)
            progress.set_postfix(loss=f"{np.mean(losses):.4f}", lr=f"{lr:.2e}", s_per_step=f"{seconds:.2f}")
        if args.infer_during_train and is_main and (step % args.infer_interval == 0 or step == args.total_step):
            sample_validation_grid(model, args, step)
        if stop["requested"]:
            save(step)
            print(f"\nInterrupted: saved step {step}. Continue with --resume latest.")
            return 130
        if step % args.save_interval == 0 and step != args.total_step:
            save(step)
    progress.close()
    save(step, final=True)
    if is_main:
        skipped = int(train_step.skipped_steps.asnumpy())
        print_outputs(args, step, skipped)
    return 0


def draw_micro_batch(model, dataset, latents, sampler, rng):
    """Host side of one micro-batch: which images, prompts, flips; posterior, diffusion noise and noise levels."""
    draws = sampler.next_batch()
    choices = [dataset.draw(index, epoch) for index, epoch in draws]
    batch = latents.batch([(index, flipped) for (index, _), (_, flipped, _) in zip(draws, choices)])
    batch["txt"] = [prompt for _, _, prompt in choices]
    moments = batch.pop("moments")
    latent_shape = (moments.shape[0], moments.shape[1] // 2) + moments.shape[2:]
    latent_noise = Tensor(rng.standard_normal(latent_shape), ms.float32)
    noise, sigma_rand = model.loss_fn.draw_inputs(latent_shape, rng)
    return (Tensor(moments, ms.float32), latent_noise, noise, sigma_rand) + model.conditioner.tokenize(batch)


def sample_validation_grid(model, args, step):
    from gm.sampling import save_grid, sample_images

    images = sample_images(model, [args.validation_prompt] * args.num_validation_images,
                           sample_step=args.validation_sample_step, H=args.resolution, W=args.resolution,
                           seed=args.seed, placeholders={args.placeholder_token: args.num_vectors})
    save_grid(images, os.path.join(args.save_path, "samples", f"step_{step}.png"))


def print_summary(args, dataset, tokens, learned, effective_batch, world_size, start_step):
    lines = [
        "",
        f"Textual inversion of {args.placeholder_token!r} ({args.learnable_property}) on {args.config}",
        f"  images found      : {len(dataset)} in {args.data_path}",
        f"  tokens added      : {len(tokens)} to each text encoder ({', '.join(tokens[:4])}{' ...' if len(tokens) > 4 else ''})",
        f"  trainable params  : {sum(p.size for p in learned):,} ({' + '.join(str(tuple(p.shape)) for p in learned)})",
        f"  effective batch   : {effective_batch} = {args.train_batch_size} per device x "
        f"{args.gradient_accumulation_steps} accumulation x {world_size} device(s)",
        f"  steps             : {start_step} -> {args.total_step} at {args.resolution}px, lr {args.learning_rate} "
        f"({args.lr_scheduler}), {args.precision}",
        f"  outputs           : {args.save_path}",
        "",
    ]
    print("\n".join(lines))


def print_outputs(args, step, skipped):
    ckpt = os.path.join(args.save_path, "SD-XL-base-1.0_ti.ckpt")
    st = os.path.join(args.save_path, f"{embedding_name(args.placeholder_token)}.safetensors")
    print(f"\nDone: {step} steps{f', {skipped} skipped (non-finite gradients)' if skipped else ''}.")
    print(f"  embedding (MindSpore) : {ckpt}")
    print(f"  embedding (SDXL community format, for kohya/A1111/ComfyUI): {st}")
    print(f"  loss log and curve    : {os.path.join(args.save_path, 'loss.csv')}, loss.png")
    if args.infer_during_train:
        print(f"  samples               : {os.path.join(args.save_path, 'samples')}/")
    print(f'Sample with: python demo/sampling_without_streamlit.py --config configs/inference/... '
          f'--textual_inversion_weight {ckpt} --prompt "{args.validation_prompt}"')


if __name__ == "__main__":
    arguments = parse_args()
    try:
        sys.exit(main(arguments))
    except (UsageError, DataError, TemplateError, PlaceholderError, WeightFileError, WeightMismatchError,
            ResumeError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
