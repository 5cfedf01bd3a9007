"""Latents of the training images cached before training: in a child process on the CPU (MindSpore's CPU pool
would keep the encoder's working memory in the training process for good), identical to encoding in-process."""
import os

import numpy as np
import pytest

from gm.data.dataset import TextualInversionDataset
from gm.models.loading import create_model, load_config
from gm.textual_inversion import latent_cache
from gm.textual_inversion.latent_cache import TrainingLatents

TINY = os.path.join("configs", "inference", "sd_xl_tiny.yaml")
DATA = os.path.join("datasets", "synthetic_toy")


def fresh_autoencoder(root, tiny_sdxl):
    """Its own model each time: caching deletes the encoder."""
    return create_model(load_config(os.path.join(root, TINY)), weight=tiny_sdxl.diffusers_folder).first_stage_model


def test_child_process_latents_equal_in_process(root, tiny_sdxl):
    """Every (image, flip) variant's moments, bit for bit, and its size conditioning; the encoder is released
    either way."""
    dataset = TextualInversionDataset(os.path.join(root, DATA), "<toy>", 64, flip_p=0.5)
    keys = [(i, flipped) for i in range(len(dataset)) for flipped in (False, True)]
    batches = []
    for in_child in (False, True):
        autoencoder = fresh_autoencoder(root, tiny_sdxl)
        latents = TrainingLatents(autoencoder, dataset, (False, True), progress=False, in_child=in_child)
        assert "encoder" not in autoencoder.name_cells() and latents.autoencoder is None
        batches.append(latents.batch(keys))
    in_process, child = batches
    assert in_process["moments"].shape == (len(keys), 8, 8, 8)
    assert in_process.keys() == child.keys()
    for name in in_process:
        np.testing.assert_array_equal(child[name], in_process[name], err_msg=name)


def test_a_child_out_of_memory_in_graph_mode_encodes_again_in_pynative(root, tiny_sdxl, monkeypatch, capsys):
    """The full-size VAE at 1024 px does not fit beside the training process in graph mode: a child that fails is
    run again in PyNative mode (which keeps only the live tensors), with the same latents."""
    dataset = TextualInversionDataset(os.path.join(root, DATA), "<toy>", 64)
    keys = [(i, False) for i in range(len(dataset))]
    expected = TrainingLatents(fresh_autoencoder(root, tiny_sdxl), dataset, progress=False, in_child=False).batch(keys)
    modes, run = [], latent_cache.run_encode_job

    def graph_mode_fails(job_dir, job):
        modes.append(job["ms_mode"])
        return 1 if len(modes) == 1 else run(job_dir, job)  # the first (graph mode) as if out of memory

    monkeypatch.setattr(latent_cache, "run_encode_job", graph_mode_fails)
    latents = TrainingLatents(fresh_autoencoder(root, tiny_sdxl), dataset, progress=False, in_child=True)
    assert modes == [0, 1] and "again, in PyNative mode" in capsys.readouterr().err
    np.testing.assert_allclose(latents.batch(keys)["moments"], expected["moments"], rtol=1e-5, atol=1e-6)


def test_cpu_caches_in_a_child_process(root, tiny_sdxl, monkeypatch):
    """The default on the CPU; a child that fails is one clear error that names the way out."""
    calls = []
    monkeypatch.setattr(latent_cache, "encode_in_child_process", lambda *args: calls.append(args) or {})
    dataset = TextualInversionDataset(os.path.join(root, DATA), "<toy>", 64)
    TrainingLatents(fresh_autoencoder(root, tiny_sdxl), dataset, progress=False)
    assert len(calls) == 1
    monkeypatch.undo()

    class Broken(TextualInversionDataset):
        def variant(self, index, top_left=None, flipped=False):
            example = super().variant(index, top_left, flipped)
            example["jpg"] = example["jpg"][:2]  # two colour channels: the encoder's first convolution refuses it
            return example

    broken = Broken(os.path.join(root, DATA), "<toy>", 64)
    with pytest.raises(RuntimeError, match="failed in the child process .* --cache_latents False"):
        TrainingLatents(fresh_autoencoder(root, tiny_sdxl), broken, progress=False)


def test_bucketed_latents_have_their_buckets_shapes(root, tiny_sdxl, tmp_path):
    """With bucketing, each (image, flip)'s moments have its bucket's latent size, and the child process (one
    file of images, one encoder graph, per size) gives the in-process values bit for bit."""
    from PIL import Image

    toy = Image.open(os.path.join(root, DATA, "toy_00.png"))
    for name, size in (("a.png", (256, 256)), ("b.png", (384, 256)), ("c.png", (256, 256))):  # (w, h)
        toy.resize(size).save(tmp_path / name)
    dataset = TextualInversionDataset(str(tmp_path), "<toy>", 64, flip_p=0.5, bucketing=True)
    assert dataset.target_sizes == [(64, 64), (64, 96), (64, 64)]
    keys = [(i, flipped) for i in range(3) for flipped in (False, True)]
    caches = []
    for in_child in (False, True):
        latents = TrainingLatents(fresh_autoencoder(root, tiny_sdxl), dataset, (False, True), progress=False,
                                  in_child=in_child)
        caches.append(latents.cache)
        wide = latents.batch([(1, False), (1, True)])
        assert wide["moments"].shape == (2, 8, 8, 12) and wide["target_size_as_tuple"].tolist() == [[64, 96]] * 2
        assert wide["crop_coords_top_left"].tolist() == [[0, 0], [0, 0]]  # 96x64 exactly: nothing cropped
        assert latents.batch([(0, True), (2, False)])["moments"].shape == (2, 8, 8, 8)
    in_process, child = caches
    assert sorted(in_process) == sorted(child) == sorted(keys)
    for key in keys:
        np.testing.assert_array_equal(child[key][0], in_process[key][0], err_msg=str(key))
        assert child[key][1] == in_process[key][1]
