"""Smoke test of the benchmarks (benchmarks/): each runs end to end on the tiny config for two steps, both sides,
exits 0 and ends with its ratio line. No timing is asserted: this machine is shared and noisy."""
import math
import os
import re
import subprocess
import sys

import pytest

FLOAT = r"\d+\.\d{3}"


def run_benchmark(root, script, *args):
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", script), "--config", "tiny", *args],
                          cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout.strip().splitlines()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Where the tiny reference weights are written (by the first benchmark) and read back (by both)."""
    return str(tmp_path_factory.mktemp("bench") / "tiny-weights")


@pytest.mark.timeout(900)
def test_ti_step_benchmark(root, weights):
    lines = run_benchmark(root, "bench_ti_step.py", "--steps", "2", "--weights", weights)
    assert re.fullmatch(rf"ratios ours/reference: step_time={FLOAT} peak_memory={FLOAT} mfu_ours={FLOAT}", lines[-1])
    text = "\n".join(lines)
    for row in ("s/step (median)", "graph compile (s)", "peak resident memory (GB)", "model FLOP utilisation",
                "UNet backward", "text encoders backward", "optimizer"):
        assert row in text, row
    assert os.path.exists(os.path.join(weights, "model_index.json"))


@pytest.mark.timeout(900)
def test_sampling_benchmark(root, weights):
    """A grid of two images per call (the sampling command's way; a single image's path differs only in its report)."""
    lines = run_benchmark(root, "bench_sampling.py", "--steps", "2", "--images", "1", "--grid", "2",
                          "--weights", weights)
    assert re.fullmatch(rf"ratios ours/reference: time_per_image={FLOAT} peak_memory={FLOAT}", lines[-1])
    assert any(line.startswith("s/image (median)") for line in lines)
    assert any(line.startswith("first grid, incl. graph compile (s)") for line in lines)


def test_full_config_is_the_real_sdxl_layout(root, tmp_path):
    """The `full` benchmark config's weights: a diffusers folder of zero-filled sparse files whose tensors, mapped
    to sgm's names, are exactly the published sd_xl_base_1.0.safetensors' 2,513 weights (and cost no disk)."""
    from benchmarks.common import config_path, reference_weights
    from gm.models.loading import load_config, model_parameter_shapes
    from gm.weights.loader import read_shapes

    folder = reference_weights("full", folder=str(tmp_path / "full"))
    shapes = read_shapes(folder)
    assert shapes == model_parameter_shapes(load_config(config_path("full")).model)
    assert len(shapes) == 2_513 and sum(math.prod(s) for s in shapes.values()) == 3_468_837_867
    files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names if f.endswith(".safetensors")]
    assert sum(os.path.getsize(f) for f in files) > 6.9e9 and sum(os.stat(f).st_blocks for f in files) * 512 < 1e7



@pytest.mark.timeout(900)
def test_vae_benchmark(root, weights):
    """The decoder alone at 640 px (2 x 2 tiles of 512 px): our tiles equal our whole image to float rounding,
    diffusers' (each tile normalized by itself) do not. (`--encode` shares all but the call.)"""
    lines = run_benchmark(root, "bench_vae.py", "--weights", weights)
    assert re.fullmatch(rf"ratios ours/reference: tiled_time={FLOAT} tiled_peak_memory={FLOAT}", lines[-1])
    differences = {}
    for line in lines:
        match = re.fullmatch(r"(ours|reference) tiled vs whole: largest difference (\S+), mean (\S+) .*", line)
        if match:
            differences[match[1]] = float(match[2])
    assert differences["ours"] < 1e-3 and differences["reference"] > 1e-2, differences
