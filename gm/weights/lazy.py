"""Tensors of a weight file that are read only when asked for.

The diffusers key mappings (`gm.weights.diffusers_*`) run over a whole component at once; given `LazyTensor`s
they build the mapped component without reading any data, and the loader then reads, converts and stores one
tensor at a time, so no second copy of the model is ever held.
"""
import numpy as np


class LazyTensor:
    """A tensor known by its shape, whose values `load()` reads. Supports what the key mappings do to values:
    transposing (`.T`), indexing (`[:, :, None, None]`) and `concatenate`."""

    def __init__(self, shape, load):
        self.shape = tuple(shape)
        self._load = load

    def load(self):
        return self._load()

    @property
    def T(self):
        return LazyTensor(self.shape[::-1], lambda: self.load().T)

    def __getitem__(self, index):
        shape = np.broadcast_to(np.zeros((), np.uint8), self.shape)[index].shape  # the result's shape, no data
        return LazyTensor(shape, lambda: self.load()[index])


def concatenate(parts):
    """np.concatenate along axis 0, deferred when the parts are LazyTensors."""
    if isinstance(parts[0], LazyTensor):
        shape = (sum(p.shape[0] for p in parts),) + parts[0].shape[1:]
        return LazyTensor(shape, lambda: np.concatenate([p.load() for p in parts], axis=0))
    return np.concatenate(parts, axis=0)


def load(value):
    """The array of a mapped value (a LazyTensor, or already an array)."""
    return value.load() if isinstance(value, LazyTensor) else value
