"""tools/evaluate_embedding.py on the tiny SDXL (the shipped pretrained file, 64 px, 2 steps) with a tiny random
CLIPModel written in the real format (save_pretrained, CLIP's BPE tokenizer files, a CLIPImageProcessor): its
figures equal the paper's definitions recomputed here, from the saved grids and the training images, with
transformers' own CLIPModel forward; a fixed seed repeats them; bad input gives one `error:` line and exit 2.

The two runs that sample (one with the baseline, one repeating it without) are concurrent subprocesses: each
builds the tiny engine and compiles its graphs (UNet, text encoders, VAE decoder), which takes most of its time and
one core. The bad-input cases run in this process and stop before the engine is built.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPTokenizer

from benchmarks.common import write_tokenizer
from gm.textual_inversion.embedding_io import save_embedding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from evaluate_embedding import main  # noqa: E402

SCRIPT = os.path.join(ROOT, "tools", "evaluate_embedding.py")

TINY_CONFIG = os.path.join(ROOT, "configs", "inference", "sd_xl_tiny.yaml")
TOY = os.path.join(ROOT, "datasets", "synthetic_toy")
PROMPTS = ("a photo of {} on the moon", "an oil painting of {}")
SIZE, SAMPLES, SEED = 64, 3, 7


def write_tiny_clip(folder, seed=0):
    """A random CLIPModel (text and vision towers of width 32, 2 layers; 32 px images in 8 px patches) with its
    tokenizer (from the BPE merges bundled with gm) and image processor, as CLIPProcessor.save_pretrained lays
    them out."""
    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, vocab_size=49408, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    write_tokenizer(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """{name: path}: the tiny CLIP folder, an embedding of random rows for the tiny encoders (widths 32, 64), two
    training images of the toy, a prompt file."""
    folder = tmp_path_factory.mktemp("evaluate")
    rng = np.random.RandomState(0)
    data = folder / "data"
    data.mkdir()
    for name in ("toy_00.png", "toy_03.png"):
        shutil.copy(os.path.join(TOY, name), data / name)
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return {"clip": write_tiny_clip(str(folder / "clip")),
            "embedding": save_embedding(str(folder / "toy.safetensors"), rng.randn(2, 32), rng.randn(2, 64), "<toy>",
                                        metadata={"step": 300, "seed": 0}),
            "data": str(data), "prompts": str(folder / "prompts.txt"), "folder": str(folder)}


def arguments(inputs, output, *extra, **replace):
    flags = {"config": TINY_CONFIG, "textual_inversion_weight": inputs["embedding"], "data_path": inputs["data"],
             "clip_model": inputs["clip"], "prompts": inputs["prompts"], "output": output}
    flags.update(replace)
    args = [part for flag, value in flags.items() for part in (f"--{flag}", str(value))]
    return args + ["--num_samples", str(SAMPLES), "--steps", "2", "--seed", str(SEED), "--device_target", "CPU",
                   *extra]


@pytest.fixture(scope="module")
def runs(inputs):
    """{name: (output folder, scores, stdout)} of the command run twice at once with the same seed: "first" with
    the baseline, "again" without it."""
    commands = {"first": arguments(inputs, os.path.join(inputs["folder"], "first")),
                "again": arguments(inputs, os.path.join(inputs["folder"], "again"), "--no_baseline")}
    processes = {name: subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, cwd=ROOT)
                 for name, args in commands.items()}
    results = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
        output = commands[name][commands[name].index("--output") + 1]
        with open(os.path.join(output, "scores.json")) as f:
            results[name] = output, json.load(f), out
    return results


def grid_tiles(path, layout):
    """The samples of a grid, row by row."""
    grid = np.asarray(Image.open(path).convert("RGB"))
    return [grid[r * SIZE:(r + 1) * SIZE, c * SIZE:(c + 1) * SIZE]
            for r in range(layout["rows"]) for c in range(layout["cols"])][:SAMPLES]


def test_scores_are_the_papers_figures(inputs, runs):
    output, scores, stdout = runs["first"]
    model = CLIPModel.from_pretrained(inputs["clip"]).eval()
    processor = CLIPImageProcessor.from_pretrained(inputs["clip"])
    tokenizer = CLIPTokenizer.from_pretrained(inputs["clip"])
    texts = ["a photo of on the moon", "an oil painting of"]  # the prompts with the word left out

    def embed(images):
        """Unit image embeddings and the texts' unit text embeddings, from CLIPModel's forward pass."""
        with torch.no_grad():
            out = model(**tokenizer(texts, padding=True, return_tensors="pt"),
                        pixel_values=processor(images=images, return_tensors="pt").pixel_values)
        return out.image_embeds.double().numpy(), out.text_embeds.double().numpy()

    training, text = embed([Image.open(os.path.join(inputs["data"], n)).convert("RGB")
                            for n in ("toy_00.png", "toy_03.png")])
    assert scores["words"] == {"embedding": "<toy>", "baseline": ""}
    assert [p["text"] for p in scores["text_similarity_per_prompt"]] == texts
    for name, word in scores["words"].items():
        grid = os.path.join(output, scores["image_similarity_grids"][name])
        assert Image.open(grid).text["prompt"] == ("a photo of <toy>" if word else "a photo of")
        samples, _ = embed(grid_tiles(grid, scores["grid"]))
        # image similarity: the mean cosine over every (sample of "a photo of <toy>", training image) pair
        assert scores["image_similarity"][name] == pytest.approx(np.mean(samples @ training.T), abs=1e-5)
        per_prompt = []
        for k, prompt in enumerate(scores["text_similarity_per_prompt"]):
            samples, _ = embed(grid_tiles(os.path.join(output, prompt["grids"][name]), scores["grid"]))
            mean = samples.mean(axis=0)
            # text similarity: the mean sample embedding against the prompt without the word
            per_prompt.append(mean @ text[k] / np.linalg.norm(mean))
            assert prompt[name] == pytest.approx(per_prompt[-1], abs=1e-5)
        assert scores["text_similarity"][name] == pytest.approx(np.mean(per_prompt), abs=1e-5)

    # the "image only" reference: the training images among themselves and against the prompts
    assert scores["image_similarity"]["training_images"] == pytest.approx(training[0] @ training[1], abs=1e-5)
    mean = training.mean(axis=0)
    assert scores["text_similarity"]["training_images"] == pytest.approx(
        np.mean(text @ mean) / np.linalg.norm(mean), abs=1e-5)

    # the learned word changed the pictures (same seeds, different prompt)
    embedding = np.asarray(Image.open(os.path.join(output, scores["image_similarity_grids"]["embedding"])))
    baseline = np.asarray(Image.open(os.path.join(output, scores["image_similarity_grids"]["baseline"])))
    assert embedding.shape == baseline.shape == (SIZE, SAMPLES * SIZE, 3)
    assert np.abs(embedding.astype(int) - baseline).mean() > 1.0

    settings = scores["settings"]
    assert settings["seeds"] == [SEED, SEED + 1, SEED + 2] and settings["steps"] == 2
    assert settings["clip_model"] == inputs["clip"] and settings["training_images"] == ["toy_00.png", "toy_03.png"]
    assert settings["embedding"]["token"] == "<toy>" and settings["embedding"]["num_vectors"] == 2
    assert settings["embedding"]["metadata"] == {"step": "300", "seed": "0"}
    image, text = scores["image_similarity"], scores["text_similarity"]
    assert (f"embedding (<toy>): image similarity {image['embedding']:.4f}, text similarity "
            f"{text['embedding']:.4f}") in stdout
    with Image.open(os.path.join(output, "scores.png")) as chart:
        assert chart.size[0] > 300 and chart.size[1] > 200
    assert sorted(os.listdir(output)) == sorted(
        ["scores.json", "scores.png", "embedding_0_a-photo-of-toy.png", "embedding_1_a-photo-of-toy-on-the-moon.png",
         "embedding_2_an-oil-painting-of-toy.png", "baseline_0_a-photo-of.png", "baseline_1_a-photo-of-on-the-moon.png",
         "baseline_2_an-oil-painting-of.png"])


def test_a_fixed_seed_repeats_the_scores(runs):
    """A second run (another process, without the baseline) gives the same samples and the same figures."""
    output, scores, _ = runs["first"]
    again, repeat, _ = runs["again"]
    for figure in ("image_similarity", "text_similarity"):
        assert repeat[figure] == {key: scores[figure][key] for key in ("embedding", "training_images")}
    for k, prompt in enumerate(repeat["text_similarity_per_prompt"]):
        assert prompt["embedding"] == scores["text_similarity_per_prompt"][k]["embedding"]
    for name in os.listdir(again):
        if name.startswith("embedding_"):
            assert np.array_equal(np.asarray(Image.open(os.path.join(again, name))),
                                  np.asarray(Image.open(os.path.join(output, name))))
    assert not any(name.startswith("baseline_") for name in os.listdir(again))


@pytest.fixture()
def bad_inputs(inputs, tmp_path):
    """Folders and files that must be refused, each before the diffusion model is built."""
    text_only = str(tmp_path / "text_only")
    CLIPTextConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(text_only)
    no_processor = str(tmp_path / "no_processor")
    shutil.copytree(inputs["clip"], no_processor)
    os.remove(os.path.join(no_processor, "preprocessor_config.json"))
    (tmp_path / "garbage.safetensors").write_bytes(b"not an embedding at all")
    (tmp_path / "empty").mkdir()
    return {"text_only": text_only, "no_processor": no_processor, "garbage": str(tmp_path / "garbage.safetensors"),
            "empty": str(tmp_path / "empty"), "missing": str(tmp_path / "no_such_folder")}


@pytest.mark.parametrize("replace, words", [
    ({"clip_model": "missing"}, ["--clip_model", "no_such_folder", "no such folder"]),
    ({"clip_model": "text_only"}, ["--clip_model", "'clip_text_model' model, not a CLIPModel"]),
    ({"clip_model": "no_processor"}, ["--clip_model", "no preprocessor_config.json"]),
    ({"textual_inversion_weight": "garbage"}, ["garbage.safetensors", "not a readable safetensors file"]),
    ({"data_path": "empty"}, ["no images", "empty"]),
])
def test_bad_input_one_error_line_exit_2(inputs, bad_inputs, tmp_path, capsys, replace, words):
    output = tmp_path / "out"
    args = arguments(inputs, str(output), **{flag: bad_inputs[name] for flag, name in replace.items()})
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert all(word in err[0] for word in words), err[0]
    assert not output.exists()


def test_without_torch_one_error_line_saying_pip_install_torch(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    assert main(arguments(inputs, str(tmp_path / "out"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install torch" in err[0]
