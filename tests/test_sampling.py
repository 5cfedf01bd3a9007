"""Sampling with learned words: placeholder tokens, the `SDXLPipeline` against diffusers' schedulers
on the tiny reference SDXL, determinism, the command line, the streamlit page (AppTest) and the page in a
real headless Chromium.

Each new engine or pipeline compiles its graphs again (~15 s for the tiny UNet on a 2-core CPU): the tests
share the session's `tiny_model` through one pipeline, and the command line and page runs are few.
"""
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from gm.models.loading import load_config
from gm.modules.diffusionmodules.discretizer import LegacyDDPMDiscretization
from gm.sampling import SDXLPipeline, SamplingError, build_engine, make_grid
from gm.textual_inversion.embedding_io import EmbeddingFormatError, save_embedding
from gm.textual_inversion.placeholder import (PlaceholderError, add_placeholder_tokens, add_trainable_placeholder,
                                              expand_placeholders, find_placeholders, placeholder_tokens)
from gm.util import instantiate_from_config

from reference import SCHEDULER, sdxl_conditioning, run_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "configs", "inference", "sd_xl_tiny.yaml")
CLI = os.path.join(ROOT, "demo", "sampling_without_streamlit.py")
APP = os.path.join(ROOT, "demo", "sampling.py")
SHIPPED_WEIGHTS = os.path.join(ROOT, "checkpoints", "sd_xl_tiny_shapes.safetensors")
SIZE = 64  # pixels: latents 8 x 8
PROMPT, NEGATIVE = "a photo of a red cube on a table", "blurry, low quality"


def run_cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, CLI, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


@pytest.fixture(scope="module")
def pipeline(tiny_model):
    """One pipeline on the session's tiny engine (the reference's weights): its graphs compile once here."""
    return SDXLPipeline(tiny_model)


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    """Learned words for the tiny text encoders (widths 32, 64) in every format, and files that must fail."""
    folder = tmp_path_factory.mktemp("embeddings")
    rng = np.random.RandomState(0)
    paths = {
        "ckpt": save_embedding(str(folder / "toy" / "SD-XL-base-1.0_ti.ckpt"), rng.randn(2, 32), rng.randn(2, 64),
                               "<toy>"),
        "safetensors": save_embedding(str(folder / "style" / "style.safetensors"), rng.randn(1, 32),
                                      rng.randn(1, 64), "<style>"),
        "diffusers": save_embedding(str(folder / "thing"), rng.randn(3, 32), rng.randn(3, 64), "<thing>",
                                    format="diffusers"),
        "sdxl_widths": save_embedding(str(folder / "bad" / "full_sdxl.safetensors"), rng.randn(1, 768),
                                      rng.randn(1, 1280), "<big>"),
    }
    from safetensors.numpy import save_file

    paths["sd15"] = str(folder / "bad" / "sd15.safetensors")
    save_file({"emb_params": rng.randn(1, 768).astype(np.float32)}, paths["sd15"])
    paths["nan"] = str(folder / "bad" / "diverged.safetensors")  # what a diverged training would have written
    save_file({"clip_l": np.full((1, 32), np.nan, np.float32), "clip_g": np.zeros((1, 64), np.float32)}, paths["nan"])
    paths["text"] = str(folder / "bad" / "notes.txt")
    with open(paths["text"], "w") as f:
        f.write("not an embedding")
    return folder, paths


# ------------------------------------------------------------------------------------------------ placeholders


def test_placeholder_tokens_and_expansion():
    assert placeholder_tokens("<toy>", 3) == ["<toy>", "<toy>_1", "<toy>_2"]
    assert placeholder_tokens("<toy>", 1) == ["<toy>"]
    with pytest.raises(ValueError):
        placeholder_tokens("<toy>", 0)
    with pytest.raises(ValueError):
        placeholder_tokens("two words", 1)
    counts = {"<cat>": 2, "<cat>2": 1, "sks": 3}
    assert expand_placeholders("a <cat> and a <cat>2, by sks.", counts) == \
        "a <cat> <cat>_1 and a <cat>2, by sks sks_1 sks_2."
    assert expand_placeholders("A <CAT> on sksx and xsks", counts) == "A <cat> <cat>_1 on sksx and xsks"
    assert expand_placeholders("(<cat>)", counts) == "((<cat> <cat>_1))"[1:-1]
    assert expand_placeholders("no learned word", counts) == "no learned word"
    assert expand_placeholders("<cat>", {}) == "<cat>"
    assert find_placeholders("sks and <CAT>2 by <cat>, sks", counts) == ["sks", "<cat>2", "<cat>"]
    assert find_placeholders("a <single> word", {"<single>": 1}) == ["<single>"]  # expands to itself
    assert find_placeholders("no learned word", counts) == [] and find_placeholders("<cat>", {}) == []


def test_add_placeholder_tokens_to_both_encoders_or_neither():
    conditioner = instantiate_from_config(load_config(TINY_CONFIG).model.params.conditioner_config)
    clip_l, clip_g = conditioner.text_embedders()
    ids_l, ids_g = add_placeholder_tokens(conditioner, "<toy>", np.ones((2, 32)), 2 * np.ones((2, 64)))
    assert ids_l == [49408, 49409] and ids_g == [49408, 49409]
    np.testing.assert_array_equal(clip_g.token_embedding.get_learned_rows(), 2 * np.ones((2, 64)))
    assert list(clip_l.tokenizer(["<toy> <toy>_1"])[0][:4]) == [49406, 49408, 49409, 49407]

    sizes = (len(clip_l.tokenizer), len(clip_g.tokenizer), clip_l.token_embedding.num_new_tokens)
    for token, rows_g, match in [("<toy>", np.ones((2, 64)), "already in the vocabulary"),
                                 ("cat", np.ones((1, 64)), "already in the vocabulary"),  # a word of CLIP's
                                 ("<new>", np.ones((1, 63)), "width"),
                                 ("<new>", np.ones((2, 64)), "same n")]:
        with pytest.raises(ValueError, match=match):
            add_placeholder_tokens(conditioner, token, np.ones((1, 32)) if token != "<toy>" else np.ones((2, 32)),
                                   rows_g)
        assert (len(clip_l.tokenizer), len(clip_g.tokenizer), clip_l.token_embedding.num_new_tokens) == sizes


def test_initializer_phrase_starts_the_vectors_in_order_cycling():
    """--initializer_token "plush cat toy" with 5 vectors: the rows of plush, cat, toy, plush, cat, in both
    encoders, bit for bit; with 2 vectors the first two; "cat-toy" (three tokens) is a phrase like any other;
    a phrase without a token is refused."""
    config = load_config(TINY_CONFIG).model.params.conditioner_config
    for phrase, num_vectors, order in [("plush cat toy", 5, [0, 1, 2, 0, 1]), ("plush cat toy", 2, [0, 1]),
                                       ("cat-toy", 4, [0, 1, 2, 0])]:
        conditioner = instantiate_from_config(config)
        learned = add_trainable_placeholder(conditioner, "<toy>", num_vectors, phrase, np.random.RandomState(0))
        for embedder, rows in zip(conditioner.text_embedders(), learned):
            ids = embedder.tokenizer.encode(phrase)
            assert len(ids) == 3, ids
            table = embedder.token_embedding.weight.asnumpy()
            assert len({table[i].tobytes() for i in ids}) == 3  # three different rows: the order is visible
            assert np.array_equal(rows.asnumpy(), table[[ids[k] for k in order]]), (phrase, num_vectors)
    with pytest.raises(PlaceholderError, match="--initializer_token ' ' has no word in it"):
        add_trainable_placeholder(instantiate_from_config(config), "<toy>", 2, " ", np.random.RandomState(0))


# ------------------------------------------------------------------------------------------------ parity


def diffusers_latents(tiny, scheduler, x_unit, prompt, negative_prompt, guidance_scale):
    """diffusers' SDXL denoising loop on the torch reference: its own conditioning (both encoders' penultimate
    states, pooled bigG, time ids H, W, 0, 0, H, W; zeros for an empty negative prompt), CFG on eps."""
    time_ids = np.array([[SIZE, SIZE, 0, 0, SIZE, SIZE]], np.float32)
    batch = {"original_size_as_tuple": time_ids[:, :2], "crop_coords_top_left": time_ids[:, 2:4],
             "target_size_as_tuple": time_ids[:, 4:]}
    embeds, pooled, _ = sdxl_conditioning(tiny.text_encoder, tiny.text_encoder_2, *tiny.token_ids([prompt]), batch)
    if negative_prompt:
        uc_embeds, uc_pooled, _ = sdxl_conditioning(tiny.text_encoder, tiny.text_encoder_2,
                                                    *tiny.token_ids([negative_prompt]), batch)
    else:  # force_zeros_for_empty_prompt
        uc_embeds, uc_pooled = np.zeros_like(embeds), np.zeros_like(pooled)
    embeds, pooled = np.concatenate([uc_embeds, embeds]), np.concatenate([uc_pooled, pooled])
    time_ids = np.concatenate([time_ids, time_ids])

    latents = torch.from_numpy(x_unit) * (1 + scheduler.sigmas[0].item() ** 2) ** 0.5
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t).numpy()
        eps = run_unet(tiny.unet, model_input, np.full(2, t.item(), np.float32), embeds, pooled, time_ids)
        eps = eps[:1] + guidance_scale * (eps[1:] - eps[:1])
        latents = scheduler.step(torch.from_numpy(eps), t, latents).prev_sample
    return latents.numpy()


def sgm_schedule_scheduler(cls, steps):
    """diffusers' scheduler for SDXL at sgm's timesteps ("trailing" equals them when steps divide 1000), given
    sgm's sigma table (float64-computed; diffusers' float32 one differs by ~1e-5 relative)."""
    scheduler = cls(**dict(SCHEDULER, timestep_spacing="trailing"))
    scheduler.set_timesteps(steps)
    discretization = LegacyDDPMDiscretization()
    np.testing.assert_array_equal(scheduler.timesteps.numpy(), discretization.timesteps(steps)[::-1])
    np.testing.assert_allclose(scheduler.sigmas.numpy(), discretization(steps), rtol=2e-5)
    scheduler.sigmas = torch.from_numpy(discretization(steps))
    return scheduler


@pytest.mark.parametrize("name,scheduler_cls,negative_prompt", [
    ("EulerEDM", "EulerDiscreteScheduler", ""),
    ("EulerAncestral", "EulerAncestralDiscreteScheduler", NEGATIVE),
])
def test_final_latents_match_diffusers(pipeline, tiny_sdxl, monkeypatch, name, scheduler_cls, negative_prompt):
    import diffusers
    from diffusers.schedulers import scheduling_euler_ancestral_discrete

    steps, seed, guidance_scale = 10, 7, 5.0
    c, uc = pipeline.encode_prompt(PROMPT, negative_prompt, SIZE, SIZE)
    ours = pipeline.sample_latents(c, uc, pipeline.make_sampler(name, steps, guidance_scale), SIZE, SIZE, seed)

    # the same draws: the initial noise, then each ancestral step's noise, from RandomState(seed)
    rng = np.random.RandomState(seed)
    x_unit = rng.standard_normal((1, 4, SIZE // 8, SIZE // 8)).astype(np.float32)

    def randn_tensor(shape, **kwargs):
        return torch.from_numpy(rng.standard_normal(tuple(shape)).astype(np.float32))

    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", randn_tensor)
    scheduler = sgm_schedule_scheduler(getattr(diffusers, scheduler_cls), steps)
    expected = diffusers_latents(tiny_sdxl, scheduler, x_unit, PROMPT, negative_prompt, guidance_scale)
    # This random model's latents reach |x| ~ 50 (std ~ 20): 1e-4 absolute would be float32 round-off over two
    # text encoders and 10 CFG steps (seen: 1.6e-4). Compare in units of the latents' scale instead (seen: 8e-6).
    scale = expected.std()
    assert scale > 1.0
    np.testing.assert_allclose(ours.asnumpy() / scale, expected / scale, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------ the pipeline


def test_the_pipeline_keeps_the_models_parameter_names(pipeline):
    """Its graphs (conditioner, denoiser, VAE halves) hold the model without renaming a parameter: the trainer's grids
    share the model, whose learned rows are the training state's keys by name."""
    assert all(name == param.name for name, param in pipeline.engine.parameters_and_names())


def test_same_seed_same_images_whatever_the_batch(pipeline):
    """Image j of every prompt uses seed + j and its own noise stream (EulerAncestral adds noise at every step), so
    two prompts' four images drawn in one UNet batch equal those drawn one at a time: to the rounding of the batched
    products (measured: one value of 12,288 one level apart), never by another draw."""
    args = dict(negative_prompt="", sampler="EulerAncestral", steps=3, guidance_scale=5.0, height=SIZE, width=SIZE,
                seed=5, num_images=2)
    prompts, calls = [PROMPT, "a photo of a blue ball"], []
    batched = pipeline.generate(prompts, batch_size=4, progress=lambda done, total: calls.append((done, total)), **args)
    assert calls == [(4, 12), (8, 12), (12, 12)]  # an image's steps each
    assert len(batched) == 4 and batched[0].shape == (SIZE, SIZE, 3) and batched[0].dtype == np.uint8
    one_at_a_time = pipeline.generate(prompts, batch_size=1, **args)
    alone = pipeline.generate(PROMPT, **dict(args, seed=6, num_images=1))[0]
    for ours, theirs in zip([*batched, batched[1]], [*one_at_a_time, alone]):
        difference = np.abs(ours.astype(int) - theirs)
        assert difference.max() <= 1 and (difference > 0).mean() < 1e-3
    assert np.abs(batched[0].astype(int) - batched[1]).mean() > 1  # another seed, another image
    assert np.abs(batched[0].astype(int) - batched[2]).mean() > 1  # another prompt, another image


def test_blockwise_unet_samples_the_same_images(pipeline, tiny_model):
    """--blockwise_unet (the UNet layer by layer from the host, layers of one shape sharing a graph): the images of
    the one-graph denoiser, to rounding."""
    args = dict(negative_prompt="", sampler="EulerEDM", steps=2, guidance_scale=5.0, height=SIZE, width=SIZE, seed=3)
    blockwise = SDXLPipeline(tiny_model, blockwise_unet=True)
    assert len(blockwise.denoiser.unet.graphs) < len(blockwise.denoiser.unet.program)  # weights swapped in
    ours, theirs = blockwise.generate(PROMPT, **args)[0], pipeline.generate(PROMPT, **args)[0]
    assert np.abs(ours.astype(int) - theirs).max() <= 1


def test_img2img_runs_the_last_strength_fraction(pipeline):
    image = np.random.RandomState(0).randint(0, 256, (SIZE + 16, SIZE, 3)).astype(np.uint8)  # cropped to size
    totals = []
    out = pipeline.generate(PROMPT, sampler="EulerEDM", steps=9, height=SIZE, width=SIZE, seed=1, init_image=image,
                           strength=0.5, progress=lambda done, total: totals.append(total))
    assert out[0].shape == (SIZE, SIZE, 3)
    assert set(totals) == {4}  # 5 of the 10 sigmas (9 and the final 0): 4 steps
    again = pipeline.generate(PROMPT, sampler="EulerEDM", steps=9, height=SIZE, width=SIZE, seed=1, init_image=image,
                             strength=0.5)
    np.testing.assert_array_equal(out[0], again[0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(height=48), "multiples of 32"), (dict(width=0), "multiples of 32"), (dict(sampler="DDIM"), "unknown sampler"),
    (dict(steps=0), "steps"), (dict(num_images=0), "num_images"), (dict(seed=-1), "seed"),
    (dict(init_image="/nonexistent.png"), "cannot read the image"),
])
def test_bad_requests_fail_before_sampling(pipeline, kwargs, match):
    with pytest.raises(SamplingError, match=match):
        pipeline.generate(PROMPT, **dict(dict(height=SIZE, width=SIZE, steps=2), **kwargs))


RELEASE_PROGRAM = """
import json, sys
sys.path.insert(0, {root!r})
import numpy as np
from mindspore import Parameter, Tensor, nn
from gm.device import set_device
from gm.sampling import SDXLPipeline, SamplingError, build_engine
from gm.util import release_weights

set_device("CPU")


def rss_mb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024


class Sum(nn.Cell):
    def __init__(self, megabytes):
        super().__init__()
        self.weight = Parameter(Tensor(np.ones((megabytes, 2 ** 18), np.float32)), name="weight")

    def construct(self, x):
        return self.weight.sum() * x


big = Sum(512)
big(Tensor(np.float32(1.0)))  # a graph that has run holds its parameters
before = rss_mb()
release_weights(big)
freed = before - rss_mb()

pipeline = SDXLPipeline(build_engine({config!r}, {weight!r}), blockwise_unet=True)
args = dict(sampler="EulerEDM", steps=2, height=64, width=64, seed=7, num_images=2, batch_size=1)
prompts = ["a photo of a red star", "a photo of a blue circle"]
kept = pipeline.generate(prompts, **args)
released = pipeline.generate(prompts, release_models=True, **args)
engine = pipeline.engine
shapes = {{part: sorted({{tuple(p.shape) for p in cell.get_parameters()}})
          for part, cell in [("conditioner", engine.conditioner), ("encoder", engine.first_stage_model.encoder),
                             ("unet", engine.model), ("decoder", engine.first_stage_model.decoder)]}}
try:
    pipeline.generate(prompts, **args)
    again = "ran"
except SamplingError as e:
    again = str(e)
print(json.dumps(dict(freed=freed, difference=max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(kept, released)),
                      different_images=float(np.abs(kept[0].astype(int) - kept[1]).mean()), shapes=shapes,
                      again=again)))
"""


def test_release_models_frees_each_model_once_done_and_draws_the_same_images(tmp_path):
    """generate(..., release_models=True), the sampling command's one call: the text encoders' (and the VAE encoder's)
    weights are freed once the prompts are encoded, the UNet's once every image is sampled, the images are the
    same, and the pipeline refuses another call. Here with the UNet layer by layer, whose graphs hold handles on the
    weights of their own (the one-graph UNet runs in `test_cli_txt2img_with_three_embedding_formats`, through the
    sampling command). `release_weights` gives a graph's parameter memory back (512 MB here). In a fresh process:
    freeing recycles every compiled graph of the process."""
    program = tmp_path / "release.py"
    program.write_text(RELEASE_PROGRAM.format(root=ROOT, config=TINY_CONFIG, weight=SHIPPED_WEIGHTS))
    result = subprocess.run([sys.executable, str(program)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["freed"] > 0.9 * 512, found
    assert found["difference"] <= 1 and found["different_images"] > 1, found
    assert found["shapes"]["conditioner"] == found["shapes"]["encoder"] == found["shapes"]["unet"] == [[1]], found
    assert [1] not in found["shapes"]["decoder"], found
    assert "released its models" in found["again"], found


def test_make_grid_places_images_row_by_row():
    images = [np.full((2, 3, 3), k, np.uint8) for k in range(1, 5)]
    grid = make_grid(images, 2, 2)
    assert grid.shape == (4, 6, 3)
    assert [grid[0, 0, 0], grid[0, 3, 0], grid[2, 0, 0], grid[2, 3, 0]] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------ embeddings


@pytest.fixture(scope="module")
def word_pipeline():
    """A pipeline on an engine of its own (random weights): learned words change its text encoders."""
    return SDXLPipeline(build_engine(TINY_CONFIG))


def crossattn(pipeline, prompt):
    return pipeline.encode_prompt(prompt, "", SIZE, SIZE)[0]["crossattn"].asnumpy()


def test_embeddings_in_every_format_change_the_conditioning(word_pipeline, embeddings):
    _, paths = embeddings
    before = crossattn(word_pipeline, "a photo of <toy> by <thing> in <style>")
    loaded = [word_pipeline.load_embedding(paths[f]) for f in ("ckpt", "safetensors", "diffusers")]
    assert [(e.token, e.num_vectors) for e in loaded] == [("<toy>", 2), ("<style>", 1), ("<thing>", 3)]
    assert word_pipeline.placeholders == {"<toy>": 2, "<style>": 1, "<thing>": 3}
    assert word_pipeline.prompts_without_placeholders(["a <toy>", "a cat", "<STYLE> art"]) == ["a cat"]  # <style>: 1

    plain = crossattn(word_pipeline, "a photo of a cat")
    with_words = crossattn(word_pipeline, "a photo of <toy> by <thing> in <style>")
    assert np.abs(with_words - before).max() > 1e-3
    # a word loaded again with other rows: `set_placeholder_rows` overwrites them in place, and the conditioner's
    # graph, compiled before and kept, reads the new values; loading the first rows again brings the output back
    toy, compiled = loaded[0], word_pipeline.conditioner
    toy_alone = crossattn(word_pipeline, "a photo of <toy>")
    word_pipeline.add_embedding(type(toy)(toy.token, toy.clip_l + 1.0, toy.clip_g - 1.0, "edited"))
    assert word_pipeline.conditioner is compiled
    assert np.abs(crossattn(word_pipeline, "a photo of <toy>") - toy_alone).max() > 1e-3
    word_pipeline.add_embedding(toy)
    np.testing.assert_array_equal(crossattn(word_pipeline, "a photo of <toy>"), toy_alone)
    np.testing.assert_array_equal(crossattn(word_pipeline, "a photo of <toy> by <thing> in <style>"), with_words)
    np.testing.assert_array_equal(crossattn(word_pipeline, "a photo of a cat"), plain)


def test_bad_embeddings_change_nothing(word_pipeline, embeddings):
    _, paths = embeddings
    word_pipeline.load_embedding(paths["ckpt"])  # <toy>, 2 vectors
    known = dict(word_pipeline.placeholders)
    sizes = [len(e.tokenizer) for e in word_pipeline.engine.conditioner.text_embedders()]
    with pytest.raises(EmbeddingFormatError, match="do not fit"):
        word_pipeline.load_embedding(paths["sdxl_widths"])
    with pytest.raises(EmbeddingFormatError, match="SD 1.x"):
        word_pipeline.load_embedding(paths["sd15"])
    with pytest.raises(EmbeddingFormatError, match="neither a safetensors file nor"):
        word_pipeline.load_embedding(paths["text"])
    with pytest.raises(SamplingError, match="already in the vocabulary"):
        word_pipeline.load_embedding(paths["ckpt"], token="cat")
    with pytest.raises(SamplingError, match="already loaded with 2 vectors"):
        word_pipeline.load_embedding(paths["diffusers"], token="<toy>")  # 3 vectors
    assert word_pipeline.placeholders == known
    assert sizes == [len(e.tokenizer) for e in word_pipeline.engine.conditioner.text_embedders()]


# ------------------------------------------------------------------------------------------------ command line


def png_text(path):
    with Image.open(path) as image:
        return dict(image.text), image.size


def test_cli_txt2img_with_three_embedding_formats(tmp_path, embeddings, tiny_sdxl, pipeline):
    _, paths = embeddings
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a photo of <toy> by <thing> in <style>\n\n{PROMPT}\n")
    out = tmp_path / "outputs"
    result = run_cli("--config", TINY_CONFIG, "--weight", tiny_sdxl.single_file,
                     "--textual_inversion_weight", paths["ckpt"], "--textual_inversion_weight", paths["safetensors"],
                     "--textual_inversion_weight", paths["diffusers"], "--prompt_file", str(prompts),
                     "--sampler", "EulerAncestral", "--sample_step", "3", "--H", str(SIZE), "--W", str(SIZE),
                     "--num_cols", "2", "--seed", "11", "--save_path", str(out), "--vae_tiling", "True")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert f"warning: the prompt '{PROMPT}' uses none of the learned words" in result.stderr
    assert str(out) in result.stdout
    names = sorted(os.listdir(out))
    stems = ["00000_a-photo-of-toy-by-thing-in-style", "00001_a-photo-of-a-red-cube-on-a-table"]
    assert names == [f"{stem}_{end}.png" for stem in stems for end in ("grid", "seed11", "seed12")]
    text, size = png_text(out / names[2])
    assert size == (SIZE, SIZE)
    assert text["prompt"] == "a photo of <toy> by <thing> in <style>" and text["seed"] == "12"
    assert (text["sampler"], text["steps"], text["guidance_scale"]) == ("EulerAncestral", "3", "5.0")
    assert text["embeddings"] == "<toy>=SD-XL-base-1.0_ti.ckpt, <style>=style.safetensors, <thing>=thing"
    grid_text, grid_size = png_text(out / names[0])
    assert grid_size == (2 * SIZE, SIZE) and grid_text["seed"] == "11..12"
    grid = np.asarray(Image.open(out / names[0]))
    np.testing.assert_array_equal(grid[:, SIZE:], np.asarray(Image.open(out / names[2])))

    # the same seed and arguments give the same images, here in another process from the same weights (and decoded
    # whole: an image within one tile is the same tiled)
    ours = pipeline.generate(PROMPT, sampler="EulerAncestral", steps=3, height=SIZE, width=SIZE, seed=11, num_images=2)
    for j, name in enumerate(names[4:]):
        assert np.abs(np.asarray(Image.open(out / name)).astype(int) - ours[j]).max() <= 1

    # a second run adds files, never overwrites
    again = run_cli("--config", TINY_CONFIG, "--prompt", "x", "--H", "48", "--W", str(SIZE), "--save_path", str(out))
    assert again.returncode == 1 and sorted(os.listdir(out)) == names


def test_cli_img2img_with_token_override(tmp_path, embeddings):
    """Also: the tiny config without --weight, --H, --W runs its shipped weights at its own 64 px."""
    _, paths = embeddings
    init = tmp_path / "init.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (80, 96, 3)).astype(np.uint8)).save(init)
    out = tmp_path / "outputs"
    result = run_cli("--task", "img2img", "--img", str(init), "--strength", "0.5", "--config", TINY_CONFIG,
                     "--textual_inversion_weight", paths["safetensors"], "--placeholder_token", "<mine>",
                     "--prompt", "a <mine> house", "--negative_prompt", "ugly", "--sample_step", "4",
                     "--save_path", str(out))
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr and "RANDOM" not in result.stderr
    text, size = png_text(out / "00000_a-mine-house_seed42.png")
    assert size == (SIZE, SIZE) and text["weight"] == SHIPPED_WEIGHTS
    assert (text["task"], text["strength"], text["init_image"]) == ("img2img", "0.5", str(init))
    assert text["embeddings"] == "<mine>=style.safetensors" and text["negative_prompt"] == "ugly"


@pytest.mark.parametrize("args,message", [
    (["--weight", "/nonexistent/sd_xl_base_1.0.safetensors"], "weights not found"),
    ([], "needs the SDXL weights"),  # the full config, no --weight
    (["--config", TINY_CONFIG, "--textual_inversion_weight", "{sd15}"], "SD 1.x embedding"),
    (["--config", TINY_CONFIG, "--textual_inversion_weight", "{sdxl_widths}"], "do not fit this model's text encoders"),
    (["--config", TINY_CONFIG, "--textual_inversion_weight", "{text}"], "neither a safetensors file nor"),
    (["--config", TINY_CONFIG, "--textual_inversion_weight", "{nan}"], "diverged.safetensors: clip_l holds NaN"),
    (["--config", SHIPPED_WEIGHTS], "sd_xl_tiny_shapes.safetensors: a binary file, not a YAML config"),
    (["--config", TINY_CONFIG, "--textual_inversion_weight", "{ckpt}", "--textual_inversion_weight", "{ckpt}"],
     "the same token"),
    (["--config", TINY_CONFIG, "--H", "100"], "multiples of 32"),
    (["--config", TINY_CONFIG, "--task", "img2img", "--img", "{text}"], "cannot read the image"),
    (["--config", TINY_CONFIG, "--task", "img2img", "--img", "/nonexistent.png"], "cannot read the image"),
])
def test_cli_bad_input_one_message_exit_1(tmp_path, embeddings, capsys, args, message):
    sys.path.insert(0, os.path.dirname(CLI))
    from sampling_without_streamlit import main

    _, paths = embeddings
    out = tmp_path / "outputs"
    size = [] if "--H" in args else ["--H", str(SIZE)]  # never the 1024 default: these must fail before sampling
    args = [a.format(**paths) for a in args] + size + ["--W", str(SIZE), "--prompt", "a <toy>", "--save_path", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("error: ") and message in err.splitlines()[-1]
    assert not out.exists()


def test_cli_flag_errors_and_help():
    result = run_cli("--help", timeout=60)
    assert result.returncode == 0
    for flag in ("--task", "--img", "--strength", "--config", "--weight", "--textual_inversion_weight",
                 "--placeholder_token", "--prompt", "--prompt_file", "--negative_prompt", "--sampler", "--sample_step",
                 "--guidance_scale", "--seed", "--num_cols", "--num_rows", "--H", "--W", "--save_path",
                 "--batch_size", "--device_target", "--ms_mode", "--precision"):
        assert flag in result.stdout
    missing_weights = run_cli("--prompt", "x", "--weight", "/nonexistent.safetensors", timeout=120)
    assert missing_weights.returncode == 1 and "Traceback" not in missing_weights.stderr
    assert "weights not found" in missing_weights.stderr
    for args, message in [([], "exactly one of --prompt and --prompt_file"),
                          (["--prompt", "x", "--task", "img2img"], "needs --img"),
                          (["--prompt", "x", "--strength", "2"], "--strength"),
                          (["--prompt", "x", "--guidance_scale", "nan"], "--guidance_scale must be a finite number"),
                          (["--prompt", "x", "--placeholder_token", "<a>"], "one per embedding"),
                          (["--prompt", "x", "--batch_size", "0"], "--batch_size must be at least 1"),
                          (["--prompt_file", "/nonexistent.txt"], "cannot read --prompt_file")]:
        result = run_cli(*args, timeout=60)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------------ the page


def test_page_logic_with_apptest(tiny_sdxl, embeddings):
    from streamlit.testing.v1 import AppTest

    folder, paths = embeddings
    at = AppTest.from_file(APP, default_timeout=600).run()
    assert not at.exception
    assert "needs the SDXL weights" in at.sidebar.error[0].value  # the full config without weights

    at.text_input(key="config").set_value(TINY_CONFIG)
    at.text_input(key="weight").set_value("/nonexistent.safetensors").run()
    assert "weights not found" in at.sidebar.error[0].value and not at.exception
    at.text_input(key="weight").set_value(tiny_sdxl.single_file).run()
    assert not at.exception and not at.error
    at.text_input(key="embeddings_dir").set_value(str(folder)).run()
    assert not at.exception and not at.error
    assert at.multiselect(key="embeddings").options == [
        "bad/diverged.safetensors", "bad/full_sdxl.safetensors", "bad/sd15.safetensors", "style/style.safetensors",
        "thing/learned_embeds.safetensors", "toy/SD-XL-base-1.0_ti.ckpt"]

    assert at.text_area(key="prompt").value == "a photo of a cat"

    at.multiselect(key="embeddings").set_value(
        ["bad/diverged.safetensors", "bad/full_sdxl.safetensors", "bad/sd15.safetensors", "toy/SD-XL-base-1.0_ti.ckpt"])
    at.text_input(key="embedding_path").set_value(paths["text"]).run()
    errors = " ".join(e.value for e in at.sidebar.error)
    assert "do not fit" in errors and "SD 1.x" in errors and "neither a safetensors file nor" in errors
    assert "diverged.safetensors: clip_l holds NaN" in errors
    assert [s.value for s in at.sidebar.success] == ["<toy> (2 vectors) from SD-XL-base-1.0_ti.ckpt"]
    assert at.text_area(key="prompt").value == "a photo of <toy>"  # the untouched prompt takes the new word
    at.text_area(key="prompt").set_value("a cat").run()
    assert "uses none of the learned words" in at.warning[0].value
    at.text_input(key="embedding_path").set_value(paths["safetensors"]).run()
    assert at.text_area(key="prompt").value == "a cat"  # an edited prompt is the user's: left alone

    at.text_area(key="prompt").set_value("a photo of <toy>")
    at.number_input(key="steps").set_value(2)
    at.number_input(key="H").set_value(SIZE)
    at.number_input(key="W").set_value(SIZE)
    at.number_input(key="num_images").set_value(2)
    at.button(key="generate").click().run()
    assert not at.exception and not at.warning
    assert [image.captions for image in at.image] == [["seed 42"], ["seed 43"]]
    assert len(at.download_button) == 2
    at.run()  # a rerun (any widget change) keeps the images
    assert len(at.image) == 2 and len(at.download_button) == 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_page_in_headless_chromium(tiny_sdxl, tmp_path):
    from playwright.sync_api import sync_playwright

    port, log = free_port(), open(tmp_path / "streamlit.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", APP, "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false", "--",
         "--config", TINY_CONFIG, "--weight", tiny_sdxl.single_file, "--sample_step", "2"],  # 64 px: the config's
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    if r.read() == b"ok":
                        break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path="/usr/bin/chromium",
                args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--no-first-run"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.set_default_timeout(60_000)
                page.goto(f"http://127.0.0.1:{port}/")
                page.get_by_role("button", name="Generate").click(timeout=120_000)
                image = page.locator("[data-testid='stImage'] img").first
                image.wait_for(state="visible", timeout=300_000)
                page.get_by_text("Done: 1 image(s)").wait_for(timeout=60_000)
                assert page.get_by_role("button", name="Download PNG").count() == 1
                # shown enlarged 4x with sharp pixels, downloaded at its true size
                shown = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
                assert shown == [4 * SIZE, 4 * SIZE]
                with page.expect_download() as download:
                    page.get_by_role("button", name="Download PNG").click()
                with Image.open(download.value.path()) as downloaded:
                    assert downloaded.size == (SIZE, SIZE)
                    true_size = np.asarray(downloaded.convert("RGB"))
                with urllib.request.urlopen(urllib.parse.urljoin(page.url, image.get_attribute("src"))) as shown_png:
                    enlarged = np.asarray(Image.open(io.BytesIO(shown_png.read())).convert("RGB"))
                np.testing.assert_array_equal(enlarged, true_size.repeat(4, 0).repeat(4, 1))
                page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            finally:
                browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
