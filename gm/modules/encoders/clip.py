"""The two CLIP text transformers of SDXL, with the parameter names of the original checkpoint.

- `CLIPTextModel`: CLIP ViT-L/14's text tower under Hugging Face transformers' names
  (`text_model.embeddings.token_embedding.weight`, `text_model.encoder.layers.N.self_attn.q_proj` ...),
  quick-GELU MLPs; sgm stores it as `conditioner.embedders.0.transformer.`.
- `OpenCLIPTextModel`: OpenCLIP ViT-bigG/14's text tower under open_clip's names (`token_embedding.weight`,
  `positional_embedding`, `transformer.resblocks.N.attn.in_proj_weight` ..., `ln_final`, `text_projection`),
  exact-GELU MLPs; sgm stores it as `conditioner.embedders.1.model.`.

Both are pre-norm transformers with a causal mask. Their token tables are `TokenEmbedding`s, which keep the
49,408 original rows frozen and hold textual-inversion tokens (ids 49,408 and up) in a separate, small,
trainable parameter.
"""
import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from gm.modules.encoders.tokenizer import CONTEXT_LENGTH, EOS_TOKEN_ID, VOCAB_SIZE
from gm.modules.layers import LayerNorm, Linear, attention, default_attention_impl, gelu, linear


class Embedding(nn.Cell):
    """A lookup table with torch's parameter name: `weight` [num_embeddings, dim]."""

    def __init__(self, num_embeddings, dim, std=0.02):
        super().__init__()
        self.weight = Parameter(initializer(Normal(std), (num_embeddings, dim), ms.float32), name="weight")

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


class TokenEmbedding(Embedding):
    """CLIP's token table, frozen, plus the learned rows of tokens added by textual inversion.

    `weight` [49408, d] is the checkpoint's table and never trains (`requires_grad=False`). The learned rows, added
    with `add_new_tokens`, live in the Parameter `new_embeddings` [n, d] (a name no checkpoint uses) and serve ids
    49408 ... 49408+n-1, so a gradient reaches only those n rows, never a dense [49408, d] one.

    Adding rows changes the graph: add them before the model is first called (compiled) and before an optimizer
    is built over `new_embeddings`. Afterwards `set_learned_rows` may overwrite their values at any time.
    """

    def __init__(self, vocab_size=VOCAB_SIZE, dim=768, std=0.02):
        super().__init__(vocab_size, dim, std)
        self.vocab_size = vocab_size
        self.weight.requires_grad = False
        self.new_embeddings = None

    @property
    def num_new_tokens(self):
        return 0 if self.new_embeddings is None else self.new_embeddings.shape[0]

    def add_new_tokens(self, initial_rows):
        """Append rows [n, d] for n new tokens; returns their ids (consecutive, after any added before)."""
        initial_rows = np.asarray(initial_rows, np.float32)
        dim = self.weight.shape[1]
        if initial_rows.ndim != 2 or initial_rows.shape[1] != dim:
            raise ValueError(f"learned rows must have shape [n, {dim}], got {initial_rows.shape}")
        first = self.vocab_size + self.num_new_tokens
        rows = initial_rows if self.new_embeddings is None else np.concatenate([self.get_learned_rows(), initial_rows])
        # Named after the table (its full path once inside a model), so optimizer states and saved files do not
        # confuse the two text encoders' rows.
        name = self.weight.name[: -len("weight")] + "new_embeddings"
        self.new_embeddings = Parameter(Tensor(rows, ms.float32), name=name, requires_grad=True)
        return list(range(first, first + len(initial_rows)))

    def get_learned_rows(self):
        """The learned rows as a float32 array [n, d] (empty [0, d] when there are none)."""
        if self.new_embeddings is None:
            return np.zeros((0, self.weight.shape[1]), np.float32)
        return self.new_embeddings.asnumpy().astype(np.float32)

    def set_learned_rows(self, rows):
        """Overwrite the learned rows in place (same shape [n, d]).

        Written into the Parameter's own buffer (`ops.assign`), which graphs compiled before keep reading;
        `set_data` would give it a new buffer that such a graph may no longer see."""
        rows = np.asarray(rows, np.float32)
        if rows.shape != (self.num_new_tokens, self.weight.shape[1]):
            raise ValueError(f"expected rows of shape {(self.num_new_tokens, self.weight.shape[1])}, got {rows.shape}")
        ops.assign(self.new_embeddings, Tensor(rows, self.new_embeddings.dtype))

    def construct(self, ids):
        """ids [B, L] int -> float32 [B, L, d]."""
        if self.new_embeddings is None:
            # no clipping: an id past the table fails loudly instead of reading a wrong row
            return ops.gather(self.weight, ids, 0).astype(ms.float32)
        old = ops.gather(self.weight, ops.minimum(ids, self.vocab_size - 1), 0).astype(ms.float32)
        new = ops.gather(self.new_embeddings, ops.maximum(ids - self.vocab_size, 0), 0)
        return ops.where((ids >= self.vocab_size).expand_dims(-1), new, old)


def causal_mask(length):
    """Additive mask [1, 1, L, L]: position i attends to positions <= i."""
    return Tensor(np.triu(np.full((length, length), -np.inf, np.float32), 1)[None, None])


def pool_at_eos(x, input_ids, eos_token_id=EOS_TOKEN_ID):
    """x [B, L, d] at each sequence's first `eos_token_id` -> [B, d].

    Not `argmax(input_ids)`, the usual shortcut: it finds EOS only while EOS is the largest id, which stops
    being true once textual-inversion tokens (ids >= 49408) are in the prompt.
    """
    is_eos = (input_ids == eos_token_id).astype(ms.int32)
    first = is_eos * (ops.cumsum(is_eos, 1) == 1).astype(ms.int32)  # one-hot at the first EOS
    return (x * first.expand_dims(-1).astype(x.dtype)).sum(1)


def quick_gelu(x):
    return x * ops.sigmoid(1.702 * x)


# ----------------------------------------------------------------------------------- ViT-L/14, HF names


class CLIPTextEmbeddings(nn.Cell):
    def __init__(self, width, vocab_size=VOCAB_SIZE, max_length=CONTEXT_LENGTH):
        super().__init__()
        self.token_embedding = TokenEmbedding(vocab_size, width)
        self.position_embedding = Embedding(max_length, width, std=0.01)

    def construct(self, input_ids):
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]].astype(ms.float32)


class CLIPAttention(nn.Cell):
    def __init__(self, width, heads, attn_impl):
        super().__init__()
        self.heads, self.attn_impl = heads, attn_impl
        self.q_proj = Linear(width, width)
        self.k_proj = Linear(width, width)
        self.v_proj = Linear(width, width)
        self.out_proj = Linear(width, width)

    def construct(self, x, mask):
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, self.attn_impl, mask)
        return self.out_proj(out)


class CLIPMLP(nn.Cell):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = Linear(width, hidden)
        self.fc2 = Linear(hidden, width)

    def construct(self, x):
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(nn.Cell):
    def __init__(self, width, heads, mlp_ratio, attn_impl):
        super().__init__()
        self.self_attn = CLIPAttention(width, heads, attn_impl)
        self.layer_norm1 = LayerNorm(width)
        self.mlp = CLIPMLP(width, width * mlp_ratio)
        self.layer_norm2 = LayerNorm(width)

    def construct(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Cell):
    def __init__(self, width, layers, heads, mlp_ratio, attn_impl):
        super().__init__()
        self.layers = nn.CellList([CLIPEncoderLayer(width, heads, mlp_ratio, attn_impl) for _ in range(layers)])


class CLIPTextTransformer(nn.Cell):
    def __init__(self, width, layers, heads, mlp_ratio, max_length, attn_impl):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(width, max_length=max_length)
        self.encoder = CLIPEncoder(width, layers, heads, mlp_ratio, attn_impl)
        self.final_layer_norm = LayerNorm(width)


class CLIPTextModel(nn.Cell):
    """CLIP ViT-L/14 text tower (transformers' `CLIPTextModel` names).

    `construct(input_ids, num_layers)` -> the hidden state after the first `num_layers` layers (HF's
    `hidden_states[num_layers]`), without the final norm; layers after it are not run.
    """

    def __init__(self, width=768, layers=12, heads=12, mlp_ratio=4, max_length=CONTEXT_LENGTH, attn_impl=None,
                 dtype=ms.float32, use_recompute=False):
        super().__init__()
        self.num_layers, self.dtype = layers, dtype
        self.text_model = CLIPTextTransformer(width, layers, heads, mlp_ratio, max_length,
                                              attn_impl or default_attention_impl())
        self.mask = causal_mask(max_length)
        if use_recompute:
            for layer in self.text_model.encoder.layers:
                layer.recompute()

    @property
    def token_embedding(self):
        return self.text_model.embeddings.token_embedding

    def construct(self, input_ids, num_layers):
        x = self.text_model.embeddings(input_ids).astype(self.dtype)
        mask = self.mask[:, :, : input_ids.shape[1], : input_ids.shape[1]]
        for i, layer in enumerate(self.text_model.encoder.layers):
            if i < num_layers:
                x = layer(x, mask)
        return x

    def final_norm(self, x):
        return self.text_model.final_layer_norm(x)


# ------------------------------------------------------------------------------ ViT-bigG/14, open_clip names


class MultiheadAttention(nn.Cell):
    """torch.nn.MultiheadAttention's parameters: in_proj_weight [3w, w] (q, k, v stacked), in_proj_bias, out_proj."""

    def __init__(self, width, heads, attn_impl):
        super().__init__()
        self.heads, self.attn_impl = heads, attn_impl
        self.in_proj_weight = Parameter(initializer(Normal(width ** -0.5), (3 * width, width), ms.float32),
                                        name="in_proj_weight")
        self.in_proj_bias = Parameter(ops.zeros((3 * width,), ms.float32), name="in_proj_bias")
        self.out_proj = Linear(width, width)

    def construct(self, x, mask):
        qkv = linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = ops.split(qkv, qkv.shape[-1] // 3, -1)
        return self.out_proj(attention(q, k, v, self.heads, self.attn_impl, mask))


class MLP(nn.Cell):
    def __init__(self, width, hidden):
        super().__init__()
        self.c_fc = Linear(width, hidden)
        self.c_proj = Linear(hidden, width)

    def construct(self, x):
        return self.c_proj(gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Cell):
    def __init__(self, width, heads, mlp_ratio, attn_impl):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = MultiheadAttention(width, heads, attn_impl)
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width, width * mlp_ratio)

    def construct(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Cell):
    def __init__(self, width, layers, heads, mlp_ratio, attn_impl):
        super().__init__()
        self.resblocks = nn.CellList([ResidualAttentionBlock(width, heads, mlp_ratio, attn_impl) for _ in range(layers)])


class OpenCLIPTextModel(nn.Cell):
    """OpenCLIP ViT-bigG/14 text tower (open_clip's names; the image tower and `logit_scale` are left out).

    `construct(input_ids)` -> (penultimate, last): hidden states after all layers but the last and after all
    layers, neither passed through `ln_final`.
    """

    def __init__(self, width=1280, layers=32, heads=20, embed_dim=1280, mlp_ratio=4, max_length=CONTEXT_LENGTH,
                 attn_impl=None, dtype=ms.float32, use_recompute=False):
        super().__init__()
        self.dtype = dtype
        self.token_embedding = TokenEmbedding(VOCAB_SIZE, width)
        self.positional_embedding = Parameter(initializer(Normal(0.01), (max_length, width), ms.float32),
                                              name="positional_embedding")
        self.transformer = Transformer(width, layers, heads, mlp_ratio, attn_impl or default_attention_impl())
        self.ln_final = LayerNorm(width)
        self.text_projection = Parameter(initializer(Normal(width ** -0.5), (width, embed_dim), ms.float32),
                                         name="text_projection")
        self.mask = causal_mask(max_length)
        if use_recompute:
            for block in self.transformer.resblocks:
                block.recompute()

    def construct(self, input_ids):
        length = input_ids.shape[1]
        x = (self.token_embedding(input_ids) + self.positional_embedding[:length].astype(ms.float32)).astype(self.dtype)
        mask = self.mask[:, :, :length, :length]
        penultimate = x
        for block in self.transformer.resblocks:
            penultimate = x
            x = block(x, mask)
        return penultimate, x

    def pool(self, last, input_ids):
        """ln_final(last) at the EOS position, projected: the text embedding [B, embed_dim]."""
        x = pool_at_eos(self.ln_final(last), input_ids)
        return ops.matmul(x, self.text_projection.astype(x.dtype))
