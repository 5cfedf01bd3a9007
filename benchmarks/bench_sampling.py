"""Text-to-image sampling: seconds per image, ours (MindSpore graph mode) against diffusers, same weights.

    python benchmarks/bench_sampling.py --config small [--resolution 512] [--steps 20]
    python benchmarks/bench_sampling.py --config tiny --steps 40 --grid 8 --images 1   # the README's sampling command
    python benchmarks/bench_sampling.py --config full --blockwise_unet --vae_tiling --release_models --steps 2
                                                                      # real SDXL, 1024 px, as the sampling command

Ours is `gm.sampling.SDXLPipeline.generate` (Euler, sgm's DDPM sigmas, classifier-free guidance with both halves in
one UNet batch); the reference is diffusers' `StableDiffusionXLPipeline` with `EulerDiscreteScheduler`. Both: the
same weights, size, steps, guidance 5.0 with the empty negative prompt (zero embeddings), fp32, the same thread
count, each in its own process. One untimed image first (ours compiles its graphs then), then the median of
--images images. Printed per side: seconds per image, its parts (prompt encoding and set-up, the denoising loop,
VAE decode) and peak memory; the last line holds the ratio ours / reference.

--grid N makes each call a grid of N images of the prompt, as the sampling command makes one (seeds seed ... seed +
N - 1): ours with the pipeline's default batch, the reference with `num_images_per_prompt` (all N in one UNet
batch); the time per image is the call's over N, and the parts of a single image are not reported.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    CONFIGS, config_path, emit, memory_gb, ratio, reference_weights, run_side, set_mindspore_threads,
    set_torch_threads,
)

PROMPT = "a photo of an astronaut riding a horse"
GUIDANCE = 5.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels (default: 64 tiny, 512 small, 1024 full)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: 20; full: 3)")
    p.add_argument("--images", type=int, default=None,
                   help="timed images after the untimed first one (default: 2; full: 0, the first image's own parts "
                        "are reported, its graph compile included)")
    p.add_argument("--grid", type=int, default=1, help="images per call, a grid of one prompt (default: 1)")
    p.add_argument("--blockwise_unet", action="store_true",
                   help="ours: the UNet layer by layer from the host (the sampling command's --blockwise_unet True)")
    p.add_argument("--vae_tiling", action="store_true",
                   help="ours: decode in 512 px tiles (the sampling command's --vae_tiling True)")
    p.add_argument("--release_models", action="store_true",
                   help="ours: free each model's weights once its part is done, as the sampling command does (one "
                        "call: needs --images 0)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of both sides (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default=None, help="diffusers folder of the weights (default: written once to a cache)")
    p.add_argument("--side", choices=["ours", "reference"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    full = args.config == "full"
    if args.resolution is None:
        args.resolution = {"tiny": 64, "small": 512, "full": 1024}[args.config]
    if args.steps is None:
        args.steps = 3 if full else 20
    if args.images is None:
        args.images = 0 if full else 2
    if args.resolution % 32:
        p.error(f"--resolution {args.resolution}: use a multiple of 32")
    if args.grid < 1:
        p.error(f"--grid must be at least 1, got {args.grid}")
    if args.release_models and args.images:
        p.error("--release_models frees the models after the first call: use it with --images 0")
    return args


class StepClock:
    """Timestamps of one image: its start, each denoising step's end, its end; the parts derived from them."""

    def __init__(self):
        self.start, self.steps, self.end = time.perf_counter(), [], None

    def step(self, *_):
        self.steps.append(time.perf_counter())

    def finish(self):
        self.end = time.perf_counter()
        return self

    def parts(self):
        """{"total", "setup" (prompt encoding, noise: before the first step), "denoise", "decode"} in seconds; the
        first step's own time is taken as the median of the others."""
        intervals = np.diff(self.steps)
        step = float(np.median(intervals)) if len(intervals) else 0.0
        setup = self.steps[0] - self.start - step
        return {"total": self.end - self.start, "setup": setup, "denoise": self.steps[-1] - self.start - setup,
                "decode": self.end - self.steps[-1], "per_step": step}


def measure(generate, args):
    """First call (untimed: compiles), then the median parts of `args.images` calls, per image of a call."""
    first = generate(args.seed).parts()
    runs = [generate(args.seed + (1 + i) * args.grid).parts() for i in range(args.images)] or [first]
    median = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
    return {"first_image_seconds": first["total"], "seconds": median["total"] / args.grid, "parts": median,
            "times": [r["total"] for r in runs], "peak_gb": memory_gb("VmHWM"), "threads": args.threads}


def run_ours(args):
    set_mindspore_threads(args.threads)
    from gm.device import resolve_device
    from gm.sampling import SDXLPipeline, build_engine

    engine = build_engine(config_path(args.config), args.weights, precision=resolve_device()[1])
    pipeline = SDXLPipeline(engine, blockwise_unet=args.blockwise_unet, vae_tiling=args.vae_tiling)
    rss_model = memory_gb("VmRSS")

    def generate(seed):
        clock = StepClock()
        pipeline.generate(PROMPT, sampler="EulerEDM", steps=args.steps, guidance_scale=GUIDANCE,
                         height=args.resolution, width=args.resolution, seed=seed, num_images=args.grid,
                         progress=clock.step, release_models=args.release_models)
        return clock.finish()

    result = measure(generate, args)
    result["compile_seconds"] = result["first_image_seconds"] - result["seconds"]
    emit(dict(result, side="ours", model_rss_gb=rss_model))


def run_reference(args):
    set_torch_threads(args.threads)
    import torch
    from diffusers import StableDiffusionXLPipeline

    # fp32, as our side computes (the full config's files are stored in fp16)
    pipe = StableDiffusionXLPipeline.from_pretrained(args.weights, add_watermarker=False, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    rss_model = memory_gb("VmRSS")

    def generate(seed):
        clock = StepClock()

        def on_step_end(pipeline, step, timestep, tensors):
            clock.step()
            return tensors

        with torch.no_grad():
            pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=GUIDANCE, height=args.resolution,
                 width=args.resolution, num_images_per_prompt=args.grid,
                 generator=torch.Generator().manual_seed(seed), output_type="np", callback_on_step_end=on_step_end)
        return clock.finish()

    result = measure(generate, args)
    result["compile_seconds"] = 0.0
    emit(dict(result, side="reference", model_rss_gb=rss_model))


def report(args, ours, ref):
    if ref is None:  # the reference could not run (out of memory): ours alone, and the table says so
        ref = {"seconds": float("nan"), "first_image_seconds": float("nan"), "peak_gb": float("nan"),
               "model_rss_gb": float("nan"), "parts": dict.fromkeys(ours["parts"], float("nan"))}
        print("\nthe reference ran out of memory (killed): its column is nan")
    what = f"grids of {args.grid} images (ours at its default batch)" if args.grid > 1 else "images"
    print(f"\nSampling, config {args.config}, {args.resolution} px, {args.steps} Euler steps, guidance {GUIDANCE} "
          f"(UNet batch 2 per image){', ours UNet layer by layer' if args.blockwise_unet else ''}"
          f"{', ours VAE in tiles' if args.vae_tiling else ''}"
          f"{', ours freeing each model once done' if args.release_models else ''}, fp32, "
          f"{args.threads} threads; median of {args.images} {what} after one untimed")
    rows = [("s/image (median)", ours["seconds"], ref["seconds"], "{:.2f}")]
    if args.grid == 1:  # a grid's steps and decodes interleave: its parts are not an image's
        rows += [
            ("  prompt encoding + set-up", ours["parts"]["setup"], ref["parts"]["setup"], "{:.3f}"),
            ("  denoising loop", ours["parts"]["denoise"], ref["parts"]["denoise"], "{:.2f}"),
            ("    per step (UNet batch 2)", ours["parts"]["per_step"], ref["parts"]["per_step"], "{:.3f}"),
            ("  VAE decode", ours["parts"]["decode"], ref["parts"]["decode"], "{:.3f}"),
        ]
    first = "first grid" if args.grid > 1 else "first image"
    rows += [
        (f"{first}, incl. graph compile (s)", ours["first_image_seconds"], ref["first_image_seconds"], "{:.1f}"),
        ("peak resident memory (GB)", ours["peak_gb"], ref["peak_gb"], "{:.2f}"),
        ("  of which after model load (GB)", ours["model_rss_gb"], ref["model_rss_gb"], "{:.2f}"),
    ]
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'':{width}}{'ours':>12}{'reference':>12}")
    for name, a, b, fmt in rows:
        print(f"{name:{width}}{fmt.format(a):>12}{fmt.format(b):>12}")
    print(f"ratios ours/reference: time_per_image={ratio(ours['seconds'], ref['seconds']):.3f} "
          f"peak_memory={ratio(ours['peak_gb'], ref['peak_gb']):.3f}")


def side_argv(args):
    return (["--config", args.config, "--resolution", str(args.resolution), "--steps", str(args.steps),
             "--images", str(args.images), "--grid", str(args.grid), "--threads", str(args.threads), "--seed",
             str(args.seed), "--weights", args.weights]
            + ["--blockwise_unet"] * args.blockwise_unet + ["--vae_tiling"] * args.vae_tiling
            + ["--release_models"] * args.release_models)


def main(argv=None):
    args = parse_args(argv)
    if args.side:  # a side's own process, started by `run_side` below
        return {"ours": run_ours, "reference": run_reference}[args.side](args)
    args.weights = reference_weights(args.config, args.seed, args.weights)
    script = os.path.abspath(__file__)
    ours = run_side(script, "ours", side_argv(args))
    ref = run_side(script, "reference", side_argv(args), may_run_out_of_memory=True)
    report(args, ours, ref)
    return 0


if __name__ == "__main__":
    sys.exit(main())
