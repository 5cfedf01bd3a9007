"""VAE latents of the training images.

Textual inversion never changes the VAE, so by default each training image (and its mirrored variant, when
flips are on) is encoded once, before training; a step then samples its latent from the cached posterior
N(mean, std^2) with fresh noise, exactly what encoding the image anew each step would give, and the VAE
encoder is released (deleted from the autoencoder; the decoder stays for sampling). With caching off, images
are encoded when drawn (the diffusers script's way).

On the CPU the encoding runs in a child process (`python -m gm.textual_inversion.latent_cache JOB_DIR`): MindSpore's
CPU memory pool never gives memory back to the system, so the encoder's working memory (gigabytes for the
full-size VAE at 1024 px) would otherwise stay in the training process for its whole life. The child gets the
encoder's weights and the images through files in a temporary folder and writes the moments back there.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from tqdm import tqdm

import mindspore as ms
from mindspore import Tensor

from gm.compile_cache import child_env
from gm.device import keeps_graph_memory
from gm.util import release_free_memory

ENCODER_PARTS = ("encoder.", "quant_conv.")  # the autoencoder's parameters that `encode_moments` uses
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class TrainingLatents:
    """Posterior moments [2C, h, w] (means, then log-variances; h, w: the image's training size / 8, so one
    shape per bucket) and size conditioning per (index, flipped).

    With `cache`, every (index, flipped) of `variants` is encoded now (in a child process where the device keeps
    a graph's memory, see the module's docstring; `in_child` overrides) and, with `release_encoder` (False while
    other image sets still need it), `autoencoder.encoder` is deleted.
    """

    def __init__(self, autoencoder, dataset, variants=(False,), cache=True, progress=True, in_child=None,
                 release_encoder=True):
        self.autoencoder, self.dataset = autoencoder, dataset
        self.cache = {}
        if cache:
            keys = [(i, flipped) for i in range(len(dataset)) for flipped in variants]
            if in_child is None:
                in_child = keeps_graph_memory(ms.get_context("device_target"))
            if in_child:
                self.cache = encode_in_child_process(autoencoder, dataset, keys, progress)
            else:
                for key in tqdm(keys, desc="Caching VAE latents", unit="image", disable=not progress):
                    self.cache[key] = self._encode(key)
            self.autoencoder = None
            if release_encoder:
                del autoencoder.encoder  # never needed again: free its weights before training
                release_free_memory()  # what compiling the encoder's graph freed, before the train step compiles

    def _encode(self, key):
        image, conditions = image_and_conditions(self.dataset, key)
        return self.autoencoder.encode_moments(Tensor(image[None], ms.float32)).asnumpy()[0], conditions

    def batch(self, keys):
        """{"moments": [B, 2C, h, w], size conditioning [B, 2] arrays} for `keys`."""
        entries = [self.cache[k] if k in self.cache else self._encode(k) for k in keys]
        batch = {"moments": np.stack([moments for moments, _ in entries])}
        for name in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"):
            batch[name] = np.array([cond[name] for _, cond in entries], np.int64)
        return batch


def image_and_conditions(dataset, key):
    """(image float32 [3, height, width], its size conditioning) of the dataset's (index, flipped) `key`."""
    example = dataset.variant(key[0], flipped=key[1])
    return example.pop("jpg"), example


def encode_in_child_process(autoencoder, dataset, keys, progress=True):
    """{key: (moments, size conditioning)} for the dataset's (index, flipped) `keys`, encoded by a child process
    running `autoencoder`'s encoder (its constructor arguments and encoder weights passed through files)."""
    from safetensors.numpy import save_file

    with tempfile.TemporaryDirectory(prefix="sdxl-ti-latents-") as job_dir:
        # one file of images per training size (one, without bucketing), each written image by image: all of
        # them need not be in memory at once
        groups = {}  # size: positions in `keys`
        for i, (index, _) in enumerate(keys):
            groups.setdefault(dataset.target_sizes[index], []).append(i)
        conditions = {}
        for group, positions in enumerate(groups.values()):
            images = None
            for row, i in enumerate(positions):
                image, conditions[i] = image_and_conditions(dataset, keys[i])
                if images is None:
                    images = np.lib.format.open_memmap(os.path.join(job_dir, f"images_{group}.npy"), "w+",
                                                       np.float32, (len(positions),) + image.shape)
                images[row] = image
            images.flush()
            del images
        weights = {name: param.asnumpy() for name, param in autoencoder.parameters_and_names()
                   if name.startswith(ENCODER_PARTS)}
        save_file(weights, os.path.join(job_dir, "encoder.safetensors"))
        job = dict(autoencoder=autoencoder.init_args, dtype=str(autoencoder.dtype).lower(),
                   device_target=ms.get_context("device_target"), ms_mode=ms.get_context("mode"), progress=progress,
                   groups=len(groups), images=len(keys))
        code = run_encode_job(job_dir, job)
        if code != 0 and job["ms_mode"] == ms.GRAPH_MODE:
            # The encoder's graph plans every activation of an image at once (the full-size VAE at 1024 px: 11.3 GB
            # beside the training process's weights); PyNative keeps only the live ones (7.1 GB), at about twice
            # the time per image.
            print("Encoding the training images again, in PyNative mode (graph mode ran out of memory or failed)",
                  file=sys.stderr)
            code = run_encode_job(job_dir, dict(job, ms_mode=ms.PYNATIVE_MODE))
        if code != 0:
            reason = "killed: out of memory?" if code == -9 else f"exit code {code}"
            raise RuntimeError(f"encoding the training images failed in the child process ({reason}); "
                               "--cache_latents False encodes them in the training process instead, step by step")
        cache = {}
        for group, positions in enumerate(groups.values()):
            moments = np.load(os.path.join(job_dir, f"moments_{group}.npy"))
            cache.update({keys[i]: (moments[row], conditions[i]) for row, i in enumerate(positions)})
    return cache


def run_encode_job(job_dir, job):
    """Run `encode_job` on `job` in a child process; its exit code."""
    with open(os.path.join(job_dir, "job.json"), "w", encoding="utf-8") as f:
        json.dump(job, f)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env = child_env("latent_encoder", env)  # its graphs numbered apart from the parent's in the compile cache
    return subprocess.run([sys.executable, "-m", "gm.textual_inversion.latent_cache", job_dir], env=env).returncode


def encode_job(job_dir):
    """The child's side: build the encoder from `job.json`, load `encoder.safetensors`, encode each
    `images_<group>.npy` one image at a time, write `moments_<group>.npy`."""
    from mindspore.nn.utils import no_init_parameters
    from safetensors.numpy import load_file

    from gm.device import set_device
    from gm.models.autoencoder import AutoencoderKL

    with open(os.path.join(job_dir, "job.json"), encoding="utf-8") as f:
        job = json.load(f)
    set_device(job["device_target"], job["ms_mode"])
    with no_init_parameters():  # the decoder's parameters are never allocated
        autoencoder = AutoencoderKL(**job["autoencoder"], dtype=getattr(ms, job["dtype"]))
    params = dict(autoencoder.parameters_and_names())
    for name, value in load_file(os.path.join(job_dir, "encoder.safetensors")).items():
        params[name].set_data(Tensor(value, dtype=params[name].dtype))
    with tqdm(total=job["images"], desc="Caching VAE latents", unit="image", disable=not job["progress"]) as bar:
        for group in range(job["groups"]):  # one graph per image size
            moments = []
            for image in np.load(os.path.join(job_dir, f"images_{group}.npy"), mmap_mode="r"):
                moments.append(autoencoder.encode_moments(Tensor(np.array(image[None]), ms.float32)).asnumpy()[0])
                bar.update()
            np.save(os.path.join(job_dir, "moments.tmp.npy"), np.stack(moments))
            os.replace(os.path.join(job_dir, "moments.tmp.npy"), os.path.join(job_dir, f"moments_{group}.npy"))


if __name__ == "__main__":
    encode_job(sys.argv[1])
