"""Guidance: how a sampler batches its denoiser call (`prepare_inputs`) and combines the outputs (`__call__`).
Host-side code, run once per sampling step around the graph-compiled denoiser."""
from mindspore import ops

# conditioning entries that are per sample and differ between the conditional and unconditional batch
BATCHED_COND_KEYS = ("vector", "crossattn", "concat")


class IdentityGuider:
    def __call__(self, x, sigma):
        return x

    def prepare_inputs(self, x, s, c, uc):
        return x, s, dict(c)


class VanillaCFG:
    """Classifier-free guidance (Ho & Salimans 2022): D = D_uc + scale (D_c - D_uc), both halves in one batch."""

    def __init__(self, scale):
        self.scale = scale

    def __call__(self, x, sigma):
        half = x.shape[0] // 2
        x_u, x_c = x[:half], x[half:]
        return x_u + self.scale * (x_c - x_u)

    def prepare_inputs(self, x, s, c, uc):
        c_out = {}
        for k in c:
            c_out[k] = ops.cat((uc[k], c[k]), 0) if k in BATCHED_COND_KEYS else c[k]
        return ops.cat((x, x), 0), ops.cat((s, s), 0), c_out
