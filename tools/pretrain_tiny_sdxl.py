"""Pretrain the tiny SDXL on a small world of captioned shapes, so that the CPU quick start has a model that draws.

    python tools/pretrain_tiny_sdxl.py --output checkpoints/sd_xl_tiny_shapes.safetensors

trains the VAE, then the UNet on its latents (the defaults: about 1 h 30 min on 2 CPU cores). `--unet_steps 0`
trains the VAE alone; `--init_weight X --vae_steps 0` then trains the UNet on X's VAE. `--init_weight X --vae_steps 0
--unet_steps 0` trains nothing: it writes X's report (below) beside X.

The shipped checkpoint is older than these defaults: it was made with the mean squared error as the VAE's loss, a
fifth of its training and the eps weighting first (an hour: VAE 16 min, encoding the pool 8 min, UNet 33 min), then
a second UNet stage from its output (30 min) with the v weighting, which made the UNet follow its captions (with
the eps weighting alone, its samples hardly depended on them):

    python tools/pretrain_tiny_sdxl.py --vae_loss mse --vae_steps 1200 --vae_batch 8 --pool 4000 \
        --unet_steps 2400 --unet_weighting eps --output checkpoints/sd_xl_tiny_shapes.safetensors
    python tools/pretrain_tiny_sdxl.py --init_weight checkpoints/sd_xl_tiny_shapes.safetensors --vae_steps 0 \
        --pool 4000 --unet_steps 1800 --unet_lr 3e-4 --output checkpoints/sd_xl_tiny_shapes.safetensors

Its VAE gives the toy's pictures back as blobs (README, the concept score: through it, the toy's 8 images read as
no star, 3 red). The mean absolute error of the pixels and of their differences to their neighbours (`--vae_loss
l1_edges`, the default now) over five times the pictures gives the shapes back (VAE stage of the defaults, then
1800 steps more at `--vae_lr 5e-4`: 7 stars of 8, all red), not yet the thin ring nor the dot's blue.

Its world: one object per picture, a star, circle, square or triangle in one of eight named colours,
sometimes inside a coloured ring, sometimes with a coloured dot at its centre, on a plain, gradient, striped,
checkered or dotted background, captioned from the textual-inversion object templates ("a photo of a red star in a
yellow ring with a blue dot on a striped background"). The one combination it never shows is the toy of
`datasets/synthetic_toy` (a red star in a yellow ring with a blue dot): the quick start has to learn a new word for
it.

1. The VAE learns to reconstruct such pictures (`--vae_loss`, plus a small KL term); its latent is then rescaled,
   by folding a factor into `quant_conv` and `post_quant_conv`, so that latent x scale_factor has unit variance,
   as SDXL's has.
2. The UNet learns the config's diffusion loss (with `--unet_weighting v`, that loss plus the error of the
   denoised latent) on the latents of a fixed pool of pictures under their captions; a tenth of the captions are
   dropped (their embeddings zeroed, sgm's `ucg_rate`) for classifier-free guidance.
The text encoders keep their seeded initial weights and stay frozen, as SDXL's pretrained CLIP encoders do in
its training: random encoders still give every caption its own embedding. Both stages train in graph mode with
Adam. The UNet stage uses the textual-inversion trainer's loss cell, so it learns the loss the quick start then
minimises (exactly that loss with the eps weighting). Written as one original-format single file (fp16, sgm's
names), with the loss curves (<output stem>_loss.png) and, unless --unet_steps is 0, a grid of samples of the
world's captions (<output stem>_samples.png) beside it; then the report (<output stem>_report.json, printed, and
_report.png): what tools/shape_detector.py reads in new pictures of the world through the VAE and in samples of
their captions, per attribute (how well the model follows a caption: the upper bound of the toy's concept score).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from gm.data.templates import OBJECT_TEMPLATES  # noqa: E402
from tools.make_synthetic_dataset import BACKGROUNDS, COLORS, SHAPES, TOY, background, draw_object  # noqa: E402

BACKGROUND_WORDS = {"plain": "plain", "gradient": "gradient", "stripes": "striped", "checks": "checkered",
                    "dots": "dotted"}
DRAW_SIZE = 256  # pictures are drawn large and resized down, as the training images are
REPORT_SEED = 1234  # the report's pictures and samples: the same for every checkpoint
SAMPLE_CAPTIONS = ("a photo of a red star", "a photo of a blue circle in a yellow ring",
                   "a photo of a green square with a red dot", "a photo of a yellow triangle on a striped background",
                   "a photo of a white star in a red ring", "a photo of a purple circle on a checkered background")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/training/sd_xl_tiny_textual_inversion.yaml",
                   help="model config with its training loss (default: %(default)s)")
    p.add_argument("--output", default="checkpoints/sd_xl_tiny_shapes.safetensors",
                   help="the single-file checkpoint to write (default: %(default)s)")
    p.add_argument("--resolution", type=int, default=64, help="picture side in pixels (default: %(default)s)")
    p.add_argument("--vae_steps", type=int, default=3000, help="VAE training steps (default: %(default)s)")
    p.add_argument("--vae_batch", type=int, default=16, help="VAE batch size (default: %(default)s)")
    p.add_argument("--vae_crop", type=int, default=32,
                   help="the VAE trains on random crops of this side (it is convolutional; a quarter of the cost "
                        "of whole 64 px pictures) (default: %(default)s)")
    p.add_argument("--vae_lr", type=float, default=1e-3, help="VAE learning rate (default: %(default)s)")
    p.add_argument("--kl_weight", type=float, default=1e-4, help="weight of the VAE's KL term (default: %(default)s)")
    p.add_argument("--vae_loss", choices=["mse", "l1_edges"], default="l1_edges",
                   help="the VAE's reconstruction error: mse (mean squared), or l1_edges (mean absolute error plus "
                        "that of the picture's horizontal and vertical differences: sharper edges and small dots "
                        "kept) (default: %(default)s)")
    p.add_argument("--pool", type=int, default=8000,
                   help="captioned pictures the UNet learns from (default: %(default)s)")
    p.add_argument("--unet_steps", type=int, default=6000,
                   help="UNet training steps; 0 trains the VAE alone (no samples are drawn) (default: %(default)s)")
    p.add_argument("--unet_batch", type=int, default=24, help="UNet batch size (default: %(default)s)")
    p.add_argument("--unet_lr", type=float, default=5e-4, help="UNet learning rate (default: %(default)s)")
    p.add_argument("--unet_weighting", choices=["eps", "v"], default="v",
                   help="the UNet's loss weighting: eps, the config's (noise-prediction error), or v (that plus the "
                        "error of the denoised latent, which weighs the noisiest steps, where the caption decides "
                        "what is drawn, far more) (default: %(default)s)")
    p.add_argument("--init_weight", default=None,
                   help="start from this checkpoint instead of random weights (with --vae_steps 0, its VAE is kept; "
                        "with --unet_steps 0 as well, only its report is written, beside it)")
    p.add_argument("--caption_dropout", type=float, default=0.1,
                   help="fraction of captions dropped for classifier-free guidance (default: %(default)s)")
    p.add_argument("--sample_steps", type=int, default=30,
                   help="Euler steps of the sample grid written at the end (default: %(default)s)")
    p.add_argument("--report_count", type=int, default=48,
                   help="new pictures of the world (a multiple of 8) the report reads through the VAE, and whose "
                        "captions it samples (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.report_count < 8 or args.report_count % 8:
        p.error(f"--report_count must be a positive multiple of 8, got {args.report_count}")
    if args.vae_steps == 0 and args.unet_steps == 0 and args.init_weight is None:
        p.error("--vae_steps 0 and --unet_steps 0: nothing to train (with --init_weight X: X's report alone)")
    for flag in ("config", "init_weight"):  # before minutes of drawing and training, not after them
        path = getattr(args, flag)
        if path is not None and not os.path.exists(path):
            p.exit(2, f"error: --{flag} {path}: no such file or folder.\n")
    return args


# ------------------------------------------------------------------------------------------------- the world


def labelled_scene(rng, resolution):
    """One picture of the world, never the toy, and what it shows: (uint8 [R, R, 3], (shape, colour, ring, dot)
    with None for no ring or dot, background kind)."""
    while True:
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        ring = rng.choice(list(COLORS)) if rng.random() < 0.5 else None
        dot = rng.choice(list(COLORS)) if rng.random() < 0.5 else None
        if (shape, color, ring, dot) != TOY and ring != color and dot != color:
            break
    kind = rng.choice(BACKGROUNDS)
    image = background(rng, DRAW_SIZE, kind)
    draw_object(image, rng, shape, COLORS[color], COLORS[ring] if ring else None, COLORS[dot] if dot else None)
    pixels = np.asarray(image.resize((resolution, resolution), Image.Resampling.BICUBIC))
    return pixels, (str(shape), str(color), ring and str(ring), dot and str(dot)), kind


def caption(rng, labels, kind):
    """A caption of a picture that shows `labels` (shape, colour, ring, dot) on a background of `kind`: an object
    template around what is drawn, the background named half the time."""
    shape, color, ring, dot = labels
    words = f"{color} {shape}" + (f" in a {ring} ring" if ring else "") + (f" with a {dot} dot" if dot else "")
    if rng.random() < 0.5:
        words += f" on a {BACKGROUND_WORDS[kind]} background"
    return OBJECT_TEMPLATES[rng.integers(len(OBJECT_TEMPLATES))].format(words)


def scene(rng, resolution):
    """One captioned picture of the world: (uint8 [R, R, 3], caption)."""
    pixels, labels, kind = labelled_scene(rng, resolution)
    return pixels, caption(rng, labels, kind)


def to_model_pixels(images):
    """uint8 [B, R, R, 3] -> float32 [B, 3, R, R] in [-1, 1]."""
    return (np.stack(images).astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------ the stages


def train(loss_net, params, draw, steps, learning_rate, desc):
    """Train `params` on `loss_net(*draw())` for `steps` Adam steps (MindSpore's TrainOneStepCell, one graph) with a
    cosine-decayed learning rate after a short warm-up; returns the losses."""
    from mindspore import nn

    from gm.textual_inversion.optim import learning_rate as schedule

    lrs = [schedule("cosine", learning_rate, i, steps, warmup_steps=min(100, steps // 10)) for i in range(steps)]
    step = nn.TrainOneStepCell(loss_net, nn.Adam(params, learning_rate=lrs))
    step.set_train()
    losses = []
    bar = tqdm(range(steps), desc=desc)
    for i in bar:
        losses.append(float(step(*draw()).asnumpy()))
        if not np.isfinite(losses[-1]):
            raise FloatingPointError(f"{desc}: the loss became {losses[-1]} at step {i}")
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return losses


def trainable(cell):
    """All of a cell's parameters, made trainable (the engine is built for inference, text encoders frozen)."""
    params = list(cell.get_parameters())
    for param in params:
        param.requires_grad = True
    return params


def vae_loss_net(vae, kl_weight, reconstruction):
    from mindspore import nn, ops

    from gm.models.autoencoder import posterior, posterior_sample

    def l1_edges(recon, images):
        """Mean absolute error of the pixels and of their horizontal and vertical differences."""
        error = recon - images
        return (ops.abs(error).mean() + ops.abs(error[:, :, :, 1:] - error[:, :, :, :-1]).mean()
                + ops.abs(error[:, :, 1:] - error[:, :, :-1]).mean())

    error = {"mse": lambda recon, images: ops.square(recon - images).mean(), "l1_edges": l1_edges}[reconstruction]

    class VAELoss(nn.Cell):
        """The reconstruction error through a posterior sample, plus kl_weight x KL(posterior || N(0, I)) summed
        over the latent and averaged over the batch, relative to the number of pixels."""

        def __init__(self):
            super().__init__(auto_prefix=False)
            self.vae = vae

        def construct(self, images, noise):
            moments = self.vae.encode_moments(images)
            mean, logvar, _ = posterior(moments)
            recon = self.vae.decode(posterior_sample(moments, noise))
            kl = 0.5 * (ops.square(mean) + ops.exp(logvar) - 1.0 - logvar).sum() / images.size
            return error(recon, images) + kl_weight * kl

    return VAELoss()


def train_vae(model, args, rng):
    from mindspore import Tensor

    vae = model.first_stage_model
    latent = args.vae_crop // 8

    def crop(pixels):
        top, left = rng.integers(0, args.resolution - args.vae_crop + 1, 2) // 8 * 8
        return pixels[top:top + args.vae_crop, left:left + args.vae_crop]

    def draw():
        images = to_model_pixels([crop(scene(rng, args.resolution)[0]) for _ in range(args.vae_batch)])
        noise = rng.standard_normal((args.vae_batch, vae.embed_dim, latent, latent)).astype(np.float32)
        return Tensor(images), Tensor(noise)

    loss_net = vae_loss_net(vae, args.kl_weight, args.vae_loss)
    return train(loss_net, trainable(vae), draw, args.vae_steps, args.vae_lr, "VAE")


def encode_pool(vae, pool_images, batch=64):
    """Posterior moments [N, 2C, h, w] of every picture of the pool."""
    from mindspore import Tensor

    return np.concatenate([vae.encode_moments(Tensor(to_model_pixels(pool_images[i:i + batch]))).asnumpy()
                           for i in range(0, len(pool_images), batch)])


def fold_latent_scale(vae, moments, scale_factor):
    """Rescale the VAE's latent so that latent x scale_factor has unit standard deviation over the pool's
    `moments` (the encoder's, before the fold): the encoder's means (and standard deviations) are multiplied by s,
    the decoder's input by 1/s. Returns s and the pool's moments as the folded encoder gives them (scaled once
    here; the engine's scale_factor applies on top, in the loss)."""
    from mindspore import Tensor

    channels = moments.shape[1] // 2
    s = 1.0 / (scale_factor * float(moments[:, :channels].std()))

    def rescale(values, axis=0):  # moments along `axis`: means x s, log-variances + 2 log s
        mean, logvar = np.split(values, 2, axis=axis)
        return np.concatenate([mean * s, logvar + 2.0 * np.log(s)], axis=axis).astype(np.float32)

    weight = vae.quant_conv.weight.asnumpy()
    weight[:channels] *= s
    vae.quant_conv.weight.set_data(Tensor(weight))
    vae.quant_conv.bias.set_data(Tensor(rescale(vae.quant_conv.bias.asnumpy())))
    vae.post_quant_conv.weight.set_data(Tensor(vae.post_quant_conv.weight.asnumpy() / s))
    return s, rescale(moments, axis=1)


def train_unet(model, moments, captions, args, rng):
    from mindspore import Tensor

    from gm.textual_inversion.train_step import TextualInversionLoss, loss_inputs

    text_columns = [i for i, e in enumerate(model.conditioner.embedders) if e.input_key == "txt"]
    r, b = args.resolution, args.unet_batch
    sizes = {"original_size_as_tuple": np.array([[r, r]] * b, np.float32),
             "crop_coords_top_left": np.zeros((b, 2), np.float32),
             "target_size_as_tuple": np.array([[r, r]] * b, np.float32)}
    noise_rng = np.random.RandomState(args.seed)  # the loss's sigma sampler draws from a RandomState

    def draw():
        index = rng.integers(len(captions), size=b)
        cond = model.conditioner.tokenize(dict(sizes, txt=[captions[i] for i in index]))
        keep = cond[-1].asnumpy()
        dropped = rng.random(b) < args.caption_dropout
        keep[np.ix_(dropped, text_columns)] = 0.0
        return loss_inputs(model, moments[index], cond[:-1] + (Tensor(keep),), noise_rng, latent_rng=rng)

    if args.unet_weighting == "v":
        from gm.modules.diffusionmodules.denoiser_weighting import VWeighting

        model.loss_fn.loss_weighting = VWeighting()
    return train(TextualInversionLoss(model), trainable(model.model), draw, args.unet_steps, args.unet_lr, "UNet")


# ------------------------------------------------------------------------------------------------ the output


def save_checkpoint(model, path):
    """Every parameter under its sgm name, fp16, in one safetensors file (the original SDXL single-file form)."""
    from safetensors.numpy import save_file

    from gm.util import atomic_write

    state = {name: p.asnumpy().astype(np.float16) for name, p in model.parameters_and_names()}
    atomic_write(path, lambda tmp: save_file(state, tmp), ".safetensors")


def save_samples(pipeline, path, resolution, steps, seed):
    from gm.sampling import make_grid, save_png

    images = pipeline.generate(list(SAMPLE_CAPTIONS), sampler="EulerEDM", steps=steps, guidance_scale=5.0,
                               height=resolution, width=resolution, seed=seed, num_images=4, batch_size=8)
    save_png(path, make_grid(images, len(SAMPLE_CAPTIONS), 4))


def world_report(model, pipeline, path_stem, count, resolution, steps):
    """What the world's detector (tools/shape_detector.py) reads in `count` (a multiple of 8) new labelled pictures
    of the world as the VAE gives them back (posterior mean) and, with a `pipeline` (the model's), in a sample of
    each picture's caption (`steps` Euler steps, guidance 5, eight at a time as `save_samples` samples): per
    attribute, the fraction that shows what was drawn or asked for, and the ring's and the dot's among the pictures
    that have one (the others are right by showing none); and in the pictures themselves, the detector's own
    accuracy, which bounds the others. The pictures and seeds are fixed (REPORT_SEED), so that reports of
    different checkpoints compare. Writes <stem>_report.json and <stem>_report.png (rows of eight: the pictures,
    their reconstructions, the samples of their captions); returns the report."""
    from mindspore import Tensor

    from gm.sampling import make_grid, save_png, to_uint8
    from tools.evaluate_embedding import write_json
    from tools.shape_detector import accuracy, detect

    rng = np.random.default_rng(REPORT_SEED)
    scenes = [labelled_scene(rng, resolution) for _ in range(count)]
    pictures, truths = [pixels for pixels, _, _ in scenes], [labels for _, labels, _ in scenes]
    vae = model.first_stage_model
    rows = {"pictures": pictures,
            "reconstructions": list(to_uint8(vae.decode(vae.encode_mean(Tensor(to_model_pixels(pictures)))).asnumpy()))}
    captions = [caption(rng, labels, kind) for _, labels, kind in scenes]
    if pipeline is not None:  # the captions of each row of eight share a seed (a prompt's first image has it)
        rows["samples of their captions"] = [
            image for i in range(0, count, 8)
            for image in pipeline.generate(captions[i:i + 8], sampler="EulerEDM", steps=steps, guidance_scale=5.0,
                                           height=resolution, width=resolution, seed=REPORT_SEED + i // 8)]

    def scores(images):
        found = [detect(image) for image in images]
        result = accuracy(found, truths)
        for i, name in ((2, "ring"), (3, "dot")):  # among the pictures that have one
            drawn = [k for k, t in enumerate(truths) if t[i] is not None]
            result[f"{name} when drawn"] = (accuracy([found[k] for k in drawn], [truths[k] for k in drawn])[name]
                                            if drawn else None)
        return result

    report = {name: scores(images) for name, images in rows.items()}  # "pictures": the detector's own accuracy
    report["captions"] = captions
    write_json(path_stem + "_report.json", report)
    groups = [np.concatenate([make_grid(images[i:i + 8], 1, 8) for images in rows.values()])
              for i in range(0, count, 8)]
    save_png(path_stem + "_report.png", np.concatenate(groups))
    return report


def print_report(report, count):
    print(f"What the detector reads in {count} new pictures of the world (fractions right):")
    fields = ("shape", "color", "ring", "dot", "ring when drawn", "dot when drawn")
    print(" ".join(f"{f:>15}" for f in fields) + "  of")
    for name, scores in report.items():
        if name != "captions":
            print(" ".join("{:>15}".format("-" if scores[f] is None else f"{scores[f]:.2f}") for f in fields)
                  + f"  {name}")


def plot_losses(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gm.util import atomic_write

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5))
    for ax, (name, losses) in zip(np.atleast_1d(axes), curves.items()):
        window = max(1, len(losses) // 50)
        ax.plot(np.convolve(losses, np.ones(window) / window, mode="valid"))
        ax.set(title=f"{name} loss (running mean of {window})", xlabel="step", yscale="log")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), ".png")
    plt.close(fig)


def write_report(model, pipeline, stem, args):
    """`world_report` of `model` (its samples through `pipeline`, if any), printed and written as
    <stem>_report.json and <stem>_report.png; returns those paths."""
    print_report(world_report(model, pipeline, stem, args.report_count, args.resolution, args.sample_steps),
                 args.report_count)
    return [stem + "_report.json", stem + "_report.png"]


def main(argv=None):
    args = parse_args(argv)
    import mindspore as ms

    from gm.device import set_device
    from gm.models.loading import create_model, load_config
    from gm.sampling import SDXLPipeline
    from gm.weights.loader import WeightFileError
    from gm.weights.state_dict import WeightMismatchError

    set_device("CPU")
    ms.set_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    try:
        model = create_model(load_config(args.config), args.init_weight)
    except (WeightFileError, WeightMismatchError) as e:  # a config or weights file that is there but unusable
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not (args.vae_steps or args.unet_steps):  # the report of --init_weight alone
        written = write_report(model, SDXLPipeline(model), os.path.splitext(args.init_weight.rstrip(os.sep))[0], args)
        print(f"wrote {', '.join(written)} in {(time.perf_counter() - start) / 60:.1f} min")
        return 0
    curves = {"VAE": train_vae(model, args, rng)} if args.vae_steps else {}
    if args.unet_steps:
        pool = [scene(rng, args.resolution) for _ in tqdm(range(args.pool), desc="drawing the pool")]
        vae = model.first_stage_model
        moments = encode_pool(vae, [image for image, _ in pool])
        s, moments = fold_latent_scale(vae, moments, model.scale_factor)
        print(f"latent rescaled by {s:.4f}: latent x {model.scale_factor} has std "
              f"{moments[:, :vae.embed_dim].std() * model.scale_factor:.3f}")
        curves["UNet"] = train_unet(model, moments, [text for _, text in pool], args, rng)

    save_checkpoint(model, args.output)
    stem = os.path.splitext(args.output)[0]
    plot_losses(curves, stem + "_loss.png")
    written = [args.output, stem + "_loss.png"]
    # the samples and the report describe the file as written (fp16), as a report of it alone does
    model = create_model(load_config(args.config), args.output)
    pipeline = SDXLPipeline(model) if args.unet_steps else None
    if pipeline is not None:
        save_samples(pipeline, stem + "_samples.png", args.resolution, args.sample_steps, args.seed)
        written.append(stem + "_samples.png")
    written += write_report(model, pipeline, stem, args)
    print(f"wrote {', '.join(written)} in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
