"""Weight loading through the real entry points: `create_model(load_config(...), weight=...)` from the
original single file, a diffusers folder and a .ckpt written by tools/convert_weights.py; the whole tiny
model against the PyTorch reference; the real SDXL layout (names, shapes, published counts) checked from
headers alone; and what a user sees for weights that do not fit or are broken."""
import json
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from mindspore import Tensor
from safetensors.numpy import save_file

from benchmarks.common import write_zero_safetensors
from reference import (COMPONENTS, FULL, LOGIT_SCALE, POSITION_IDS, build, conditioner_batch, run_unet,
                       sdxl_conditioning, sgm_vector)
from gm.models.loading import create_model, load_config, model_parameter_shapes
from gm.weights.loader import WeightFileError
from gm.weights.state_dict import compare_shapes

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import convert_weights  # noqa: E402

TINY = "configs/inference/sd_xl_tiny.yaml"
BASE = "configs/inference/sd_xl_base.yaml"
ATOL = 1e-4
PROMPTS = ["a photo of an astronaut riding a horse on mars", "a watercolor painting of a fox in the snow"]
SCALE_FACTOR = 0.13025  # the SDXL VAE's scaling_factor

# Published for sd_xl_base_1.0.safetensors: parameters per component (the bigG count includes logit_scale)
# and tensors in the file.
PUBLISHED = {"model.diffusion_model.": 2_567_463_684, "conditioner.embedders.0.transformer.": 123_060_480,
             "conditioner.embedders.1.model.": 694_659_841, "first_stage_model.": 83_653_863}
PUBLISHED_TENSORS = 2_514


def run_clis(root, cases, timeout=300):
    """Run tools/convert_weights.py once per {name: argv}, all at once (each pays MindSpore's start-up);
    -> {name: (exit code, stdout, stderr)}."""
    procs = {name: subprocess.Popen([sys.executable, "tools/convert_weights.py", *argv], cwd=root, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, argv in cases.items()}
    results = {name: p.communicate(timeout=timeout) for name, p in procs.items()}
    return {name: (procs[name].returncode, *results[name]) for name in procs}


def params_of(model):
    return {name: p.asnumpy() for name, p in model.parameters_and_names()}


# ----------------------------------------------------------------------------------- the three formats


@pytest.fixture(scope="module")
def converted(root, tiny_sdxl, tmp_path_factory):
    """.ckpt files written by the converter: fp32 from the diffusers folder, fp16 from the single file."""
    out = tmp_path_factory.mktemp("converted")
    paths = {"fp32": str(out / "fp32" / "tiny.ckpt"), "fp16": str(out / "fp16" / "tiny.ckpt")}
    sources = {"fp32": tiny_sdxl.diffusers_folder, "fp16": tiny_sdxl.single_file}
    results = run_clis(root, {dtype: ["--weight", sources[dtype], "--config", TINY, "--output", paths[dtype],
                                      "--dtype", dtype] for dtype in paths})
    for dtype, (code, stdout, stderr) in results.items():
        assert code == 0, stderr
        assert f"Wrote 929 tensors ({dtype})" in stdout
    return paths


def test_all_formats_load_bit_identical(root, tiny_sdxl, tiny_model, converted):
    # The reference's weights are exact in fp16, so even the fp16 files hold them without rounding.
    loaded = params_of(tiny_model)  # from the diffusers folder
    assert len(loaded) == 929
    for path in (tiny_sdxl.single_file, converted["fp32"], converted["fp16"]):
        params = params_of(create_model(load_config(os.path.join(root, TINY)), weight=path))
        assert params.keys() == loaded.keys(), path
        for key, value in params.items():
            assert value.dtype == np.float32 and np.array_equal(value, loaded[key]), f"{path}: {key}"


def test_one_part_loads_alone_under_its_prefix(root, tiny_sdxl, tiny_model, converted):
    """The VAE alone, built from its config section, loads from every format under "first_stage_model." (what
    benchmarks/bench_vae.py does); a prefix that names no part of the file is refused with the missing names."""
    from gm.util import instantiate_from_config
    from gm.weights.loader import load_weights
    from gm.weights.state_dict import WeightMismatchError

    config = load_config(os.path.join(root, TINY)).model.params.first_stage_config
    expected = params_of(tiny_model.first_stage_model)
    for path in (tiny_sdxl.single_file, converted["fp16"], tiny_sdxl.diffusers_folder):
        vae = load_weights(instantiate_from_config(config), path, prefix="first_stage_model.")
        params = params_of(vae)
        assert params.keys() == expected.keys() and all(np.array_equal(params[k], expected[k]) for k in expected)
    with pytest.raises(WeightMismatchError, match="missing.*vae.decoder.conv_in.weight"):
        load_weights(instantiate_from_config(config), tiny_sdxl.single_file, prefix="vae.")


def test_diffusers_fp16_variant_and_sharded_files(root, tiny_sdxl, tiny_model, tmp_path):
    """A diffusers folder as downloaded with variant="fp16", the UNet split into shards with an index."""
    for name in COMPONENTS:
        stem = "model" if name.startswith("text") else "diffusion_pytorch_model"
        state = {k: v.astype(np.float16) for k, v in tiny_sdxl.diffusers_state(name).items()}
        folder = tmp_path / name
        folder.mkdir()
        if name == "unet":
            keys = sorted(state)
            shards = {f"{stem}-0000{i + 1}-of-00002.fp16.safetensors": keys[i::2] for i in range(2)}
            for shard, shard_keys in shards.items():
                save_file({k: state[k] for k in shard_keys}, str(folder / shard))
            weight_map = {k: shard for shard, shard_keys in shards.items() for k in shard_keys}
            (folder / f"{stem}.fp16.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        else:
            save_file(state, str(folder / f"{stem}.fp16.safetensors"))
    (tmp_path / "model_index.json").write_text("{}")
    params = params_of(create_model(load_config(os.path.join(root, TINY)), weight=str(tmp_path)))
    expected = params_of(tiny_model)
    assert params.keys() == expected.keys() and all(np.array_equal(params[k], expected[k]) for k in expected)


def test_bf16_single_file_loads_exactly(root, tiny_sdxl, tiny_model, tmp_path):
    """Merged and community SDXL files are often bf16, which numpy cannot hold: each tensor must come back as
    float32 equal to the bf16 value (checked against torch's own bf16 -> fp32 conversion)."""
    from safetensors.torch import save_file as save_torch

    expected = params_of(tiny_model)
    path = str(tmp_path / "sd_xl_tiny_bf16.safetensors")
    save_torch({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in expected.items()}, path)
    params = params_of(create_model(load_config(os.path.join(root, TINY)), weight=path))
    assert params.keys() == expected.keys()
    for key, value in params.items():
        widened = torch.from_numpy(expected[key]).to(torch.bfloat16).float().numpy()
        assert np.array_equal(value, widened), key


def test_converted_ckpt_written_atomically_in_its_dtype(converted):
    for dtype, path in converted.items():
        assert os.listdir(os.path.dirname(path)) == ["tiny.ckpt"]  # no temporary file left behind
        ckpt = ms.load_checkpoint(path)
        assert len(ckpt) == 929
        assert {p.dtype for p in ckpt.values()} == {ms.float16 if dtype == "fp16" else ms.float32}
    assert os.path.getsize(converted["fp16"]) < 0.55 * os.path.getsize(converted["fp32"])


# ----------------------------------------------------------------------------------- the whole model vs the reference
# Parity runs on the model loaded from the diffusers folder: the other formats load bit-identical parameters.


@pytest.fixture(scope="module")
def conditioning(tiny_model, tiny_sdxl):
    """(ours: crossattn, vector; reference: prompt_embeds, pooled, time_ids) for PROMPTS."""
    batch = conditioner_batch(PROMPTS)
    ours = tiny_model.conditioner(*tiny_model.conditioner.tokenize(batch))
    ids, ids_2 = tiny_sdxl.token_ids(PROMPTS)
    return [x.asnumpy() for x in ours], sdxl_conditioning(tiny_sdxl.text_encoder, tiny_sdxl.text_encoder_2, ids,
                                                           ids_2, batch)


def test_conditioner_matches_diffusers(conditioning):
    (crossattn, vector), (prompt_embeds, pooled, time_ids) = conditioning
    assert crossattn.shape == (2, 77, 96) and vector.shape == (2, 1600)
    np.testing.assert_allclose(crossattn, prompt_embeds, rtol=0, atol=ATOL)
    # (the size embeddings, sin/cos of 1024 x freq in float32, are 5e-5 from exact on both sides)
    np.testing.assert_allclose(vector, sgm_vector(pooled, time_ids), rtol=0, atol=ATOL)


def test_unet_matches_diffusers_on_the_conditioning(tiny_model, tiny_sdxl, conditioning):
    """Ours on our conditioner's outputs, diffusers' UNet on the pipeline's prompt_embeds, pooled embeds, time ids."""
    (crossattn, vector), reference = conditioning
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((2, 4, 8, 8)).astype(np.float32), np.array([999.0, 20.0], np.float32)
    out = tiny_model.model.diffusion_model(Tensor(x), Tensor(t), Tensor(crossattn), Tensor(vector)).asnumpy()
    expected = run_unet(tiny_sdxl.unet, x, t, *reference)
    assert np.abs(expected).std() > 0.1
    np.testing.assert_allclose(out, expected, rtol=0, atol=ATOL)


def test_vae_matches_diffusers(tiny_model, tiny_sdxl):
    image = np.random.default_rng(1).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    z = tiny_model.encode_first_stage(Tensor(image)).asnumpy()
    with torch.no_grad():
        mean = tiny_sdxl.vae.encode(torch.from_numpy(image)).latent_dist.mean.numpy()
        decoded = tiny_sdxl.vae.decode(torch.from_numpy(mean)).sample.numpy()
    np.testing.assert_allclose(z, SCALE_FACTOR * mean, rtol=0, atol=ATOL * SCALE_FACTOR)
    np.testing.assert_allclose(tiny_model.decode_first_stage(Tensor(z)).asnumpy(), decoded, rtol=0, atol=ATOL)


def test_denoiser_matches_diffusers_scheduler(tiny_model, tiny_sdxl):
    """The configured DiscreteDenoiser: its 1000 sigmas, and at diffusers' 30 SDXL timesteps the index
    (UNet timestep), input scaling and x0 estimate of EulerDiscreteScheduler from the folder's scheduler/."""
    scheduler = EulerDiscreteScheduler.from_pretrained(os.path.join(tiny_sdxl.diffusers_folder, "scheduler"))
    denoiser = tiny_model.denoiser
    np.testing.assert_allclose(denoiser.sigmas.asnumpy()[::-1], scheduler.sigmas.numpy()[:-1], rtol=2e-5)

    scheduler.set_timesteps(30)
    sigmas = scheduler.sigmas.numpy()[:-1]
    np.testing.assert_array_equal(denoiser.sigma_to_idx(Tensor(sigmas)).asnumpy(), scheduler.timesteps.numpy())
    c_skip, c_out, c_in, _ = (c.asnumpy() for c in denoiser.scaling(Tensor(sigmas.reshape(-1, 1, 1, 1))))
    rng = np.random.default_rng(2)
    for i, t in enumerate(scheduler.timesteps):
        x, eps = (torch.from_numpy(rng.standard_normal((1, 4, 2, 2)).astype(np.float32)) for _ in range(2))
        np.testing.assert_allclose(c_in[i] * x.numpy(), scheduler.scale_model_input(x, t).numpy(), rtol=1e-6)
        x0 = scheduler.step(eps, t, x).pred_original_sample.numpy()
        np.testing.assert_allclose(c_skip[i] * x.numpy() + c_out[i] * eps.numpy(), x0, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------- the real SDXL layout, no data


def test_full_config_equals_diffusers_sdxl(root):
    """The full config's names and shapes equal diffusers' SDXL (meta device) mapped through gm.weights, and
    its sizes are the published ones."""
    ours = model_parameter_shapes(load_config(os.path.join(root, BASE)).model)
    mapped = {}
    for name, (_, prefix, to_sgm) in COMPONENTS.items():
        with torch.device("meta"):
            module = build(name, FULL)
        # zero-strided stand-ins: the mappings see arrays of the right shapes, nothing is allocated
        state = {k: np.broadcast_to(np.zeros((), np.float16), v.shape) for k, v in module.state_dict().items()}
        component = {prefix + k: v.shape for k, v in to_sgm(state).items()}
        values = sum(int(np.prod(s)) for s in component.values())
        assert values == sum(p.numel() for p in module.parameters())
        assert values + LOGIT_SCALE.startswith(prefix) == PUBLISHED[prefix]
        mapped.update(component)
    compare_shapes(ours, mapped, "diffusers SDXL")
    # The file holds the weights and logit_scale: 2,513 + 1 = 2,514 tensors. Had it kept the ViT-L position_ids
    # buffer too, it would hold 2,515: the published count says it does not (the loader accepts both).
    assert len(ours) + 1 == PUBLISHED_TENSORS
    assert sum(int(np.prod(s)) for s in ours.values()) + 1 == sum(PUBLISHED.values()) == 3_468_837_868


def write_header_only(path, shapes):
    """The checkpoint of these {name: shape} (fp16; int64 position_ids) as a sparse file: header only, no data."""
    write_zero_safetensors(str(path), shapes, {POSITION_IDS: "I64"})
    return str(path)


@pytest.fixture(scope="module")
def real_names(root):
    """{name: shape} of sd_xl_base_1.0.safetensors: the full config's parameters and logit_scale."""
    shapes = model_parameter_shapes(load_config(os.path.join(root, BASE)).model)
    shapes[LOGIT_SCALE] = ()
    return shapes


def dry_run(root, path, capsys):
    code = convert_weights.main(["--weight", path, "--config", os.path.join(root, BASE), "--dry_run"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dry_run_real_sdxl_layout(root, real_names, tmp_path):
    path = write_header_only(tmp_path / "sd_xl_base_1.0.safetensors", real_names)
    assert os.path.getsize(path) > 6.9e9 and os.stat(path).st_blocks * 512 < 1e6  # sparse: 7 GB, no data
    ((code, out, err),) = run_clis(root, {"ok": ["--weight", path, "--dry_run"]}).values()
    assert code == 0, err
    assert "OK: 2,514 tensors matched" in out
    assert "2,513 model parameters (3,468,837,867 values)" in out and LOGIT_SCALE in out


def test_dry_run_accepts_position_ids(root, real_names, tmp_path, capsys):
    path = write_header_only(tmp_path / "with_position_ids.safetensors", {**real_names, POSITION_IDS: (1, 77)})
    code, out, _ = dry_run(root, path, capsys)
    assert code == 0 and "OK: 2,515 tensors matched" in out and "2 known non-weight entries" in out


@pytest.mark.parametrize("change, expected", [
    ("missing", ["1 missing key(s): model.diffusion_model.output_blocks.8.0.skip_connection.weight"]),
    ("shape", ["conditioner.embedders.1.model.text_projection: file (1280, 1024) vs model (1280, 1280)"]),
    ("sd15", ["Stable Diffusion 1.x/2.x checkpoint, not SDXL base"]),
    ("refiner", ["SDXL refiner"]),
])
def test_dry_run_names_what_does_not_fit(root, real_names, tmp_path, capsys, change, expected):
    shapes = dict(real_names)
    if change == "missing":
        del shapes["model.diffusion_model.output_blocks.8.0.skip_connection.weight"]
    elif change == "shape":
        shapes["conditioner.embedders.1.model.text_projection"] = (1280, 1024)
    elif change == "sd15":  # one HF CLIP text encoder under cond_stage_model.
        shapes = {k.replace("conditioner.embedders.0.transformer.", "cond_stage_model.transformer."): v
                  for k, v in shapes.items() if not k.startswith("conditioner.embedders.1.")}
    else:  # the refiner: only the OpenCLIP encoder, as embedder 0
        shapes = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v
                  for k, v in shapes.items() if not k.startswith("conditioner.embedders.0.")}
    code, out, err = dry_run(root, write_header_only(tmp_path / f"{change}.safetensors", shapes), capsys)
    assert code == 1 and not out
    assert err.startswith("error: ") and "does not match the model" in err
    for text in expected:
        assert text in err


# ----------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_inputs(root, tiny_sdxl, tmp_path_factory):
    """The converter's answer to files it cannot use: {case: (exit code, stdout, stderr)}."""
    folder = tmp_path_factory.mktemp("bad_inputs")
    (folder / "notes.txt").write_text("not weights\n")
    (folder / "noise.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    (folder / "noise.ckpt").write_bytes(np.random.default_rng(1).bytes(4096))
    with open(tiny_sdxl.single_file, "rb") as f:
        (folder / "truncated.safetensors").write_bytes(f.read(os.path.getsize(tiny_sdxl.single_file) // 2))
    cases = {
        "missing": ["--weight", str(folder / "sd_xl_base_1.0.safetensors"), "--dry_run"],
        "text file": ["--weight", str(folder / "notes.txt"), "--dry_run"],
        "random safetensors": ["--weight", str(folder / "noise.safetensors"), "--dry_run"],
        "random ckpt": ["--weight", str(folder / "noise.ckpt"), "--dry_run"],
        "truncated": ["--weight", str(folder / "truncated.safetensors"), "--config", TINY,
                      "--output", str(folder / "out.ckpt")],
        "wrong config": ["--weight", tiny_sdxl.single_file, "--output", str(folder / "out.ckpt")],
    }
    results = run_clis(root, cases)
    assert not os.path.exists(folder / "out.ckpt")
    return results


@pytest.mark.parametrize("case, expected", [
    ("missing", ["weights not found", "huggingface.co/stabilityai/stable-diffusion-xl-base-1.0"]),
    ("text file", ["notes.txt: not a .safetensors or MindSpore .ckpt file"]),
    ("random safetensors", ["noise.safetensors: not a safetensors file"]),
    ("random ckpt", ["noise.ckpt: cannot be read as a MindSpore checkpoint"]),
    ("truncated", ["truncated.safetensors: truncated", "Download it again"]),
    ("wrong config", ["sd_xl_tiny.safetensors (its tensors have other sizes than the configured model: is the "
                      "config the one they were made for?) does not match the model", "key(s) with the wrong shape"]),
])
def test_bad_input_one_clear_error(bad_inputs, case, expected):
    code, out, err = bad_inputs[case]
    assert code == 1 and not out
    assert "Traceback" not in err
    assert err.startswith("error: ")
    for text in expected:
        assert text in err


def test_full_config_without_weights_refuses(root):
    with pytest.raises(WeightFileError, match="needs the SDXL weights.*huggingface.co"):
        create_model(load_config(os.path.join(root, BASE)))


def test_tiny_config_without_weights_warns(root, capsys):
    model = create_model(load_config(os.path.join(root, TINY)))
    assert "RANDOM initial weights" in capsys.readouterr().err
    assert all(p.asnumpy().any() for p in model.get_parameters())  # no output stuck at zero


# ----------------------------------------------------------------------------------- reading one tensor at a time


def test_ckpt_reader_matches_mindspore(tmp_path):
    """Our record-by-record .ckpt reader gives what mindspore.load_checkpoint gives: tensors MindSpore splits
    into slices (over 512 KB), bf16, int, and files with the CRC trailer."""
    from gm.weights.loader import CkptFile

    rng = np.random.default_rng(0)
    tensors = {"big": rng.standard_normal((300, 1000)).astype(np.float32),  # 1.2 MB: three slices
               "half": rng.standard_normal((7, 5)).astype(np.float16), "ids": np.arange(6, dtype=np.int64),
               "scalar": np.array(3.5, np.float32)}
    for crc in (False, True):
        path = str(tmp_path / f"t{crc}.ckpt")
        params = [{"name": k, "data": Tensor(v)} for k, v in tensors.items()]
        params.append({"name": "brain", "data": Tensor(tensors["big"][:3], ms.bfloat16)})
        ms.save_checkpoint(params, path, crc_check=crc)
        reference = ms.load_checkpoint(path)
        ours = CkptFile(path)
        assert ours.shapes() == {k: tuple(v.shape) for k, v in reference.items()}
        for name, value in reference.items():
            expected = value.float().asnumpy() if value.dtype == ms.bfloat16 else value.asnumpy()
            assert np.array_equal(ours.read(name), expected), name
    with open(path, "rb") as f:
        data = f.read()
    (tmp_path / "cut.ckpt").write_bytes(data[:len(data) // 2])
    with pytest.raises(WeightFileError, match="cut.ckpt: cannot be read as a MindSpore checkpoint"):
        CkptFile(str(tmp_path / "cut.ckpt"))


def test_loading_holds_one_tensor_at_a_time(root, tiny_sdxl, converted, monkeypatch):
    """For every format, each tensor read from the file is released before the next one is read: the loading
    peak is the model plus one tensor, never a second copy of the model."""
    import weakref

    from gm.weights import loader

    for path in (tiny_sdxl.single_file, converted["fp16"], tiny_sdxl.diffusers_folder):
        alive, reads = [], [0]
        original = loader.open_weights

        def tracking_open(p, original=original):
            weights = original(p)
            read = weights.read

            def tracked(name):
                alive.append(sum(ref() is not None for ref in refs))
                array = read(name)
                refs.append(weakref.ref(array))
                reads[0] += 1
                return array

            weights.read = tracked
            return weights

        refs = []
        monkeypatch.setattr(loader, "open_weights", tracking_open)
        create_model(load_config(os.path.join(root, TINY)), weight=path)
        monkeypatch.setattr(loader, "open_weights", original)
        assert reads[0] == 929 and max(alive) == 0, path
