"""The tool that pretrains the quick start's tiny SDXL (tools/pretrain_tiny_sdxl.py): its world of captioned
shapes, the latent rescaling it folds into the VAE, and a short end-to-end run whose checkpoint loads as an
original single file."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
from safetensors import safe_open

from mindspore import Tensor

from gm.models.loading import create_model, load_config
from gm.weights.loader import read_safetensors_header
from tools.make_synthetic_dataset import COLORS, SHAPES, TOY
from tools.pretrain_tiny_sdxl import fold_latent_scale, scene, to_model_pixels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "inference", "sd_xl_tiny.yaml")


def test_world_captions_name_what_is_drawn_and_never_the_toy():
    rng = np.random.default_rng(0)
    toy = "{1} {0} in a {2} ring with a {3} dot".format(*TOY)
    shapes, colors = set(), set()
    for _ in range(400):
        pixels, caption = scene(rng, 64)
        assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
        assert toy not in caption
        match = re.search(rf"({'|'.join(COLORS)}) ({'|'.join(SHAPES)})", caption)
        assert match, caption
        colors.add(match.group(1))
        shapes.add(match.group(2))
        # the named colour is in the picture: some pixel lies within 40 of it in every channel
        rgb = np.array(COLORS[match.group(1)])
        assert (np.abs(pixels.astype(int) - rgb).max(-1) < 40).any(), caption
    assert shapes == set(SHAPES) and colors == set(COLORS)


def test_folding_the_latent_scale_changes_the_latent_not_the_reconstruction():
    model = create_model(load_config(TINY))
    vae = model.first_stage_model
    rng = np.random.default_rng(1)
    images = Tensor(to_model_pixels([scene(rng, 64)[0] for _ in range(4)]))
    moments = vae.encode_moments(images).asnumpy()
    reconstruction = vae.decode(Tensor(moments[:, :4])).asnumpy()
    s, rescaled = fold_latent_scale(vae, moments, model.scale_factor)
    folded = vae.encode_moments(images).asnumpy()
    np.testing.assert_allclose(rescaled, folded, rtol=1e-4, atol=1e-4)  # what the loss then scales by 0.13025
    np.testing.assert_allclose(folded[:, :4], moments[:, :4] * s, rtol=1e-4, atol=1e-5 * s)
    np.testing.assert_allclose(folded[:, 4:], moments[:, 4:] + 2 * np.log(s), atol=1e-4)
    assert abs(folded[:, :4].std() * model.scale_factor - 1.0) < 1e-3
    np.testing.assert_allclose(vae.decode(Tensor(folded[:, :4])).asnumpy(), reconstruction, atol=1e-4)


def run_pretraining(*argv, timeout=120):
    """The tool as a user runs it: the finished process, its stdout and stderr apart."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "pretrain_tiny_sdxl.py"), *argv], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)


def pretrain(*argv):
    proc = run_pretraining(*argv, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_short_runs_in_two_stages_write_loadable_single_files(tmp_path):
    """The VAE alone (--unet_steps 0: no samples), then the UNet on its latents (--init_weight, --vae_steps 0);
    each writes an original-format single file that loads into the tiny config, its loss curves and its report
    (what the world's detector reads in new pictures, through the VAE and, once there is a UNet, in samples of
    their captions). The report of a copy of the second file alone (--init_weight, no steps) is the one its
    training run wrote: both read the file as written."""
    vae_only, output = str(tmp_path / "vae_only.safetensors"), str(tmp_path / "tiny_shapes.safetensors")
    pretrain("--output", vae_only, "--vae_steps", "3", "--vae_batch", "2", "--vae_loss", "l1_edges",
             "--unet_steps", "0", "--report_count", "8")
    stdout = pretrain("--init_weight", vae_only, "--output", output, "--vae_steps", "0", "--pool", "16",
                      "--unet_steps", "3", "--unet_batch", "4", "--unet_weighting", "v", "--sample_steps", "2",
                      "--report_count", "8")
    assert "latent x 0.13025 has std 1.000" in stdout
    copy = str(tmp_path / "copy.safetensors")
    shutil.copyfile(output, copy)
    report_only = pretrain("--init_weight", copy, "--vae_steps", "0", "--unet_steps", "0", "--sample_steps", "2",
                           "--report_count", "8")
    assert "samples of their captions" in report_only
    with open(tmp_path / "copy_report.json") as mine, open(tmp_path / "tiny_shapes_report.json") as trained:
        assert json.load(mine) == json.load(trained)
    for name in ("copy.safetensors", "copy_report.json", "copy_report.png"):
        os.remove(tmp_path / name)
    for path in (vae_only, output):
        header = read_safetensors_header(path)
        assert {dtype for dtype, _ in header.values()} == {"F16"}
        create_model(load_config(TINY), weight=path)  # every name and shape of the config, nothing else
    pictures = {"vae_only": ("_loss.png", "_report.png"), "tiny_shapes": ("_loss.png", "_report.png", "_samples.png")}
    for stem, suffixes in pictures.items():
        for suffix in suffixes:
            assert os.path.getsize(tmp_path / (stem + suffix)) > 1000, stem + suffix
    assert sorted(os.listdir(tmp_path)) == sorted(
        stem + suffix for stem, suffixes in pictures.items() for suffix in (".safetensors", "_report.json", *suffixes))
    # the report: what the detector reads in 8 new pictures, through the VAE, and in samples of their captions
    samples = "samples of their captions"
    for stem, rows in (("vae_only", {"reconstructions"}), ("tiny_shapes", {"reconstructions", samples})):
        with open(tmp_path / f"{stem}_report.json") as f:
            report = json.load(f)
        assert set(report) == rows | {"pictures", "captions"} and len(report["captions"]) == 8
        assert min(report["pictures"].values()) == 1.0, report["pictures"]  # labels, captions and pictures agree
        for row in rows:
            assert all(0 <= value <= 1 for value in report[row].values() if value is not None), report[row]
    assert samples in stdout
    # the first stage trained the VAE only: the second read it and kept it (before its latent rescaling)
    with safe_open(vae_only, "numpy") as first, safe_open(output, "numpy") as second:
        name = "first_stage_model.decoder.conv_out.weight"
        assert np.array_equal(first.get_tensor(name), second.get_tensor(name))


def test_a_missing_config_or_init_weight_is_one_error_line(tmp_path):
    missing = str(tmp_path / "missing")
    for flag in ("--config", "--init_weight"):
        proc = run_pretraining(flag, missing, "--output", str(tmp_path / "out.safetensors"))
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [f"error: {flag} {missing}: no such file or folder."]
    assert os.listdir(tmp_path) == []


def test_nothing_to_train_is_refused(tmp_path):
    proc = run_pretraining("--vae_steps", "0", "--unet_steps", "0", "--output", str(tmp_path / "out.safetensors"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "error: --vae_steps 0 and --unet_steps 0: nothing to train (with --init_weight X: X's report alone)")
    assert os.listdir(tmp_path) == []
