"""Learned-embedding files: round trips through every format, atomic writes, detection and errors."""
import os

import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

import mindspore as ms
import mindspore.train.serialization as ms_serialization

from gm.textual_inversion.embedding_io import EmbeddingFormatError, check_widths, load_embedding, save_embedding

TOKEN = "<cat-toy>"


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)
    return rng.standard_normal((3, 768)).astype(np.float32), rng.standard_normal((3, 1280)).astype(np.float32)


def assert_same(embedding, rows, token=TOKEN):
    assert embedding.token == token and embedding.num_vectors == rows[0].shape[0]
    for found, expected in zip((embedding.clip_l, embedding.clip_g), rows):
        assert found.dtype == np.float32 and np.array_equal(found, expected)


@pytest.mark.parametrize("name, fmt", [("emb.ckpt", "ckpt"), ("emb.safetensors", "safetensors")])
def test_round_trip(tmp_path, rows, name, fmt):
    path = str(tmp_path / name)
    assert save_embedding(path, *rows, TOKEN) == path
    assert os.listdir(tmp_path) == [name]  # no temporary file left
    assert os.stat(path).st_mode & 0o777 == 0o644
    embedding = load_embedding(path)
    assert_same(embedding, rows)
    assert (embedding.format, embedding.source) == (fmt, path)
    assert load_embedding(path, token="<other>").token == "<other>"
    save_embedding(path, rows[0][:1], rows[1][:1], TOKEN)  # overwrite in place
    assert load_embedding(path).num_vectors == 1


@pytest.mark.parametrize("name, fmt", [("emb.st", "safetensors"), ("emb", "safetensors")])
def test_explicit_format_any_name(tmp_path, rows, name, fmt):
    path = str(tmp_path / name)
    save_embedding(path, *rows, TOKEN, format=fmt)
    assert os.listdir(tmp_path) == [name]
    embedding = load_embedding(path)  # a .ckpt by its extension, safetensors by its content
    assert_same(embedding, rows)
    assert embedding.format == fmt


def test_ckpt_needs_its_extension(tmp_path, rows):
    for path in (tmp_path / "emb.CKPT", tmp_path / "emb.bin"):
        with pytest.raises(EmbeddingFormatError, match=r"named \*\.ckpt"):
            save_embedding(str(path), *rows, TOKEN, format="ckpt")
    save_embedding(str(tmp_path / "emb.ckpt"), *rows, TOKEN)
    os.rename(tmp_path / "emb.ckpt", tmp_path / "emb.CKPT")
    with pytest.raises(EmbeddingFormatError, match=r"emb\.CKPT.*named \*\.ckpt"):
        load_embedding(str(tmp_path / "emb.CKPT"))
    assert os.listdir(tmp_path) == ["emb.CKPT"]


def test_community_layout(tmp_path, rows):
    path = str(tmp_path / "emb.safetensors")
    save_embedding(path, rows[0].astype(np.float16), rows[1], TOKEN)  # stored as float32 whatever comes in
    with safe_open(path, framework="np") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"]
        assert f.metadata() == {"token": TOKEN, "num_vectors": "3"}
        assert f.get_tensor("clip_l").dtype == np.float32 and f.get_tensor("clip_g").shape == (3, 1280)


def test_reads_community_files_of_other_writers(tmp_path, rows):
    """kohya-style files: no token in the metadata (the file name is the token), fp16 or bf16."""
    import torch
    from safetensors.torch import save_file

    safetensors.numpy.save_file({"clip_l": rows[0].astype(np.float16), "clip_g": rows[1].astype(np.float16)},
                                str(tmp_path / "gnome.safetensors"))
    embedding = load_embedding(str(tmp_path / "gnome.safetensors"))
    assert_same(embedding, [r.astype(np.float16).astype(np.float32) for r in rows], "gnome")

    bf16 = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in zip(("clip_l", "clip_g"), rows)}
    save_file(bf16, str(tmp_path / "bf.safetensors"), metadata={"ss_output_name": "bf"})
    expected = [bf16[k].float().numpy() for k in ("clip_l", "clip_g")]
    assert_same(load_embedding(str(tmp_path / "bf.safetensors")), expected, "bf")


def test_diffusers_pair(tmp_path, rows):
    save_embedding(str(tmp_path), *rows, TOKEN, format="diffusers")
    assert sorted(os.listdir(tmp_path)) == ["learned_embeds.safetensors", "learned_embeds_2.safetensors"]
    for name, expected in zip(("learned_embeds.safetensors", "learned_embeds_2.safetensors"), rows):
        with safe_open(str(tmp_path / name), framework="np") as f:
            assert list(f.keys()) == [TOKEN] and f.metadata() == {"format": "pt"}
            assert np.array_equal(f.get_tensor(TOKEN), expected)
    for path in (tmp_path, tmp_path / "learned_embeds.safetensors", tmp_path / "learned_embeds_2.safetensors"):
        embedding = load_embedding(str(path))
        assert_same(embedding, rows)
        assert embedding.format == "diffusers"

    # intermediate saves of diffusers' script: learned_embeds-steps-N / learned_embeds_2-steps-N
    for name, value in (("learned_embeds-steps-500", rows[0]), ("learned_embeds_2-steps-500", rows[1])):
        safetensors.numpy.save_file({TOKEN: value}, str(tmp_path / f"{name}.safetensors"))
    assert_same(load_embedding(str(tmp_path / "learned_embeds_2-steps-500.safetensors")), rows)


def test_diffusers_reads_our_pair(tmp_path, rows):
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin, load_textual_inversion_state_dicts

    class Tokenizer:
        def get_vocab(self):
            return {}

    save_embedding(str(tmp_path), *rows, TOKEN, format="diffusers")
    for name, expected in zip(("learned_embeds.safetensors", "learned_embeds_2.safetensors"), rows):
        state_dicts = load_textual_inversion_state_dicts([str(tmp_path)], weight_name=name)
        retrieve = TextualInversionLoaderMixin._retrieve_tokens_and_embeddings
        tokens, embeddings = retrieve([None], state_dicts, Tokenizer())
        assert tokens == [TOKEN] and np.array_equal(embeddings[0].numpy(), expected)


def test_failed_write_keeps_the_old_file(tmp_path, rows, monkeypatch):
    for name in ("emb.safetensors", "emb.ckpt"):
        path = str(tmp_path / name)
        save_embedding(path, *rows, TOKEN)
        before = open(path, "rb").read()

        if name.endswith(".safetensors"):
            def half_write(tensors, filename, metadata=None):
                with open(filename, "wb") as f:
                    f.write(safetensors.numpy.save(tensors, metadata)[:100])
                raise OSError("No space left on device")

            monkeypatch.setattr(safetensors.numpy, "save_file", half_write)
        else:
            real = ms_serialization._write_parameter_bytes_data
            calls = []

            def write_one_then_fail(*args, **kwargs):
                calls.append(1)
                if len(calls) > 1:
                    raise OSError("No space left on device")
                return real(*args, **kwargs)

            monkeypatch.setattr(ms_serialization, "_write_parameter_bytes_data", write_one_then_fail)

        with pytest.raises(OSError, match="No space"):
            save_embedding(path, rows[0] + 1, rows[1] + 1, "<new>")
        monkeypatch.undo()
        assert open(path, "rb").read() == before
        assert_same(load_embedding(path), rows)
    assert sorted(os.listdir(tmp_path)) == ["emb.ckpt", "emb.safetensors"]


def test_single_vectors_and_checks_on_save(tmp_path, rows):
    path = str(tmp_path / "one.ckpt")
    save_embedding(path, rows[0][0], rows[1][0], TOKEN)  # [d] is one vector
    assert load_embedding(path).clip_g.shape == (1, 1280)
    with pytest.raises(EmbeddingFormatError, match="inconsistent vector counts: clip_l has 3 vectors, clip_g 2"):
        save_embedding(str(tmp_path / "x.ckpt"), rows[0], rows[1][:2], TOKEN)
    with pytest.raises(EmbeddingFormatError, match=r"x\.pt.*\.ckpt or \.safetensors"):
        save_embedding(str(tmp_path / "x.pt"), *rows, TOKEN)
    with pytest.raises(ValueError, match="token"):
        save_embedding(str(tmp_path / "x.ckpt"), *rows, "")
    assert sorted(os.listdir(tmp_path)) == ["one.ckpt"]


def test_check_widths(tmp_path, rows):
    path = str(tmp_path / "emb.safetensors")
    save_embedding(path, *rows, TOKEN)
    embedding = load_embedding(path)
    check_widths(embedding, 768, 1280)
    with pytest.raises(EmbeddingFormatError, match=r"emb\.safetensors.*clip_l 768, clip_g 1280.*\(32, 64\)"):
        check_widths(embedding, 32, 64)
    with pytest.raises(EmbeddingFormatError, match="swapped"):
        check_widths(embedding, 1280, 768)


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def test_errors_name_the_file(tmp_path, rows):
    def fails(path, match):
        with pytest.raises(EmbeddingFormatError, match=match) as info:
            load_embedding(str(path))
        assert os.path.basename(str(path)) in str(info.value)

    fails(tmp_path / "absent.safetensors", "not found")
    fails(write(tmp_path / "emb.pt", b"PK\x03\x04" + bytes(60)), "PyTorch pickle")
    fails(write(tmp_path / "emb.bin", b"\x80\x02}q\x00."), "PyTorch pickle")
    fails(write(tmp_path / "emb.txt", b"hello"), "neither a safetensors file nor a MindSpore .ckpt")
    fails(write(tmp_path / "garbage.safetensors", b"not safetensors at all"), "truncated or corrupt")

    good = str(tmp_path / "good.safetensors")
    save_embedding(good, *rows, TOKEN)
    data = open(good, "rb").read()
    fails(write(tmp_path / "cut.safetensors", data[:-1000]), "truncated or corrupt")
    fails(write(tmp_path / "cut_header.safetensors", data[:50]), "truncated or corrupt")

    good = str(tmp_path / "good.ckpt")
    save_embedding(good, *rows, TOKEN)
    data = open(good, "rb").read()
    fails(write(tmp_path / "cut.ckpt", data[: len(data) // 2]), "truncated or corrupt")
    fails(write(tmp_path / "zeroed.ckpt", data[:200] + bytes(64) + data[264:]), "truncated or corrupt")  # by the CRC
    fails(write(tmp_path / "empty.ckpt", b""), "truncated or corrupt")

    # SD 1.x embeddings have rows for one encoder only
    safetensors.numpy.save_file({"emb_params": rows[0][:2]}, str(tmp_path / "kohya_sd15.safetensors"))
    fails(tmp_path / "kohya_sd15.safetensors", r"emb_params \[2, 768\].*SD 1.x")
    safetensors.numpy.save_file({"<sd15>": rows[0][:2]}, str(tmp_path / "sd15.safetensors"))
    fails(tmp_path / "sd15.safetensors", "both text encoders")
    safetensors.numpy.save_file({"clip_l": rows[0]}, str(tmp_path / "half.safetensors"))
    fails(tmp_path / "half.safetensors", "without clip_g")
    safetensors.numpy.save_file({"a": rows[0], "b": rows[1]}, str(tmp_path / "other.safetensors"))
    fails(tmp_path / "other.safetensors", r"a \[3, 768\], b \[3, 1280\]")

    # inconsistent vector counts
    safetensors.numpy.save_file({"clip_l": rows[0][:2], "clip_g": rows[1]}, str(tmp_path / "counts.safetensors"))
    fails(tmp_path / "counts.safetensors", "inconsistent vector counts: clip_l has 2 vectors, clip_g 3")
    safetensors.numpy.save_file({"clip_l": rows[0], "clip_g": rows[1]}, str(tmp_path / "meta.safetensors"),
                                {"num_vectors": "2"})
    fails(tmp_path / "meta.safetensors", "num_vectors says 2, the tensors hold 3")
    params = [{"name": "clip_l", "data": ms.Tensor(rows[0])}, {"name": "clip_g", "data": ms.Tensor(rows[1])}]
    ms.save_checkpoint(params, str(tmp_path / "counts.ckpt"), append_dict={"token": TOKEN, "num_vectors": 4})
    fails(tmp_path / "counts.ckpt", "num_vectors says 4")
    ms.save_checkpoint(params[:1], str(tmp_path / "model.ckpt"))
    fails(tmp_path / "model.ckpt", "not a textual-inversion embedding checkpoint: no clip_g, token")

    # diffusers pairs
    pair = tmp_path / "pair"
    pair.mkdir()
    safetensors.numpy.save_file({TOKEN: rows[0]}, str(pair / "learned_embeds.safetensors"))
    fails(pair / "learned_embeds.safetensors", "learned_embeds_2.safetensors.*is missing")
    fails(pair, "learned_embeds_2.safetensors.*is missing")
    safetensors.numpy.save_file({"<dog>": rows[1]}, str(pair / "learned_embeds_2.safetensors"))
    fails(pair / "learned_embeds.safetensors", "different tokens")
    safetensors.numpy.save_file({TOKEN: rows[1][:2]}, str(pair / "learned_embeds_2.safetensors"))
    fails(pair, "inconsistent vector counts")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_rows_are_refused(tmp_path, rows, bad):
    """A diverged training's rows (NaN or inf) make black images: refused on reading, in every format, naming
    the file, and never written."""
    clip_l = rows[0].copy()
    clip_l[1, 5] = bad
    files = {"community.safetensors": lambda p: safetensors.numpy.save_file({"clip_l": clip_l, "clip_g": rows[1]}, p),
             "ours.ckpt": lambda p: ms.save_checkpoint(
                 [{"name": "clip_l", "data": ms.Tensor(clip_l)}, {"name": "clip_g", "data": ms.Tensor(rows[1])}], p,
                 append_dict={"token": TOKEN, "num_vectors": 3})}
    for name, write_file in files.items():
        path = str(tmp_path / name)
        write_file(path)
        with pytest.raises(EmbeddingFormatError, match=f"{name}: clip_l holds NaN or infinite values"):
            load_embedding(path)
    pair = tmp_path / "pair"
    save_embedding(str(pair), *rows, TOKEN, format="diffusers")
    safetensors.numpy.save_file({TOKEN: clip_l}, str(pair / "learned_embeds.safetensors"))
    with pytest.raises(EmbeddingFormatError, match="pair: clip_l holds NaN or infinite values"):
        load_embedding(str(pair))
    with pytest.raises(EmbeddingFormatError, match="NaN or infinite"):
        save_embedding(str(tmp_path / "new.safetensors"), clip_l, rows[1], TOKEN)
    assert not os.path.exists(tmp_path / "new.safetensors")


FACTS = {"base_config": "sd_xl_base.yaml", "base_layout": "0123456789abcdef", "learning_rate": "0.005",
         "seed": "42", "trainer": "sdxl-ti-mindspore 0.6.0", "step": "500"}


@pytest.mark.parametrize("name", ["emb.ckpt", "emb.safetensors"])
def test_training_facts_round_trip(tmp_path, rows, name):
    path = save_embedding(str(tmp_path / name), *rows, TOKEN, metadata=dict(FACTS, seed=42))  # values as strings
    embedding = load_embedding(path)
    assert_same(embedding, rows)
    assert embedding.metadata == FACTS
    assert embedding.describe() == (f"{TOKEN} (3 vectors) from {name}: 500 steps on sd_xl_base.yaml (layout "
                                    "0123456789abcdef), learning rate 0.005, seed 42, sdxl-ti-mindspore 0.6.0")
    assert load_embedding(save_embedding(str(tmp_path / f"bare_{name}"), *rows, TOKEN)).describe() == \
        f"{TOKEN} (3 vectors) from bare_{name}"
    with pytest.raises(ValueError, match="token"):
        save_embedding(str(tmp_path / name), *rows, TOKEN, metadata={"token": "<other>"})


def test_a_file_that_does_not_read_back_is_refused_and_the_old_one_kept(tmp_path, rows, monkeypatch):
    """A writer that silently stores other values (here: every row + 1): the read-back check refuses the file,
    names it, and leaves the previous file and no temporary behind."""
    for name in ("emb.safetensors", "emb.ckpt"):
        path = str(tmp_path / name)
        save_embedding(path, *rows, TOKEN)
        before = open(path, "rb").read()
        if name.endswith(".safetensors"):
            real = safetensors.numpy.save_file

            def altered(tensors, filename, metadata=None):
                real({k: v + 1 for k, v in tensors.items()}, filename, metadata=metadata)

            monkeypatch.setattr(safetensors.numpy, "save_file", altered)
        else:
            real = ms.save_checkpoint

            def altered(params, filename, **kwargs):
                real([dict(p, data=p["data"] + 1) for p in params], filename, **kwargs)

            monkeypatch.setattr(ms, "save_checkpoint", altered)
        with pytest.raises(EmbeddingFormatError, match=f"{name}: the file written does not read back as written"):
            save_embedding(path, *rows, TOKEN)
        monkeypatch.undo()
        assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["emb.ckpt", "emb.safetensors"]


def test_an_embedding_that_fails_verify_is_refused_and_the_old_one_kept(tmp_path, rows):
    """`verify` sees the embedding as read back from the new file (its rows, not the ones passed in); what it
    reports refuses the file, named, and leaves the previous file and no temporary behind."""
    seen = []

    def verify(embedding):
        seen.append(embedding)
        return "the word is never looked up"

    for name in ("emb.safetensors", "emb.ckpt"):
        path = str(tmp_path / name)
        save_embedding(path, *rows, TOKEN, verify=lambda embedding: None)
        before = open(path, "rb").read()
        with pytest.raises(EmbeddingFormatError, match=f"{name}: the word is never looked up; it was not saved, and "
                                                       "the previous file there is kept"):
            save_embedding(path, *(r + 1 for r in rows), TOKEN, verify=verify)
        assert_same(seen[-1], [r + 1 for r in rows])
        assert seen[-1].source != path  # read from the temporary file, before it could replace anything
        assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["emb.ckpt", "emb.safetensors"]
