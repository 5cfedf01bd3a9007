"""One textual-inversion training step: ours (MindSpore graph mode) against the PyTorch reference, same weights.

    python benchmarks/bench_ti_step.py --config small --resolution 512 [--recompute] [--steps 5]

Ours is the trainer's step: `TextualInversionTrainStep` over the learned rows only, compiled as one graph, with the
training image's VAE latents cached before training by the trainer's `TrainingLatents` (on the CPU in a child
process, as the trainer does; the encoder then released). The reference is the training
step of diffusers' examples/textual_inversion/textual_inversion_sdxl.py (both encoders' tokens trained), rewritten
here: the VAE encodes the image every step, AdamW holds both full token tables, the original rows are copied back
after each step, and `--recompute` turns on its gradient checkpointing (UNet and text encoders, as the diffusers
scripts' `--gradient_checkpointing`).
Both run fp32 at the same resolution, batch and thread count, each in its own process (so each peak memory is its
own). Printed: median seconds per step after warm-up, graph compile time, peak resident memory, model FLOP
utilisation (UNet and text encoders forward + backward, counted from the shapes, against the fp32 matmul peak
measured in the same run) and where one step's time goes: the reference is timed inside its step (the UNet's
backward ends when the gradients reach the text encoders' outputs); ours is one fused graph, so its parts are
compiled and timed apart in one more process, and what the fused step costs beyond them is shown as the rest.
The last line holds the ratios ours / reference.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    CONFIGS, config_path, emit, log, median_time, memory_gb, mindspore_matmul_peak, ratio, reference_architecture,
    reference_weights, run_side, set_mindspore_threads, set_torch_threads, torch_matmul_peak,
)

PLACEHOLDER, INITIALIZER = "<bench-token>", "toy"
PROMPT = "a photo of a {}"
LEARNING_RATE, WEIGHT_DECAY = 5e-4, 1e-2
PHASES = ("vae_encode", "text_fwd", "unet_fwd", "unet_bwd", "text_bwd", "optimizer", "other")
PHASE_NAMES = {"vae_encode": "VAE encode", "text_fwd": "text encoders forward", "unet_fwd": "UNet forward + loss",
               "unet_bwd": "UNet backward", "text_bwd": "text encoders backward",
               "optimizer": "optimizer (+ copy-back)", "other": "rest (ours: step minus its parts)"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: 64 tiny, else 512)")
    p.add_argument("--recompute", action="store_true",
                   help="ours: recompute UNet and text-encoder blocks; reference: gradient checkpointing (UNet, text encoders)")
    p.add_argument("--blockwise_unet", action="store_true",
                   help="ours: the UNet layer by layer from the host (the trainer's --blockwise_unet True)")
    p.add_argument("--steps", type=int, default=None, help="timed steps after the warm-up (default: 5; full: 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after compilation (default: 1; full: 0)")
    p.add_argument("--batch", type=int, default=1, help="images per step (default: 1, the scripts' default)")
    p.add_argument("--num_vectors", type=int, default=1, help="vectors of the learned word (default: 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of both sides (default: all)")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                   help="skip the per-module breakdown (for ours it compiles each part in one more process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default=None, help="diffusers folder of the weights (default: written once to a cache)")
    p.add_argument("--compile_cache", default="off",
                   help="ours: the trainer's compile cache in this folder (default: off); a second run with the "
                        "same arguments loads the step's graph instead of compiling it")
    p.add_argument("--side", choices=["ours", "ours-parts", "reference"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    full = args.config == "full"
    if args.resolution is None:
        args.resolution = 64 if args.config == "tiny" else 512
    if args.steps is None:
        args.steps = 1 if full else 5
    if args.warmup is None:
        args.warmup = 0 if full else 1
    if args.resolution % 64 and args.config != "tiny" or args.resolution % 32:
        p.error(f"--resolution {args.resolution}: use a multiple of 64")
    return args


def training_pixels(args):
    """The batch's training images, uint8 [B, R, R, 3] (random pixels: the values do not change the cost)."""
    rng = np.random.RandomState(args.seed)
    return rng.randint(0, 256, (args.batch, args.resolution, args.resolution, 3)).astype(np.uint8)


def training_image(args):
    """The training images as the models take them, [B, 3, R, R] in [-1, 1]."""
    return training_pixels(args).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1


def size_conditioning(args):
    r = args.resolution
    return {"original_size_as_tuple": np.array([[r, r]] * args.batch, np.float32),
            "crop_coords_top_left": np.zeros((args.batch, 2), np.float32),
            "target_size_as_tuple": np.array([[r, r]] * args.batch, np.float32)}


# ------------------------------------------------------------------------------------------------------ ours


def build_ours(args):
    """The trainer's set-up on our side: model, placeholder tokens, cached latents, the compiled-to-be train step.

    Returns (model, learned rows, train step, inputs() -> a fresh micro-batch, facts about the set-up)."""
    from PIL import Image

    from gm.data.dataset import TextualInversionDataset
    from gm.device import resolve_device
    from gm.models.loading import create_model, load_config
    from gm.textual_inversion.latent_cache import TrainingLatents
    from gm.textual_inversion.optim import AdamW
    from gm.textual_inversion.placeholder import add_trainable_placeholder, expand_placeholders
    from gm.textual_inversion.train_step import (
        BlockwiseTrainStep, TextualInversionLoss, TextualInversionTrainStep, loss_inputs,
    )

    model = create_model(load_config(config_path(args.config, training=True)), args.weights,
                         precision=resolve_device()[1], recompute=args.recompute)
    facts = {"model_rss_gb": memory_gb("VmRSS")}
    log("ours: model loaded")
    learned = add_trainable_placeholder(model.conditioner, PLACEHOLDER, args.num_vectors, INITIALIZER,
                                        np.random.RandomState(args.seed))

    # latent caching, the trainer's: each image encoded once (on the CPU by a child process), the encoder released
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for i, pixels in enumerate(training_pixels(args)):
            Image.fromarray(pixels).save(os.path.join(folder, f"{i:03d}.png"))
        latents = TrainingLatents(model.first_stage_model, TextualInversionDataset(folder, PLACEHOLDER, args.resolution),
                                  progress=False)
    moments = latents.batch([(i, False) for i in range(args.batch)])["moments"]
    facts["latent_cache_seconds"] = time.perf_counter() - start
    log(f"ours: latents cached in {facts['latent_cache_seconds']:.1f} s")

    optimizer = AdamW(learned, weight_decay=WEIGHT_DECAY)
    step_class = BlockwiseTrainStep if args.blockwise_unet else TextualInversionTrainStep
    train_step = step_class(TextualInversionLoss(model), learned, optimizer, max_grad_norm=1.0)
    batch = dict(size_conditioning(args), txt=[expand_placeholders(PROMPT.format(PLACEHOLDER),
                                                                    {PLACEHOLDER: args.num_vectors})] * args.batch)
    cond = model.conditioner.tokenize(batch)
    draws = iter(range(10 ** 6))

    def inputs():
        """A micro-batch as the trainer draws it: fresh posterior and diffusion noise and a noise level."""
        return loss_inputs(model, moments, cond, np.random.RandomState([args.seed, next(draws)]))

    return model, learned, train_step, inputs, facts


def run_ours(args):
    set_mindspore_threads(args.threads)
    import mindspore as ms
    from mindspore import Tensor

    from gm.textual_inversion.train_step import compile_ahead

    peak_gflops = mindspore_matmul_peak()
    cache = open_compile_cache(args)
    _, _, train_step, inputs, facts = build_ours(args)
    lr, apply = Tensor(LEARNING_RATE, ms.float32), Tensor(True)

    def step():
        loss = float(train_step(lr, apply, *inputs()).asnumpy())
        if not np.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss}")

    start = time.perf_counter()
    if args.blockwise_unet:  # its graphs compile at their first calls: the compile time includes one step
        step()
    else:
        compile_ahead(train_step, lr, apply, *inputs())  # as the trainer does
    compile_seconds = time.perf_counter() - start
    log(f"ours: step {'loaded from the compile cache' if cache and cache.reused else 'compiled'} in "
        f"{compile_seconds:.1f} s")
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warmup_seconds = (time.perf_counter() - start) / max(1, args.warmup)
    log(f"ours: warm-up step {warmup_seconds:.2f} s")
    seconds, times = median_time(step, args.steps)
    log(f"ours: {args.steps} steps, median {seconds:.3f} s")
    if cache is not None:
        cache.mark_complete()
    emit(dict(facts, side="ours", seconds=seconds, times=times, compile_seconds=compile_seconds,
              compile_cached=bool(cache and cache.reused),
              first_step_seconds=warmup_seconds, peak_gb=memory_gb("VmHWM"), peak_gflops=peak_gflops,
              threads=args.threads))


def open_compile_cache(args):
    """The trainer's compile cache for our side (None: --compile_cache off), keyed by every argument that decides
    its graphs and the weights."""
    from gm.compile_cache import CompileCache, fingerprint
    from gm.modules.layers import default_conv_impl

    if args.compile_cache == "off":
        return None
    facts = {"args": {k: v for k, v in vars(args).items() if k not in ("steps", "warmup")},
             "weights": fingerprint(args.weights), "convolution": default_conv_impl()}
    return CompileCache.open(args.compile_cache, "bench_ti_step", facts)


def wait(outputs):
    """Block until a graph's outputs (a Tensor or nested tuples of them) are computed, by reading them."""
    if isinstance(outputs, (tuple, list)):
        for output in outputs:
            wait(output)
    else:
        outputs.asnumpy()


def run_ours_parts(args):
    """Our step's parts, each compiled as a graph of its own and timed like the step: the text encoders forward,
    the UNet loss from given conditioning, that loss with its gradient for the conditioning, the text encoders'
    forward and backward from given gradients, and the optimizer update."""
    set_mindspore_threads(args.threads)
    import mindspore as ms
    from mindspore import Tensor, nn

    from gm.textual_inversion.train_step import TextualInversionLoss

    model, learned, train_step, inputs, _ = build_ours(args)

    class UNetLoss(nn.Cell):
        """`TextualInversionLoss` after its conditioner: the loss given (context, vector)."""

        def __init__(self):
            super().__init__(auto_prefix=False)
            self.loss = TextualInversionLoss(model)

        def construct(self, *args):
            return self.loss.per_sample_given_conditioning(*args).mean()

    class Projection(nn.Cell):
        """<conditioning, given gradients>: its gradient for the learned rows is the text encoders' backward."""

        def __init__(self):
            super().__init__(auto_prefix=False)
            self.conditioner = model.conditioner

        def construct(self, grad_context, grad_vector, *cond):
            context, vector = self.conditioner(*cond)
            return (context * grad_context).sum() + (vector * grad_vector).sum()

    class Gradient(nn.Cell):
        """The gradient of `cell` for its inputs at `grad_position`, or for `weights`, as a graph of its own."""

        def __init__(self, cell, grad_position=None, weights=None):
            super().__init__(auto_prefix=False)
            self.cell = cell
            self.grad = ms.grad(cell, grad_position, weights)

        def construct(self, *args):
            return self.grad(*args)

    class OptimizerStep(nn.Cell):
        def __init__(self):
            super().__init__()
            self.optimizer = train_step.update.optimizer

        def construct(self, lr, *grads):
            return self.optimizer(grads, lr)

    def timed(name, cell, make_args):
        cell.compile(*make_args())

        def run():
            wait(cell(*make_args()))

        run()
        seconds, _ = median_time(run, args.steps)
        log(f"ours parts: {name} {seconds:.3f} s")
        return seconds

    unet_gradient = Gradient(UNetLoss(), grad_position=(4, 5))
    sample = inputs()
    context, vector = model.conditioner(*sample[4:])
    grads = unet_gradient(*sample[:4], context, vector)
    text_forward = timed("text encoders forward", model.conditioner, lambda: inputs()[4:])
    unet_forward = timed("UNet loss", UNetLoss(), lambda: inputs()[:4] + (context, vector))
    unet_grad = timed("UNet loss and gradient", unet_gradient, lambda: inputs()[:4] + (context, vector))
    text_grad = timed("text encoders forward and backward", Gradient(Projection(), weights=learned),
                      lambda: tuple(grads) + inputs()[4:])
    update = timed("optimizer", OptimizerStep(),
                   lambda: (Tensor(LEARNING_RATE, ms.float32),) + tuple(Tensor(np.ones(p.shape, np.float32) * 1e-3)
                                                                      for p in learned))
    emit({"side": "ours-parts", "text_fwd": text_forward, "unet_fwd": unet_forward,
          "unet_bwd": unet_grad - unet_forward, "text_bwd": text_grad - text_forward, "optimizer": update,
          "unet_grad": unet_grad, "text_grad": text_grad})


# ------------------------------------------------------------------------------------------------ reference


def text_model(encoder):
    """The CLIP text transformer inside a transformers text model (v5 flattens CLIPTextModel's)."""
    return getattr(encoder, "text_model", encoder)


def run_reference(args):
    set_torch_threads(args.threads)
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    peak_gflops = torch_matmul_peak()
    folder = args.weights
    tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    # fp32, as our side computes: transformers would otherwise keep the stored dtype (the full config's fp16 files)
    encoders = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch.float32),
                CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", dtype=torch.float32)]
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32)
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    rss_model = memory_gb("VmRSS")
    log("reference: model loaded")

    # the script's setup: placeholder tokens in both tokenizers, initialised from the initializer word
    tokens = [PLACEHOLDER] + [f"{PLACEHOLDER}_{i}" for i in range(1, args.num_vectors)]
    placeholder_ids = []
    for tokenizer, encoder in zip(tokenizers, encoders):
        tokenizer.add_tokens(tokens)
        init_id = tokenizer.encode(INITIALIZER, add_special_tokens=False)[0]
        ids = tokenizer.convert_tokens_to_ids(tokens)
        encoder.resize_token_embeddings(len(tokenizer))
        with torch.no_grad():
            table = encoder.get_input_embeddings().weight
            for i in ids:
                table[i] = table[init_id].clone()
        placeholder_ids.append(ids)
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    if args.recompute:  # as diffusers' textual inversion scripts' --gradient_checkpointing
        unet.enable_gradient_checkpointing()
        unet.train()
    for encoder in encoders:  # everything of the text encoders but the token table (and bigG's projection)
        text_model(encoder).encoder.requires_grad_(False)
        text_model(encoder).final_layer_norm.requires_grad_(False)
        text_model(encoder).embeddings.position_embedding.requires_grad_(False)
        if args.recompute:
            encoder.gradient_checkpointing_enable()
        encoder.train()
    tables = [encoder.get_input_embeddings().weight for encoder in encoders]
    optimizer = torch.optim.AdamW(tables, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    originals = [table.data.clone() for table in tables]
    keep = []
    for tokenizer, ids in zip(tokenizers, placeholder_ids):
        mask = torch.ones(len(tokenizer), dtype=torch.bool)
        mask[min(ids): max(ids) + 1] = False
        keep.append(mask)

    text = PROMPT.format(" ".join(tokens))
    input_ids = [tokenizer([text] * args.batch, padding="max_length", truncation=True,
                           max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
                 for tokenizer in tokenizers]
    pixel_values = torch.from_numpy(training_image(args))
    cond = size_conditioning(args)
    add_time_ids = torch.from_numpy(np.concatenate(
        [cond["original_size_as_tuple"], cond["crop_coords_top_left"], cond["target_size_as_tuple"]], 1))
    generator = torch.Generator().manual_seed(args.seed)
    clock = {}

    def mark(name, since):
        now = time.perf_counter()
        clock[name] = clock.get(name, 0.0) + now - since
        return now

    def step():
        t = time.perf_counter()
        latents = vae.encode(pixel_values).latent_dist.sample(generator).detach() * vae.config.scaling_factor
        t = mark("vae_encode", t)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch,), generator=generator)
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        t = mark("other", t)
        hidden_1 = encoders[0](input_ids[0], output_hidden_states=True).hidden_states[-2]
        output_2 = encoders[1](input_ids[1], output_hidden_states=True)
        context = torch.cat([hidden_1, output_2.hidden_states[-2]], dim=-1)
        t = mark("text_fwd", t)
        model_pred = unet(noisy_latents, timesteps, context,
                          added_cond_kwargs={"text_embeds": output_2[0], "time_ids": add_time_ids}).sample
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        t = mark("unet_fwd", t)
        # the UNet's backward ends when the gradients reach its inputs from the text encoders
        arrived = []
        context.register_hook(lambda grad: arrived.append(time.perf_counter()))
        output_2[0].register_hook(lambda grad: arrived.append(time.perf_counter()))
        loss.backward()
        unet_done = max(arrived)
        clock["unet_bwd"] = clock.get("unet_bwd", 0.0) + unet_done - t
        t = mark("text_bwd", unet_done)
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # the script keeps every row but the new ones at its original value
            for table, original, mask in zip(tables, originals, keep):
                table[mask] = original[mask]
        mark("optimizer", t)
        loss = float(loss.detach())
        if not np.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss}")

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warmup_seconds = (time.perf_counter() - start) / max(1, args.warmup)
    log(f"reference: warm-up step {warmup_seconds:.2f} s")
    clock.clear()
    seconds, times = median_time(step, args.steps)
    log(f"reference: {args.steps} steps, median {seconds:.3f} s")
    breakdown = {phase: clock.get(phase, 0.0) / args.steps for phase in PHASES}
    emit({"side": "reference", "seconds": seconds, "times": times, "compile_seconds": 0.0,
          "first_step_seconds": warmup_seconds, "peak_gb": memory_gb("VmHWM"), "model_rss_gb": rss_model,
          "peak_gflops": peak_gflops, "threads": args.threads, "breakdown": breakdown})


# ---------------------------------------------------------------------------------------------------- FLOPs


def step_flops(args):
    """FLOPs of one step from the model shapes (torch's FlopCounterMode on meta tensors, no memory): forward and
    backward (gradients of activations only: the weights are frozen) of the UNet and of both text encoders,
    and the reference's VAE encode. Recomputation is not counted: model FLOPs, as MFU is defined."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.common import build_reference
    from gm.models.loading import load_config

    arch = reference_architecture(load_config(config_path(args.config)).model)
    b, r = args.batch, args.resolution

    def count(fn):
        counter = FlopCounterMode(display=False)
        with counter:
            out = fn()
        return counter.get_total_flops(), out

    with torch.device("meta"):
        unet = build_reference("unet", arch["unet"]).requires_grad_(False)
        vae = build_reference("vae", arch["vae"]).requires_grad_(False)
        encoders = [build_reference(c, arch[c]).requires_grad_(False) for c in ("text_encoder", "text_encoder_2")]
        for encoder in encoders:
            encoder.get_input_embeddings().requires_grad_(True)
        ids = torch.zeros(b, 77, dtype=torch.long)
        text_fwd, (h1, out2) = count(lambda: (encoders[0](ids, output_hidden_states=True).hidden_states[-2],
                                              encoders[1](ids, output_hidden_states=True)))
        context = torch.cat([h1, out2.hidden_states[-2]], -1)
        context_leaf = context.detach().requires_grad_(True)
        pooled_leaf = out2[0].detach().requires_grad_(True)
        latents = torch.zeros(b, 4, r // 8, r // 8)
        time_ids = torch.zeros(b, 6)
        unet_fwd, pred = count(lambda: unet(latents, torch.zeros(b), context_leaf,
                                            added_cond_kwargs={"text_embeds": pooled_leaf, "time_ids": time_ids}).sample)
        unet_bwd, _ = count(lambda: pred.pow(2).mean().backward())
        text_bwd, _ = count(lambda: torch.autograd.backward([context, out2[0]], [context_leaf.grad, pooled_leaf.grad]))
        vae_encode, _ = count(lambda: vae.encode(torch.zeros(b, 3, r, r)).latent_dist.mean)
    return {"unet_fwd": unet_fwd, "unet_bwd": unet_bwd, "text_fwd": text_fwd, "text_bwd": text_bwd,
            "vae_encode": vae_encode}


# ------------------------------------------------------------------------------------------------- the report


def report(args, ours, ref, flops):
    if ref is None:  # the reference could not run (out of memory): ours alone, and the table says so
        ref = {key: float("nan") for key in ("seconds", "first_step_seconds", "peak_gb", "model_rss_gb")}
        ref.update(times=[float("nan")], peak_gflops=ours["peak_gflops"])
        print("\nthe reference ran out of memory (killed): its column is nan")
    model_flops = flops["unet_fwd"] + flops["unet_bwd"] + flops["text_fwd"] + flops["text_bwd"]
    peak = max(ours["peak_gflops"], ref["peak_gflops"])

    def mfu(side):
        return model_flops / side["seconds"] / (peak * 1e9)

    rows = [
        ("s/step (median)", f"{ours['seconds']:.3f}", f"{ref['seconds']:.3f}"),
        ("  spread (min-max)", f"{min(ours['times']):.3f}-{max(ours['times']):.3f}",
         f"{min(ref['times']):.3f}-{max(ref['times']):.3f}"),
        ("graph load, compile cache (s)" if ours.get("compile_cached") else "graph compile (s)",
         f"{ours['compile_seconds']:.1f}", "-"),
        ("first step after compile (s)", f"{ours['first_step_seconds']:.3f}", f"{ref['first_step_seconds']:.3f}"),
        ("latent caching, once per image (s)", f"{ours['latent_cache_seconds']:.2f}", "- (encodes every step)"),
        ("peak resident memory (GB)", f"{ours['peak_gb']:.2f}", f"{ref['peak_gb']:.2f}"),
        ("  of which after model load (GB)", f"{ours['model_rss_gb']:.2f}", f"{ref['model_rss_gb']:.2f}"),
        ("matmul peak, own framework (GFLOP/s)", f"{ours['peak_gflops']:.0f}", f"{ref['peak_gflops']:.0f}"),
        ("model FLOP utilisation", f"{100 * mfu(ours):.1f}%", f"{100 * mfu(ref):.1f}%"),
    ]
    print(f"\nTextual-inversion step, config {args.config}, {args.resolution} px, batch {args.batch}, fp32, "
          f"{args.threads} threads, recompute {'on' if args.recompute else 'off'}"
          f"{', UNet layer by layer' if args.blockwise_unet else ''}; median of {args.steps} steps "
          f"after {args.warmup} warm-up")
    print(f"model FLOPs per step (UNet + text encoders, forward + backward): {model_flops / 1e9:.1f} GFLOP "
          f"(UNet fwd {flops['unet_fwd'] / 1e9:.1f}, bwd {flops['unet_bwd'] / 1e9:.1f}; text fwd "
          f"{flops['text_fwd'] / 1e9:.1f}, bwd {flops['text_bwd'] / 1e9:.1f}; the reference's VAE encode adds "
          f"{flops['vae_encode'] / 1e9:.1f}); machine fp32 matmul peak {peak:.0f} GFLOP/s")
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'':{width}}{'ours':>16}{'reference':>24}")
    for name, a, b in rows:
        print(f"{name:{width}}{a:>16}{b:>24}")
    if "breakdown" in ours and "breakdown" in ref:
        print("where one step's time goes (s)")
        for phase in PHASES:
            print(f"  {PHASE_NAMES[phase]:{width - 2}}{ours['breakdown'][phase]:>16.3f}{ref['breakdown'][phase]:>24.3f}")
    print(f"ratios ours/reference: step_time={ratio(ours['seconds'], ref['seconds']):.3f} "
          f"peak_memory={ratio(ours['peak_gb'], ref['peak_gb']):.3f} mfu_ours={mfu(ours):.3f}")


def side_argv(args):
    """The command line of one side: everything the parent resolved, passed on explicitly."""
    argv = ["--config", args.config, "--resolution", str(args.resolution), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--batch", str(args.batch), "--num_vectors", str(args.num_vectors),
            "--threads", str(args.threads), "--seed", str(args.seed), "--weights", args.weights,
            "--compile_cache", args.compile_cache]
    return (argv + ["--recompute"] * args.recompute + ["--blockwise_unet"] * args.blockwise_unet
            + ["--no-breakdown"] * (not args.breakdown))


def main(argv=None):
    args = parse_args(argv)
    if args.side:  # a side's own process, started by `run_side` below
        return {"ours": run_ours, "ours-parts": run_ours_parts, "reference": run_reference}[args.side](args)
    args.weights = reference_weights(args.config, args.seed, args.weights)
    flops = step_flops(args)
    script = os.path.abspath(__file__)
    ours = run_side(script, "ours", side_argv(args))
    if args.breakdown:
        parts = run_side(script, "ours-parts", side_argv(args))
        ours["breakdown"] = {phase: parts.get(phase, 0.0) for phase in PHASES}
        # what the fused step costs beyond its parts compiled apart (negative: fusing saved time)
        ours["breakdown"]["other"] = ours["seconds"] - parts["unet_grad"] - parts["text_grad"] - parts["optimizer"]
    ref = run_side(script, "reference", side_argv(args), may_run_out_of_memory=True)
    report(args, ours, ref, flops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
