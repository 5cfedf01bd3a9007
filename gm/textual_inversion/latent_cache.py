"""VAE latents of the training images.

Textual inversion never changes the VAE, so by default each training image (and its mirrored variant, when
flips are on) is encoded once, before training; a step then samples its latent from the cached posterior
N(mean, std^2) with fresh noise, exactly what encoding the image anew each step would give, and the VAE
encoder is released (deleted from the autoencoder; the decoder stays for sampling). With caching off, images
are encoded when drawn (the diffusers script's way).
"""
import numpy as np
from tqdm import tqdm

import mindspore as ms
from mindspore import Tensor

from gm.util import release_free_memory


class TrainingLatents:
    """Posterior moments [2C, h, w] (means, then log-variances) and size conditioning per (index, flipped).

    With `cache`, every (index, flipped) of `variants` is encoded now and `autoencoder.encoder` is deleted.
    """

    def __init__(self, autoencoder, dataset, variants=(False,), cache=True, progress=True):
        self.autoencoder, self.dataset = autoencoder, dataset
        self.cache = {}
        if cache:
            keys = [(i, flipped) for i in range(len(dataset)) for flipped in variants]
            for key in tqdm(keys, desc="Caching VAE latents", unit="image", disable=not progress):
                self.cache[key] = self._encode(key)
            del autoencoder.encoder  # never needed again: free its memory before training
            self.autoencoder = None
            release_free_memory()  # what compiling the encoder's graph freed, before the train step compiles

    def _encode(self, key):
        example = self.dataset.variant(key[0], flipped=key[1])
        image = Tensor(example.pop("jpg")[None], ms.float32)
        return self.autoencoder.encode_moments(image).asnumpy()[0], example

    def batch(self, keys):
        """{"moments": [B, 2C, h, w], size conditioning [B, 2] arrays} for `keys`."""
        entries = [self.cache[k] if k in self.cache else self._encode(k) for k in keys]
        batch = {"moments": np.stack([moments for moments, _ in entries])}
        for name in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"):
            batch[name] = np.array([cond[name] for _, cond in entries], np.int64)
        return batch
