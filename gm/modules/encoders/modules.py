"""sgm's conditioning embedders for SDXL and the `GeneralConditioner` that runs them.

MindSpore graphs take tensors, not strings, so each embedder splits into a host-side `preprocess(value)`
(tokenization, array conversion) and a graph-mode `construct(tensor)`; the conditioner does the same with
`tokenize(batch)` and `construct(*inputs)`.
"""
import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

from gm.modules.encoders.clip import CONTEXT_LENGTH, CLIPTextModel, OpenCLIPTextModel, pool_at_eos
from gm.modules.encoders.tokenizer import bigg_tokenizer, vit_l_tokenizer
from gm.modules.layers import timestep_embedding
from gm.util import instantiate_from_config

TEXT_ENCODERS = ("clip_l", "clip_g")  # SDXL's text encoders in config order, named as embedding files name them


class AbstractEmbModel(nn.Cell):
    """An embedder of one batch entry (`input_key`); `is_trainable` is set by the conditioner from its config."""

    def __init__(self):
        super().__init__()
        self.is_trainable = False
        self.input_key = None

    def preprocess(self, value):
        """Host side: one batch entry -> the Tensor `construct` takes."""
        raise NotImplementedError


class TextEmbedder(AbstractEmbModel):
    """A CLIP text encoder with its tokenizer; both know the textual-inversion tokens added with `add_tokens`."""

    def preprocess(self, texts):
        return Tensor(self.tokenizer(texts), ms.int32)

    def add_tokens(self, tokens, initial_rows):
        """Add placeholder tokens to the tokenizer and their rows [n, width] to the token table; returns their ids.

        Add before the model is compiled (see `TokenEmbedding`).
        """
        tokens, initial_rows = list(tokens), np.asarray(initial_rows, np.float32)
        if initial_rows.shape[0] != len(tokens):
            raise ValueError(f"{len(tokens)} tokens but {initial_rows.shape[0]} initial rows")
        table = self.token_embedding
        if len(self.tokenizer) != table.vocab_size + table.num_new_tokens:
            raise RuntimeError("tokenizer and token table disagree on the number of added tokens")
        ids = self.tokenizer.add_tokens(tokens)
        table.add_new_tokens(initial_rows)
        return ids


class FrozenCLIPEmbedder(TextEmbedder):
    """CLIP ViT-L/14 text encoder (sgm's HF-based embedder): tokens [B, 77] -> [B, 77, width].

    layer: "last" (final hidden state, normed), "pooled" (normed state at EOS, [B, 1, width]) or "hidden"
    (HF's `hidden_states[layer_idx]`: the state after `layer_idx` layers, no final norm; SDXL uses 11 of 12).
    tokenizer_path: a Hugging Face tokenizer folder (e.g. diffusers' `tokenizer/`); default: the bundled BPE.
    """

    LAYERS = ("last", "pooled", "hidden")

    def __init__(self, layer="last", layer_idx=None, width=768, layers=12, heads=12, max_length=CONTEXT_LENGTH,
                 tokenizer_path=None, attn_impl=None, dtype=ms.float32, use_recompute=False):
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        if layer == "hidden" and (layer_idx is None or abs(layer_idx) > layers):
            raise ValueError(f"layer 'hidden' needs 0 <= |layer_idx| <= {layers}, got {layer_idx}")
        self.layer = layer
        # hidden_states has layers + 1 entries (the embeddings first): index it like a Python list
        self.layer_idx = layers if layer != "hidden" else layer_idx % (layers + 1)
        self.tokenizer = vit_l_tokenizer(tokenizer_path, max_length)
        self.transformer = CLIPTextModel(width, layers, heads, max_length=max_length, attn_impl=attn_impl,
                                         dtype=dtype, use_recompute=use_recompute)

    @property
    def token_embedding(self):
        return self.transformer.token_embedding

    def construct(self, tokens):
        z = self.transformer(tokens, self.layer_idx)
        if self.layer == "hidden":
            return z
        z = self.transformer.final_norm(z)
        if self.layer == "pooled":
            return pool_at_eos(z, tokens).expand_dims(1)
        return z


class FrozenOpenCLIPEmbedder2(TextEmbedder):
    """OpenCLIP ViT-bigG/14 text encoder (sgm's embedder of the same name): tokens [B, 77] -> [B, 77, width].

    layer: "last" or "penultimate" hidden state. legacy=True passes it through `ln_final`; legacy=False returns
    it as is and, with always_return_pooled, also the projected text embedding [B, embed_dim] read at the EOS
    token (SDXL: penultimate, pooled, not legacy).
    tokenizer_path: a Hugging Face tokenizer folder (e.g. diffusers' `tokenizer_2/`); default: the bundled BPE.
    """

    LAYERS = ("last", "penultimate")

    def __init__(self, layer="last", always_return_pooled=False, legacy=True, width=1280, layers=32, heads=20,
                 embed_dim=1280, max_length=CONTEXT_LENGTH, tokenizer_path=None, attn_impl=None, dtype=ms.float32,
                 use_recompute=False):
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        if always_return_pooled and legacy:
            raise ValueError("always_return_pooled needs legacy=False (as in sgm)")
        self.layer, self.return_pooled, self.legacy = layer, always_return_pooled, legacy
        self.tokenizer = bigg_tokenizer(tokenizer_path, max_length)
        self.model = OpenCLIPTextModel(width, layers, heads, embed_dim, max_length=max_length, attn_impl=attn_impl,
                                       dtype=dtype, use_recompute=use_recompute)

    @property
    def token_embedding(self):
        return self.model.token_embedding

    def construct(self, tokens):
        penultimate, last = self.model(tokens)
        z = penultimate if self.layer == "penultimate" else last
        if self.legacy:
            return self.model.ln_final(z)
        if self.return_pooled:
            return z, self.model.pool(last, tokens)
        return z


class ConcatTimestepEmbedderND(AbstractEmbModel):
    """[B, n] scalars (e.g. SDXL's image sizes and crop) -> [B, n * outdim]: each embedded sinusoidally."""

    def __init__(self, outdim):
        super().__init__()
        self.outdim = outdim

    def preprocess(self, value):
        value = np.asarray(value, np.float32)
        return Tensor(value[:, None] if value.ndim == 1 else value)

    def construct(self, x):
        b, n = x.shape
        return timestep_embedding(x.reshape(-1), self.outdim).reshape(b, n * self.outdim)


class GeneralConditioner(nn.Cell):
    """Runs the embedders of `emb_models` (sgm config entries: target, params, is_trainable, input_key).

    Outputs are grouped by rank as in sgm and concatenated in config order: [B, L, d] ones along the last axis
    into "crossattn", [B, d] ones into "vector". Non-trainable embedders are frozen (`requires_grad=False`);
    gradients still flow through them to inputs such as textual-inversion rows.

    Host side `tokenize(batch)` -> inputs; graph side `construct(*inputs)` -> (crossattn, vector).
    """

    def __init__(self, emb_models):
        super().__init__()
        embedders = []
        for config in emb_models:
            embedder = instantiate_from_config(config)
            if not isinstance(embedder, AbstractEmbModel):
                raise TypeError(f"embedder {type(embedder).__name__} must inherit from AbstractEmbModel")
            if config.get("ucg_rate", 0.0) or config.get("legacy_ucg_value", None) is not None:
                raise NotImplementedError("embedder dropout (ucg_rate, legacy_ucg_value) is not supported")
            if "input_key" not in config:
                raise KeyError(f"embedder {type(embedder).__name__} needs an 'input_key'")
            embedder.input_key = config["input_key"]
            embedder.is_trainable = bool(config.get("is_trainable", False))
            if not embedder.is_trainable:
                for param in embedder.get_parameters():
                    param.requires_grad = False
            embedders.append(embedder)
        self.embedders = nn.CellList(embedders)

    def text_embedders(self):
        """The embedders that read the prompt (and can learn new tokens), in config order."""
        return [self.embedders[i] for i in range(len(self.embedders)) if isinstance(self.embedders[i], TextEmbedder)]

    def learned_rows(self):
        """The learned rows of added tokens, one Parameter (`new_embeddings`) per text encoder that has any."""
        return [e.token_embedding.new_embeddings for e in self.text_embedders()
                if e.token_embedding.new_embeddings is not None]

    def tokenize(self, batch, force_zero_embeddings=None):
        """Host side: batch dict -> (one Tensor per embedder ..., keep [B, n_embedders] float32).

        batch: "txt" list of str ("txt_clip_l" / "txt_clip_g", if there, instead for that text encoder);
        "original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple" [B, 2] arrays (the keys the config
        names). Embedders whose input key is in `force_zero_embeddings`
        (sgm's argument, e.g. ["txt"] for SDXL's empty negative prompt) get keep = 0: their outputs become zeros.
        Rows of several tokenized batches may be concatenated (keep is per sample).
        """
        force = set(force_zero_embeddings or ())
        text_embedders = self.text_embedders()
        inputs = []
        for embedder in self.embedders:
            value = batch[embedder.input_key]
            if embedder in text_embedders:  # a text encoder's own prompts: "txt_clip_l", "txt_clip_g"
                value = batch.get(f"{embedder.input_key}_{TEXT_ENCODERS[text_embedders.index(embedder)]}", value)
            inputs.append(embedder.preprocess(value))
        sizes = {x.shape[0] for x in inputs}
        if len(sizes) != 1:
            raise ValueError(f"batch entries disagree on the batch size: {sizes}")
        keep = np.ones((sizes.pop(), len(self.embedders)), np.float32)
        for i, embedder in enumerate(self.embedders):
            if embedder.input_key in force:
                keep[:, i] = 0.0
        return tuple(inputs) + (Tensor(keep),)

    def construct(self, *inputs):
        """inputs from `tokenize` -> (crossattn [B, L, sum of widths], vector [B, sum of dims]), float32."""
        keep = inputs[-1]
        crossattn, vector = [], []
        for i, embedder in enumerate(self.embedders):
            outputs = embedder(inputs[i])
            if not isinstance(outputs, tuple):
                outputs = (outputs,)
            for emb in outputs:
                scale = keep[:, i : i + 1]
                if emb.ndim == 3:
                    crossattn.append(emb.astype(ms.float32) * scale.expand_dims(-1))
                else:
                    vector.append(emb.astype(ms.float32) * scale)
        return ops.cat(crossattn, -1), ops.cat(vector, -1)

    def encode(self, batch, force_zero_embeddings=None):
        """Host-side convenience: batch -> {"crossattn": Tensor, "vector": Tensor} (sgm's conditioning dict)."""
        crossattn, vector = self(*self.tokenize(batch, force_zero_embeddings))
        return {"crossattn": crossattn, "vector": vector}

    def get_unconditional_conditioning(self, batch_c, batch_uc=None, force_uc_zero_embeddings=None,
                                       force_cond_zero_embeddings=None):
        """(c, uc) conditioning dicts, as sgm: uc from `batch_uc` (default `batch_c`) with the given keys zeroed."""
        c = self.encode(batch_c, force_cond_zero_embeddings)
        uc = self.encode(batch_c if batch_uc is None else batch_uc, force_uc_zero_embeddings)
        return c, uc
