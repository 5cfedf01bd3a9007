"""Placeholder tokens of textual inversion, shared by training and sampling.

A learned word `<tok>` with n vectors is n new tokens `<tok>`, `<tok>_1`, ..., `<tok>_{n-1}` (diffusers'
naming) in both SDXL text encoders, each with a learned row in their token tables (`TokenEmbedding`); a prompt
that says `<tok>` is expanded to all n before tokenization. The trainer, the benchmark and the pipeline add
tokens and write their rows through these functions only.
"""
import re

import numpy as np


class PlaceholderError(ValueError):
    """A placeholder or initializer word that cannot be used; the message says why."""


def placeholder_tokens(token, num_vectors):
    """[token, token_1, ..., token_{num_vectors-1}]."""
    if not token or re.search(r"\s", token):
        raise ValueError(f"a placeholder token must be a non-empty string without spaces, got {token!r}")
    if num_vectors < 1:
        raise ValueError(f"num_vectors must be at least 1, got {num_vectors}")
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def _placeholder_pattern(tokens):
    """A regex of whole `tokens`, case-insensitive as the tokenizers lower-case prompts; longest first, so that
    with "<cat>" and "<cat>2", "a <cat>2" matches "<cat>2", never "<cat>" followed by "2"."""
    alternatives = []
    for token in sorted(tokens, key=len, reverse=True):
        # a token that begins or ends with a word character must not sit inside a longer word there
        start = r"(?<!\w)" if re.match(r"\w", token) else ""
        end = r"(?!\w)" if re.search(r"\w$", token) else ""
        alternatives.append(start + re.escape(token) + end)
    return re.compile("|".join(alternatives), re.IGNORECASE)


def expand_placeholders(prompt, num_vectors):
    """Replace each placeholder of `num_vectors` ({token: n}) in `prompt` by its n tokens joined by spaces
    (whole tokens only, see `_placeholder_pattern`)."""
    if not num_vectors:
        return prompt
    by_lower = {token.lower(): token for token in num_vectors}

    def expand(match):
        token = by_lower[match.group(0).lower()]
        return " ".join(placeholder_tokens(token, num_vectors[token]))

    return _placeholder_pattern(num_vectors).sub(expand, prompt)


def find_placeholders(prompt, tokens):
    """The placeholders of `tokens` that `prompt` uses, as given in `tokens`, in order of first use."""
    if not tokens:
        return []
    by_lower = {token.lower(): token for token in tokens}
    found = [by_lower[match.lower()] for match in _placeholder_pattern(tokens).findall(prompt)]
    return list(dict.fromkeys(found))


def add_placeholder_tokens(conditioner, token, rows_l, rows_g):
    """Add the n tokens of `token` to both text embedders with initial rows [n, d1] (ViT-L) and [n, d2] (bigG).

    Returns (ids_l, ids_g). Everything is checked before either embedder changes. Call it before the model is
    first compiled: new rows change the text encoders' graphs.
    """
    embedders = conditioner.text_embedders()
    if len(embedders) != 2:
        raise ValueError(f"expected the two SDXL text embedders, found {len(embedders)}")
    rows = [np.asarray(rows_l, np.float32), np.asarray(rows_g, np.float32)]
    if rows[0].ndim != 2 or rows[1].ndim != 2 or rows[0].shape[0] != rows[1].shape[0]:
        raise ValueError(f"rows must be [n, d1] and [n, d2] with the same n, got {rows[0].shape} and {rows[1].shape}")
    tokens = placeholder_tokens(token, rows[0].shape[0])
    for embedder, value in zip(embedders, rows):
        width = embedder.token_embedding.weight.shape[1]
        if value.shape[1] != width:
            raise ValueError(f"rows of width {value.shape[1]} for {type(embedder).__name__}, whose width is {width}")
        for t in tokens:
            if len(embedder.tokenizer.encode(t)) == 1:
                raise PlaceholderError(
                    f"placeholder token {t!r} is already in the vocabulary of {type(embedder).__name__} (a word of "
                    "CLIP's or a token added before): pick a new string, e.g. a word in angle brackets like <my-thing>")
    return tuple(embedder.add_tokens(tokens, value) for embedder, value in zip(embedders, rows))


def set_placeholder_rows(conditioner, token, rows_l, rows_g):
    """Overwrite the learned rows of `token` (added before, with as many vectors) in both text embedders.

    In place, so graphs compiled before (a pipeline's conditioner) read the new values without a recompile."""
    for embedder, rows in zip(conditioner.text_embedders(), (rows_l, rows_g)):
        table = embedder.token_embedding
        ids = np.array(embedder.tokenizer.convert_tokens_to_ids(placeholder_tokens(token, len(rows))))
        learned = table.get_learned_rows()
        learned[ids - table.vocab_size] = rows
        table.set_learned_rows(learned)


def add_trainable_placeholder(conditioner, token, num_vectors, initializer_token, rng):
    """Add `token` with `num_vectors` vectors to both text embedders, its rows started by `initial_rows`; returns
    the learned rows to train (one Parameter per encoder). What the trainer and the step benchmark set up."""
    rows = [initial_rows(embedder, initializer_token, num_vectors, rng) for embedder in conditioner.text_embedders()]
    add_placeholder_tokens(conditioner, token, *rows)
    return conditioner.learned_rows()


def initial_rows(embedder, initializer_token, num_vectors, rng):
    """Starting rows [num_vectors, width] for one text embedder: the embeddings of the initializer phrase's tokens
    in order, cycling when there are more vectors than tokens (and the first num_vectors when fewer, as kohya's
    sd-scripts does), or, without a phrase, small random vectors (normal, with the spread of the embedder's table)."""
    table = embedder.token_embedding.weight
    if initializer_token:
        ids = embedder.tokenizer.encode(initializer_token)
        if not ids:
            raise PlaceholderError(f"--initializer_token {initializer_token!r} has no word in it: give a word or a "
                                   "phrase, e.g. 'toy' or 'plush cat toy'.")
        # row by row: the whole table of the real bigG is 250 MB
        return np.stack([table[ids[i % len(ids)]].asnumpy() for i in range(num_vectors)]).astype(np.float32)
    std = float(table.asnumpy().std())
    return rng.normal(0.0, std, (num_vectors, table.shape[1])).astype(np.float32)


def vocabulary_norms(conditioner, learned_rows):
    """[n] per encoder: the mean norm of its vocabulary's rows, the norm --embedding_norm preserve keeps for
    random initial vectors."""
    norms = []
    for embedder, rows in zip(conditioner.text_embedders(), learned_rows):
        table = embedder.token_embedding.weight.asnumpy().astype(np.float32)
        norms.append(np.full(rows.shape[0], np.linalg.norm(table, axis=1).mean(), np.float32))
    return norms


def nearest_words(embedder, rows, k=3):
    """For each learned row of one text embedder ([n, width]), the `k` vocabulary words whose token rows are
    nearest by cosine: what the vector has come to resemble (a row far from every word is normal for an object)."""
    table = embedder.token_embedding.weight.asnumpy().astype(np.float32)
    table /= np.linalg.norm(table, axis=1, keepdims=True) + 1e-12
    rows = np.asarray(rows, np.float32)
    similarity = (rows / (np.linalg.norm(rows, axis=1, keepdims=True) + 1e-12)) @ table.T
    return [[embedder.tokenizer.word(i) for i in np.argsort(-row)[:k]] for row in similarity]
