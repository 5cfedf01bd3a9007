"""SDXL's KL-regularised autoencoder (sgm's `AutoencoderKL`): images <-> 4-channel latents at 1/8 size.

In graph mode the encoder and decoder are compiled as separate cells, the first time each is called, so
sampling can decode and training can encode without building the other half's graph. `encode_moments`,
`encode_mean` and `decode` are plain code, so a caller's `construct` may also inline them into its own
graph. (Not `ms.jit` methods: MindSpore 2.10 folds a jitted method's parameters into the graph as
constants, so weights loaded after the first call would be ignored.) They take and return fp32; `dtype`
is only the compute precision inside. The latent scale factor (0.13025) belongs to the diffusion engine.
"""
import mindspore as ms
from mindspore import nn, ops

from gm.modules.diffusionmodules.model import Decoder, Encoder
from gm.modules.layers import Conv2d


def posterior(moments):
    """The encoder's moments [B, 2C, h, w] (means, then log-variances) -> (mean, clamped log-variance, std) of
    the posterior N(mean, std^2). Plain code: graphs (the train step, the pretraining tool's VAE loss) inline it."""
    channels = moments.shape[1] // 2
    logvar = ops.clamp(moments[:, channels:], -30.0, 20.0)
    return moments[:, :channels], logvar, ops.exp(0.5 * logvar)


def posterior_sample(moments, noise):
    """mean + std * noise: a draw from the posterior of `moments`, `noise` ~ N(0, I) shaped like the mean."""
    mean, _, std = posterior(moments)
    return mean + std * noise


class DiagonalGaussianDistribution:
    """The posterior N(mean, std^2) given the encoder's moments [B, 2C, h, w] (means, then log-variances)."""

    def __init__(self, moments):
        self.moments = moments
        self.mean, _, self.std = posterior(moments)

    def sample(self, noise):
        """A draw with `noise` ~ N(0, I) shaped like the mean (passed in for reproducibility)."""
        return posterior_sample(self.moments, noise)


class AutoencoderKL(nn.Cell):
    """Parameters `encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`: the checkpoint's
    `first_stage_model.*` keys without the prefix."""

    def __init__(self, embed_dim, ddconfig, conv_impl=None, attn_impl=None, dtype=ms.float32):
        super().__init__()
        self.embed_dim = embed_dim
        self.dtype = dtype
        # how to build it again (latent caching rebuilds the encoder in a child process); the VAE computes in fp32
        self.init_args = dict(embed_dim=embed_dim, ddconfig=dict(ddconfig), conv_impl=conv_impl, attn_impl=attn_impl)
        self.encoder = Encoder(**ddconfig, conv_impl=conv_impl, attn_impl=attn_impl)
        self.decoder = Decoder(**ddconfig, conv_impl=conv_impl, attn_impl=attn_impl)
        moments = 2 if ddconfig.get("double_z", True) else 1
        self.quant_conv = Conv2d(moments * ddconfig["z_channels"], moments * embed_dim, 1, impl=conv_impl)
        self.post_quant_conv = Conv2d(embed_dim, ddconfig["z_channels"], 1, impl=conv_impl)

    def encode_moments(self, x):
        """Image [B, 3, H, W] in [-1, 1] -> posterior moments [B, 2*embed_dim, H/8, W/8]."""
        moments = self.quant_conv(self.encoder(x.astype(self.dtype)))
        return moments.astype(ms.float32)

    def encode_mean(self, x):
        """Image -> posterior mean [B, embed_dim, H/8, W/8] (the deterministic latent)."""
        return self.encode_moments(x)[:, :self.embed_dim]

    def encode(self, x):
        """Image -> DiagonalGaussianDistribution (outside a graph: the class is plain Python)."""
        return DiagonalGaussianDistribution(self.encode_moments(x))

    def decode(self, z):
        """Unscaled latent [B, embed_dim, h, w] -> image [B, 3, 8h, 8w], roughly in [-1, 1]."""
        dec = self.decoder(self.post_quant_conv(z.astype(self.dtype)))
        return dec.astype(ms.float32)

    def construct(self, x):
        """Reconstruction through the posterior mean."""
        return self.decode(self.encode_mean(x))
