"""The VAE alone: decoding latents (or, with --encode, encoding images) in one piece and in tiles, ours against
diffusers' AutoencoderKL, same weights, each way in a process of its own. Printed per side and way: seconds for the
call (ours in one piece: its graph's compile included; our tiles and diffusers compile nothing), peak resident
memory, and how far the tiled output is from the same side's output in one piece.

    python benchmarks/bench_vae.py --config full --resolution 1024            # the full-size decoder at 1024 px
    python benchmarks/bench_vae.py --config full --resolution 1024 --encode   # its encoder

Both sides tile with 512 px tiles (`gm.vae_tiling.TILE` latents): ours exact (every GroupNorm with the whole
image's statistics, halos as wide as the convolutions' reach), diffusers' `enable_tiling` blending tiles that
each normalize by themselves (25% overlap). The full config's weights are zeros (benchmarks/common.py), so its
outputs cannot differ: the difference columns mean something at the tiny and small configs (seeded random weights).
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    config_path, emit, memory_gb, ratio, reference_weights, run_side, set_mindspore_threads, set_torch_threads,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=("tiny", "small", "full"), default="tiny")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels, a multiple of 8 (default: 640 tiny, 1024 small and full; tiles are 512 px)")
    p.add_argument("--encode", action="store_true", help="encode images instead of decoding latents")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of both sides (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default=None, help="diffusers folder of the weights (default: written once to a cache)")
    p.add_argument("--side", choices=["ours", "reference"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--tiled", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--output", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.resolution is None:
        args.resolution = 640 if args.config == "tiny" else 1024
    if args.resolution % 8:
        p.error(f"--resolution {args.resolution}: use a multiple of 8")
    return args


def side_input(args):
    """The same input for every side: latents [1, 4, r/8, r/8] or images [1, 3, r, r] in [-1, 1]."""
    rng = np.random.default_rng(args.seed)
    if args.encode:
        return rng.uniform(-1.0, 1.0, (1, 3, args.resolution, args.resolution)).astype(np.float32)
    return rng.standard_normal((1, 4, args.resolution // 8, args.resolution // 8)).astype(np.float32)


def run_ours(args):
    set_mindspore_threads(args.threads)
    import mindspore as ms
    from mindspore import Tensor, nn

    from gm import vae_tiling
    from gm.models.loading import load_config
    from gm.util import instantiate_from_config
    from gm.weights.loader import load_weights

    vae = instantiate_from_config(load_config(config_path(args.config)).model.params.first_stage_config)
    load_weights(vae, args.weights, prefix="first_stage_model.")
    rss_model = memory_gb("VmRSS")

    class Whole(nn.Cell):  # the VAE's call in one compiled graph, as the sampling pipeline's
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.vae = vae

        def construct(self, x):
            return self.vae.encode_mean(x) if args.encode else self.vae.decode(x)

    x = Tensor(side_input(args))
    start = time.perf_counter()
    if args.tiled:
        out = vae_tiling.encode_tiled(vae, x) if args.encode else vae_tiling.decode_tiled(vae, x)
    else:
        out = Whole()(x)
    out = out.asnumpy() if isinstance(out, ms.Tensor) else out
    finish(args, out, time.perf_counter() - start, rss_model)


def run_reference(args):
    set_torch_threads(args.threads)
    import torch
    from diffusers import AutoencoderKL

    from gm.vae_tiling import TILE

    vae = AutoencoderKL.from_pretrained(os.path.join(args.weights, "vae"), torch_dtype=torch.float32)
    if args.tiled:
        vae.enable_tiling()
        vae.tile_latent_min_size, vae.tile_sample_min_size = TILE, TILE * 8  # ours' tile size
    rss_model = memory_gb("VmRSS")
    x = torch.from_numpy(side_input(args))
    start = time.perf_counter()
    with torch.no_grad():
        out = vae.encode(x).latent_dist.mean if args.encode else vae.decode(x).sample
    finish(args, out.numpy(), time.perf_counter() - start, rss_model)


def finish(args, out, seconds, rss_model):
    np.save(args.output, out)
    emit({"seconds": seconds, "peak_gb": memory_gb("VmHWM"), "model_rss_gb": rss_model})


def difference(tiled, whole):
    """(largest, mean) absolute difference of a tiled output from the whole one, relative to the whole's mean
    magnitude (an image's is about 0.5 of [-1, 1])."""
    scale = float(np.abs(whole).mean()) or 1.0
    return float(np.abs(tiled - whole).max()) / scale, float(np.abs(tiled - whole).mean()) / scale


def main(argv=None):
    args = parse_args(argv)
    if args.side:  # a side's own process, started by `run_side` below
        return {"ours": run_ours, "reference": run_reference}[args.side](args)
    args.weights = reference_weights(args.config, args.seed, args.weights)
    script = os.path.abspath(__file__)
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in ("ours", "reference"):
            for tiled in (False, True):
                output = os.path.join(tmp, f"{side}-{tiled}.npy")
                argv = ["--config", args.config, "--resolution", str(args.resolution), "--threads",
                        str(args.threads), "--seed", str(args.seed), "--weights", args.weights, "--output", output]
                argv += ["--encode"] * args.encode + ["--tiled"] * tiled
                results[side, tiled] = run_side(script, side, argv)
                outputs[side, tiled] = np.load(output)
    what = "encoder, images" if args.encode else "decoder, latents of images"
    print(f"\nVAE {what} of {args.resolution} px, config {args.config}, fp32, {args.threads} threads, one call each")
    print(f"{'':28}{'ours whole':>12}{'ours tiled':>12}{'ref whole':>12}{'ref tiled':>12}")
    keys = [("ours", False), ("ours", True), ("reference", False), ("reference", True)]
    for name, field, fmt in (("seconds", "seconds", "{:.1f}"), ("peak resident memory (GB)", "peak_gb", "{:.2f}"),
                             ("  of which the model (GB)", "model_rss_gb", "{:.2f}")):
        print(f"{name:28}" + "".join(f"{fmt.format(results[k][field]):>12}" for k in keys))
    for side in ("ours", "reference"):
        largest, mean = difference(outputs[side, True], outputs[side, False])
        print(f"{side} tiled vs whole: largest difference {largest:.2e}, mean {mean:.2e} (of the whole's mean "
              f"magnitude)")
    ours, ref = results["ours", True], results["reference", True]
    print(f"ratios ours/reference: tiled_time={ratio(ours['seconds'], ref['seconds']):.3f} "
          f"tiled_peak_memory={ratio(ours['peak_gb'], ref['peak_gb']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
