"""The offline CLIP tokenizers against transformers' CLIPTokenizer and against ids published for real CLIP."""
import json

import numpy as np
import pytest
from transformers import CLIPTokenizer as HFCLIPTokenizer

from reference import hf_ids, write_tokenizer
from gm.modules.encoders.tokenizer import (BIGG_PAD_ID, VIT_L_PAD_ID, CLIPTokenizer, bigg_tokenizer,
                                           clip_vocab_and_merges, vit_l_tokenizer)

PROMPTS = [
    "a photo of a cat",
    "A Photo of a TREE!",
    "it's a cat's toy, running   fast",
    "2 dogs and 3 cats",
    "",
    "  leading and trailing whitespace\tand\ttabs\n",
    "Café déjà vu, naïve façade; ÜBER straße",
    "an astronaut riding a horse on mars, 4k, trending on artstation, by greg rutkowski!!!",
    "emoji 🎂🐱 and CJK 猫の写真",
    "hyphen-ated words, e-mail @ home #tag $100 (brackets) [more] {curly} \"quoted\" 'single'",
    "I'll, you're, they've, we'd, I'm, don't",
    " ".join(["long"] * 100),
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]

# Ids published for OpenAI's CLIP tokenizer (e.g. open_clip / transformers outputs quoted in public code):
# they tie the vocabulary derived from the merge file to the real one.
PUBLISHED = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a photo of a dog": [49406, 320, 1125, 539, 320, 1929, 49407],
    "A Photo of a TREE!": [49406, 320, 1125, 539, 320, 2677, 256, 49407],
    "it's a cat's toy, running   fast": [49406, 585, 568, 320, 2368, 568, 5988, 267, 2761, 1953, 49407],
    "2 dogs and 3 cats": [49406, 273, 3255, 537, 274, 3989, 49407],
}


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """vocab.json + merges.txt as in a Hugging Face / diffusers tokenizer folder."""
    return write_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="module")
def hf_tokenizer(hf_folder):
    return HFCLIPTokenizer.from_pretrained(str(hf_folder))


def test_vocabulary_derivation():
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert sorted(vocab.values()) == list(range(49408))
    assert (vocab["!"], vocab["!</w>"], vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (0, 256, 49406, 49407)
    assert vocab["a</w>"] == 320 and vocab["cat</w>"] == 2368


def test_published_ids():
    tokenizer = vit_l_tokenizer()
    for prompt, ids in PUBLISHED.items():
        assert tokenizer(prompt)[0, : len(ids)].tolist() == ids, prompt


def test_equal_to_transformers(hf_tokenizer):
    ours = vit_l_tokenizer()(PROMPTS)
    assert ours.dtype == np.int32 and ours.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(ours, hf_ids(hf_tokenizer, PROMPTS))
    for prompt in PROMPTS:
        assert vit_l_tokenizer().encode(prompt) == hf_tokenizer(prompt, add_special_tokens=False).input_ids


def test_padding_and_truncation():
    vit_l, bigg = vit_l_tokenizer()(PROMPTS), bigg_tokenizer()(PROMPTS)
    short = PROMPTS.index("a photo of a cat")
    assert vit_l[short, 7:].tolist() == [VIT_L_PAD_ID] * 70
    assert bigg[short, 7:].tolist() == [BIGG_PAD_ID] * 70
    np.testing.assert_array_equal(vit_l[short, :7], bigg[short, :7])
    # outside the padding the two are the same
    np.testing.assert_array_equal(np.where(bigg == 0, VIT_L_PAD_ID, bigg), vit_l)
    long = PROMPTS.index(" ".join(["long"] * 100))
    for ids in (vit_l[long], bigg[long]):
        assert ids[0] == 49406 and ids[76] == 49407 and (ids[1:76] == ids[1]).all()


def test_exclamation_mark_is_ordinary_for_bigg(hf_folder):
    """open_clip tokenizes "!" like any character; HF's tokenizer_2 (pad_token "!") turns each "!" into 0."""
    prompt = "hello! wow!!"
    ours = bigg_tokenizer()(prompt)[0].tolist()
    end = ours.index(49407)
    assert ours[:3] == [49406, 3306, 256] and 0 not in ours[:end] and set(ours[end + 1 :]) == {0}
    assert ours[:end + 1] == vit_l_tokenizer()(prompt)[0, : end + 1].tolist()
    hf_tokenizer_2 = HFCLIPTokenizer.from_pretrained(str(hf_folder), pad_token="!")
    assert hf_ids(hf_tokenizer_2, [prompt])[0, :3].tolist() == [49406, 3306, 0]  # what HF would feed


def test_added_tokens(hf_tokenizer, tmp_path):
    tokens = ["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2"]
    vit_l, bigg = vit_l_tokenizer(), bigg_tokenizer()
    assert vit_l.add_tokens(tokens) == bigg.add_tokens(tokens) == [49408, 49409, 49410]
    assert len(vit_l) == 49411
    hf_tokenizer = HFCLIPTokenizer.from_pretrained(hf_tokenizer.name_or_path)
    hf_tokenizer.add_tokens(tokens)
    prompts = ["a <cat-toy> <cat-toy>_1 <cat-toy>_2 on a table", "a photo of<cat-toy>_2,<cat-toy>!", "a <CAT-TOY>"]
    ours = vit_l(prompts)
    np.testing.assert_array_equal(ours, hf_ids(hf_tokenizer, prompts))
    assert ours[0, :7].tolist() == [49406, 320, 49408, 49409, 49410, 525, 320]
    assert 49410 in ours[1] and 49408 in ours[1] and ours[2, 2] == 49408
    np.testing.assert_array_equal(np.where(bigg(prompts) == 0, VIT_L_PAD_ID, bigg(prompts)), ours)
    with pytest.raises(ValueError):
        vit_l.add_tokens(["<cat-toy>"])
    with pytest.raises(ValueError):
        vit_l.add_tokens(["cat</w>"])


def test_from_diffusers_folders(hf_folder, tmp_path):
    """diffusers' tokenizer/ (pad <|endoftext|>) and tokenizer_2/ (pad "!"), each with an added token, in the
    published layout (vocab.json, merges.txt, tokenizer_config.json) and as newer transformers save them
    (tokenizer.json)."""
    for sub, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        hf = HFCLIPTokenizer.from_pretrained(str(hf_folder), pad_token=pad)
        hf.add_tokens(["<concept>"])
        hf.save_pretrained(str(tmp_path / "saved" / sub))
        published = tmp_path / "published" / sub
        published.mkdir(parents=True)
        for name in ("vocab.json", "merges.txt"):
            (published / name).write_bytes((hf_folder / name).read_bytes())
        config = {"pad_token": pad, "added_tokens_decoder": {"0": {"content": "!", "special": True},
                                                             "49408": {"content": "<concept>", "special": False}}}
        (published / "tokenizer_config.json").write_text(json.dumps(config))
    for layout in ("saved", "published"):
        vit_l = vit_l_tokenizer(str(tmp_path / layout / "tokenizer"))
        bigg = bigg_tokenizer(str(tmp_path / layout / "tokenizer_2"))
        assert isinstance(vit_l, CLIPTokenizer) and len(vit_l) == len(bigg) == 49409
        ids = bigg("a <concept>!")[0]
        assert ids[:5].tolist() == [49406, 320, 49408, 256, 49407] and ids[5:].max() == 0
        assert vit_l("a <concept>!")[0, :6].tolist() == [49406, 320, 49408, 256, 49407, 49407]
        np.testing.assert_array_equal(vit_l(PROMPTS), vit_l_tokenizer()(PROMPTS))
        assert vit_l.add_tokens(["<next>"]) == [49409]
