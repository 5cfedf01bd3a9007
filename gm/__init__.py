"""gm: SDXL on MindSpore (UNet, VAE, both CLIP text encoders, samplers) and its textual-inversion machinery."""
__version__ = "0.6.0"
