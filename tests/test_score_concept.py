"""The concept-score command (tools/score_concept.py) on the shipped tiny SDXL: what it scores, in which order,
and the start of a learned word; and its refusals of bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from gm.textual_inversion.embedding_io import save_embedding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "score_concept.py")
DATA = os.path.join(ROOT, "datasets", "synthetic_toy")


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, "--device_target", "CPU", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)


@pytest.mark.parametrize("args, message", [
    (["--target", "star,red,yellow"], "give shape,colour,ring,dot"),
    (["--target", "hexagon,red,none,none"], "the shape must be one of"),
    (["--target", "star,none,none,none"], "the colour must be one of"),
    (["--target", "star,red,pink,none"], "the ring must be one of"),
    (["--initializer_token", "star"], "--initializer_token needs --textual_inversion_weight"),
    (["--num_samples", "0"], "--num_samples must be at least 1"),
])
def test_bad_flags_are_refused_in_one_line(tmp_path, args, message):
    result = run("--prompt", "a photo of a star", "--output", str(tmp_path), *args)
    assert result.returncode == 2 and message in result.stderr and not os.listdir(tmp_path), result.stderr


def test_missing_data_folder_is_one_error_line(tmp_path):
    result = run("--prompt", "a photo of a star", "--data_path", str(tmp_path / "nowhere"), "--output", str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: training data folder not found")


def test_scores_prompts_the_word_its_start_and_the_images(tmp_path):
    """A word of two vectors started from "star" reads, before training, as "star star": its start's samples are
    those of that prompt (to float rounding). The training images score 1; every set is a row of the grid, in the table's order."""
    rng = np.random.RandomState(0)
    embedding = save_embedding(str(tmp_path / "toy.safetensors"), rng.randn(2, 32), rng.randn(2, 64), "<toy>")
    out = tmp_path / "out"
    result = run("--textual_inversion_weight", embedding, "--initializer_token", "star", "--prompt", "a photo of <toy>",
                 "--prompt", "a photo of star star", "--data_path", DATA, "--num_samples", "2", "--steps", "3",
                 "--output", str(out))
    assert result.returncode == 0, result.stderr
    scores = json.loads((out / "scores.json").read_text())
    labels = [s["label"] for s in scores["sets"]]
    assert labels == ["a photo of <toy>", "a photo of star star", "a photo of <toy> (its start: star)",
                      f"{DATA} images", f"{DATA} images through the VAE"]
    assert scores["sets"][3]["scores"]["score"] == 1.0
    assert [len(s["detected"]) for s in scores["sets"]] == [2, 2, 2, 8, 8]
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (5 * 64, 8 * 64, 3)
    start, star_star, learned = (grid[rows, :128].astype(int) for rows in (slice(128, 192), slice(64, 128), slice(64)))
    # the same conditioning and seeds: the same images, to float rounding (a batch's products on the CPU may round a
    # pixel value by one level from one call to the next)
    assert np.abs(start - star_star).max() <= 1 and np.abs(learned - star_star).max() > 1
    for label in labels:
        assert label in result.stdout
