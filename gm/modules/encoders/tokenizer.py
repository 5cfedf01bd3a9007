"""CLIP's byte-level BPE tokenizer for both SDXL text encoders, built offline.

The vocabulary comes from the merge list shipped in `clip_bpe/` (see its README.md; MIT licence beside it) and
the tokenization pipeline is Hugging Face `tokenizers`' (what transformers' CLIPTokenizer runs), so the ids
equal those of `openai/clip-vit-large-patch14`'s tokenizer. The two encoders differ only in padding:

- CLIP ViT-L/14 pads with <|endoftext|> (49407);
- OpenCLIP ViT-bigG/14 pads with 0, and "!" is an ordinary character (id 256 as a word), as in open_clip.
  (The published diffusers `tokenizer_2` declares "!" its pad token, which makes HF map every "!" in a prompt
  to 0; reading only its vocabulary, merges and added tokens avoids that.)

Textual-inversion placeholders are added with `add_tokens`; they get ids 49408, 49409, ... and are never split.
"""
import functools
import gzip
import json
import os

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_bpe", "bpe_simple_vocab_16e6.txt.gz")
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # merges used by CLIP: lines 2 .. 48,895 of the file
VOCAB_SIZE = 49408
EOS_TOKEN_ID = 49407
CONTEXT_LENGTH = 77
VIT_L_PAD_ID = EOS_TOKEN_ID
BIGG_PAD_ID = 0

# CLIP's pre-tokenization: its special tokens, English contractions, runs of letters, single digits, runs of
# other non-space characters.
_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable character table, in vocabulary order.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes map to code points from 256 upwards.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return {b: table[b] for b in printable + [b for b in range(256) if b not in printable]}


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges(bpe_path=BPE_PATH):
    """(vocab {token: id}, merges [(left, right)]) derived from CLIP's merge file: 49,408 tokens (cached: do not
    modify them)."""
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


def _read_json(folder, name):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_vocab_and_merges(folder):
    """(vocab, merges, added tokens in id order) from a Hugging Face tokenizer folder (e.g. diffusers' tokenizer/).

    Reads vocab.json + merges.txt (the published SDXL layout) or else tokenizer.json (what newer transformers
    save); added tokens from added_tokens.json, tokenizer_config.json or tokenizer.json.
    """
    tokenizer_json = _read_json(folder, "tokenizer.json") or {}
    vocab = _read_json(folder, "vocab.json")
    if vocab is not None:
        with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().split("\n")[1:] if line.strip()]
    elif tokenizer_json:
        vocab = tokenizer_json["model"]["vocab"]
        merges = [tuple(m.split() if isinstance(m, str) else m) for m in tokenizer_json["model"]["merges"]]
    else:
        raise FileNotFoundError(f"{folder}: neither vocab.json + merges.txt nor tokenizer.json")
    added = {int(i): t for t, i in (_read_json(folder, "added_tokens.json") or {}).items()}  # id -> token
    decoder = (_read_json(folder, "tokenizer_config.json") or {}).get("added_tokens_decoder", {})
    added.update({int(i): entry["content"] for i, entry in decoder.items()})
    added.update({entry["id"]: entry["content"] for entry in tokenizer_json.get("added_tokens", [])})
    new_ids = sorted(i for i in added if i >= len(vocab))
    if new_ids != list(range(len(vocab), len(vocab) + len(new_ids))):
        raise ValueError(f"{folder}: added token ids are not consecutive after the vocabulary: {new_ids}")
    return vocab, merges, [added[i] for i in new_ids]


class CLIPTokenizer:
    """Text -> int32 ids [B, max_length]: <|startoftext|>, at most max_length - 2 tokens, <|endoftext|>, padding.

    Args:
        pad_id: 49407 for CLIP ViT-L/14 (`VIT_L_PAD_ID`), 0 for OpenCLIP ViT-bigG/14 (`BIGG_PAD_ID`).
        vocab, merges: defaults to the vocabulary derived from `clip_bpe/`.
    """

    def __init__(self, pad_id, max_length=CONTEXT_LENGTH, vocab=None, merges=None):
        if vocab is None:
            vocab, merges = clip_vocab_and_merges()
        self.pad_id, self.max_length = pad_id, max_length
        tok = Tokenizer(BPE(vocab=vocab, merges=list(merges), continuing_subword_prefix="", end_of_word_suffix="</w>",
                            fuse_unk=False, unk_token=EOS_TOKEN))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.add_special_tokens([AddedToken(BOS_TOKEN, special=True), AddedToken(EOS_TOKEN, special=True)])
        self._tokenizer = tok
        self.bos_id, self.eos_id = tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN)

    @classmethod
    def from_pretrained(cls, folder, pad_id, max_length=CONTEXT_LENGTH):
        """From a Hugging Face tokenizer folder (see `read_vocab_and_merges`).

        Only the vocabulary, merges and added tokens are read: padding and special tokens stay CLIP's (see the
        module docstring on "!").
        """
        vocab, merges, added = read_vocab_and_merges(folder)
        tokenizer = cls(pad_id, max_length, vocab, merges)
        if added:
            tokenizer.add_tokens(added)
        return tokenizer

    def __len__(self):
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def add_tokens(self, tokens):
        """Add placeholder tokens (never split by BPE); returns their ids, len(self) onwards."""
        tokens = list(tokens)
        known = [t for t in tokens if self._tokenizer.token_to_id(t) is not None]
        if known or len(set(tokens)) != len(tokens):
            raise ValueError(f"tokens already in the vocabulary or repeated: {known or tokens}")
        first = len(self)
        # As transformers' `add_tokens`: matched on the normalized (lower-cased) prompt.
        self._tokenizer.add_tokens([AddedToken(t, normalized=True) for t in tokens])
        ids = self.convert_tokens_to_ids(tokens)
        if ids != list(range(first, first + len(tokens))):
            raise RuntimeError(f"added tokens got ids {ids}, expected {first}...")
        return ids

    def convert_tokens_to_ids(self, tokens):
        return [self._tokenizer.token_to_id(t) for t in tokens]

    def word(self, token_id):
        """The vocabulary entry `token_id`, without BPE's end-of-word mark ("toy</w>" -> "toy")."""
        return self._tokenizer.id_to_token(int(token_id)).replace("</w>", "")

    def encode(self, text):
        """The ids of `text` alone: no <|startoftext|>/<|endoftext|>, no truncation or padding."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def __call__(self, texts):
        """str or list of str -> int32 array [B, max_length]."""
        if isinstance(texts, str):
            texts = [texts]
        out = np.full((len(texts), self.max_length), self.pad_id, np.int32)
        for row, encoding in zip(out, self._tokenizer.encode_batch(list(texts), add_special_tokens=False)):
            ids = [self.bos_id] + encoding.ids[: self.max_length - 2] + [self.eos_id]
            row[: len(ids)] = ids
        return out


def vit_l_tokenizer(folder=None, max_length=CONTEXT_LENGTH):
    """Tokenizer of CLIP ViT-L/14 (pads with <|endoftext|>); `folder`: e.g. a diffusers pipeline's tokenizer/."""
    if folder is None:
        return CLIPTokenizer(VIT_L_PAD_ID, max_length)
    return CLIPTokenizer.from_pretrained(folder, VIT_L_PAD_ID, max_length)


def bigg_tokenizer(folder=None, max_length=CONTEXT_LENGTH):
    """Tokenizer of OpenCLIP ViT-bigG/14 (pads with 0); `folder`: e.g. a diffusers pipeline's tokenizer_2/."""
    if folder is None:
        return CLIPTokenizer(BIGG_PAD_ID, max_length)
    return CLIPTokenizer.from_pretrained(folder, BIGG_PAD_ID, max_length)
