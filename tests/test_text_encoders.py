"""SDXL's text encoders and GeneralConditioner against transformers / diffusers (tiny, random weights).

The references are transformers' CLIPTextModel (ViT-L side) and CLIPTextModelWithProjection (bigG side),
saved with `save_pretrained` (safetensors) and loaded into ours through gm.weights.diffusers_clip.
"""
import copy

import mindspore as ms
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from reference import (
    conditioner_batch, load_state_dict_into, run_text_encoder, sdxl_conditioning, sgm_vector,
)
from gm.modules.encoders.clip import TokenEmbedding
from gm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder2, GeneralConditioner
from gm.util import instantiate_from_config
from gm.weights.diffusers_clip import clip_g_diffusers_to_sgm, clip_l_diffusers_to_sgm
from gm.weights.lazy import LazyTensor

ATOL = 1e-4
PROMPTS = ["a photo of an astronaut riding a horse on mars", "a watercolor painting of a fox in the snow"]
VIT_L = dict(width=32, layers=2, heads=2)  # sd_xl_tiny.yaml
BIGG = dict(width=64, layers=2, heads=4, embed_dim=64)


@pytest.fixture(scope="module")
def hf(tiny_sdxl):
    """The two tiny reference encoders and their state dicts as read back from their safetensors files."""
    states = {name: tiny_sdxl.diffusers_state(name) for name in ("text_encoder", "text_encoder_2")}
    return tiny_sdxl.text_encoder, tiny_sdxl.text_encoder_2, states


def load_vit_l(embedder, hf):
    load_state_dict_into(embedder.transformer, clip_l_diffusers_to_sgm(hf[2]["text_encoder"]), "text_encoder")
    return embedder


def load_bigg(embedder, hf):
    load_state_dict_into(embedder.model, clip_g_diffusers_to_sgm(hf[2]["text_encoder_2"]), "text_encoder_2")
    return embedder


@pytest.fixture(scope="module")
def conditioner(root, hf):
    config = OmegaConf.load(f"{root}/configs/inference/sd_xl_tiny.yaml").model.params.conditioner_config
    cond = instantiate_from_config(config)
    load_vit_l(cond.embedders[0], hf)
    load_bigg(cond.embedders[1], hf)
    return cond


def close(ours, ref):
    ours = ours.asnumpy() if isinstance(ours, ms.Tensor) else ours
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref
    assert ours.shape == ref.shape
    diff = np.abs(ours - ref).max()
    assert diff <= ATOL, f"max abs diff {diff}"
    return diff


def test_vit_l_parity(hf):
    hidden = load_vit_l(FrozenCLIPEmbedder("hidden", 1, **VIT_L), hf)
    last = load_vit_l(FrozenCLIPEmbedder("last", **VIT_L), hf)
    pooled = load_vit_l(FrozenCLIPEmbedder("pooled", **VIT_L), hf)
    tokens = hidden.preprocess(PROMPTS)
    ref = run_text_encoder(hf[0], tokens.asnumpy())
    assert np.abs(ref.hidden_states[1].numpy()).mean() > 0.1  # not a degenerate comparison
    close(hidden(tokens), ref.hidden_states[1])  # SDXL's layer: penultimate of the ViT-L side
    close(last(tokens), ref.last_hidden_state)
    close(pooled(tokens)[:, 0], ref.pooler_output)
    names = {n for n, _ in hidden.parameters_and_names()}
    assert "transformer.text_model.embeddings.token_embedding.weight" in names
    assert "transformer.text_model.encoder.layers.1.self_attn.q_proj.weight" in names


def test_bigg_parity(hf):
    sdxl = load_bigg(FrozenOpenCLIPEmbedder2("penultimate", always_return_pooled=True, legacy=False, **BIGG), hf)
    legacy = load_bigg(FrozenOpenCLIPEmbedder2("penultimate", legacy=True, **BIGG), hf)
    tokens = sdxl.preprocess(PROMPTS)
    ref = run_text_encoder(hf[1], tokens.asnumpy())
    z, pooled = sdxl(tokens)
    close(z, ref.hidden_states[-2])
    close(pooled, ref.text_embeds)
    with torch.no_grad():
        close(legacy(tokens), hf[1].text_model.final_layer_norm(ref.hidden_states[-2]))
    names = {n for n, _ in sdxl.parameters_and_names()}
    assert {"model.positional_embedding", "model.text_projection", "model.transformer.resblocks.1.attn.in_proj_weight",
            "model.ln_final.bias"} <= names


def test_clip_g_mapping(hf):
    state = hf[2]["text_encoder_2"]
    mapped = clip_g_diffusers_to_sgm(state)
    layer = "text_model.encoder.layers.1.self_attn."
    np.testing.assert_array_equal(mapped["transformer.resblocks.1.attn.in_proj_weight"],
                                  np.concatenate([state[layer + p + "_proj.weight"] for p in "qkv"]))
    np.testing.assert_array_equal(mapped["text_projection"], state["text_projection.weight"].T)
    # transformers 4 (published files) prefix the ViT-L keys with text_model., transformers 5 does not
    assert clip_l_diffusers_to_sgm({"text_model.embeddings.position_ids": 0, "text_model.encoder.x": 1,
                                    "encoder.y": 2}) == {"text_model.encoder.x": 1, "text_model.encoder.y": 2}
    v4_names = {"text_model." + k if not k.startswith("text_model.") else k: v for k, v in
                hf[2]["text_encoder"].items()}
    assert clip_l_diffusers_to_sgm(v4_names).keys() == clip_l_diffusers_to_sgm(hf[2]["text_encoder"]).keys()
    # the loader maps LazyTensors: the mapping reads nothing, and a mapped tensor reads its sources when loaded
    reads = []

    def lazy(name, value):
        return LazyTensor(value.shape, lambda: reads.append(name) or value)

    mapped = clip_g_diffusers_to_sgm({k: lazy(k, v) for k, v in state.items()})
    assert reads == []
    in_proj = mapped["transformer.resblocks.0.attn.in_proj_weight"]
    assert in_proj.shape == (192, 64) and mapped["text_projection"].shape == (64, 64)
    sources = [f"text_model.encoder.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    np.testing.assert_array_equal(in_proj.load(), np.concatenate([state[k] for k in sources]))
    assert reads == sources


def test_conditioner_matches_diffusers(conditioner, hf, tiny_sdxl):
    """crossattn / vector as diffusers' SDXL pipeline builds them: both penultimate states concatenated;
    pooled bigG embedding followed by the sinusoidal time-id embeddings (the UNet's add_time_proj)."""
    batch = conditioner_batch(PROMPTS)
    inputs = conditioner.tokenize(batch)
    crossattn, vector = conditioner(*inputs)
    assert crossattn.shape == (2, 77, 96) and vector.shape == (2, 1600)

    ids = tiny_sdxl.token_ids(PROMPTS)  # diffusers' tokenizer/ and tokenizer_2/ (whose pad token is "!")
    np.testing.assert_array_equal(inputs[0].asnumpy(), ids[0])
    np.testing.assert_array_equal(inputs[1].asnumpy(), ids[1])
    prompt_embeds, pooled, time_ids = sdxl_conditioning(hf[0], hf[1], ids[0], ids[1], batch)
    expected_vector = sgm_vector(pooled, time_ids)
    close(crossattn, prompt_embeds)
    close(vector, expected_vector)

    # SDXL's empty negative prompt: text embeddings zeroed (force_zero_embeddings=["txt"]), size embeddings kept
    c, uc = conditioner.get_unconditional_conditioning(batch, dict(batch, txt=["", ""]), ["txt"])
    close(c["crossattn"], prompt_embeds)
    assert not uc["crossattn"].asnumpy().any() and not uc["vector"][:, :64].asnumpy().any()
    close(uc["vector"][:, 64:], expected_vector[:, 64:])


def bigg_with_token(hf, row):
    """Reference bigG with one added token (id 49408) whose embedding is `row`."""
    model = copy.deepcopy(hf[1])
    model.resize_token_embeddings(49409)
    with torch.no_grad():
        model.get_input_embeddings().weight[49408] = torch.from_numpy(row)
    return model


def test_pooled_read_at_eos_with_added_token(hf):
    embedder = load_bigg(FrozenOpenCLIPEmbedder2("penultimate", always_return_pooled=True, legacy=False, **BIGG), hf)
    row = np.random.default_rng(0).normal(0, 0.5, (1, 64)).astype(np.float32)
    assert embedder.add_tokens(["<concept>"], row) == [49408]
    tokens = embedder.preprocess(["a photo of <concept> on a beach", "<concept>"])
    ids = tokens.asnumpy()
    assert (ids == 49408).any(axis=1).all()
    eos = (ids == 49407).argmax(1)
    assert (ids.argmax(1) != eos).all()  # argmax(ids) would read at the added token

    z, pooled = embedder(tokens)
    reference = bigg_with_token(hf, row[0])
    ref = run_text_encoder(reference, ids)  # transformers reads at the first eos_token_id (config eos_token_id=49407)
    close(z, ref.hidden_states[-2])
    close(pooled, ref.text_embeds)
    with torch.no_grad():  # the same by hand, and what argmax(ids) would give instead
        normed = reference.text_model.final_layer_norm(ref.hidden_states[-1])
        at_eos = reference.text_projection(normed[torch.arange(2), torch.from_numpy(eos)])
        at_argmax = reference.text_projection(normed[torch.arange(2), torch.from_numpy(ids.argmax(1))])
    close(pooled, at_eos)
    assert np.abs(pooled.asnumpy() - at_argmax.numpy()).max() > 100 * ATOL


def test_gradient_reaches_only_new_rows(root, hf):
    config = OmegaConf.load(f"{root}/configs/inference/sd_xl_tiny.yaml").model.params.conditioner_config
    cond = GeneralConditioner(config.params.emb_models)
    load_vit_l(cond.embedders[0], hf)
    load_bigg(cond.embedders[1], hf)
    rng = np.random.default_rng(1)
    rows = [rng.normal(0, 0.5, (2, w)).astype(np.float32) for w in (32, 64)]
    for embedder, r in zip((cond.embedders[0], cond.embedders[1]), rows):
        assert embedder.add_tokens(["<concept>", "<unused>"], r) == [49408, 49409]
    tables = [cond.embedders[0].token_embedding, cond.embedders[1].token_embedding]  # (slicing a CellList renames)
    assert all(isinstance(t, TokenEmbedding) and not t.weight.requires_grad for t in tables)
    new_rows = [t.new_embeddings for t in tables]
    trainable = {p.name for p in cond.trainable_params()}
    assert trainable == {"embedders.0.transformer.text_model.embeddings.token_embedding.new_embeddings",
                         "embedders.1.model.token_embedding.new_embeddings"}
    frozen = [t.weight.asnumpy().copy() for t in tables]

    batch = conditioner_batch(["a photo of <concept>", "<concept> in the snow"])
    inputs = cond.tokenize(batch)

    def loss_fn(*inputs):
        crossattn, vector = cond(*inputs)
        return (crossattn ** 2).mean() + (vector[:, :64] ** 2).mean()

    loss, grads = ms.value_and_grad(loss_fn, None, new_rows)(*inputs)
    assert grads[0].shape == (2, 32) and grads[1].shape == (2, 64)

    # the same gradient from the diffusers way in PyTorch, with the rows appended to both tables
    te1, te2 = copy.deepcopy(hf[0]), bigg_with_token(hf, rows[1][0])
    te1.resize_token_embeddings(49409)
    with torch.no_grad():
        te1.get_input_embeddings().weight[49408] = torch.from_numpy(rows[0][0])
    ids = [torch.from_numpy(x.asnumpy().astype(np.int64)) for x in inputs[:2]]
    out1, out2 = te1(ids[0], output_hidden_states=True), te2(ids[1], output_hidden_states=True)
    ref_loss = (torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], -1) ** 2).mean() + \
        (out2.text_embeds ** 2).mean()
    ref_loss.backward()
    assert abs(float(loss) - float(ref_loss)) <= ATOL
    for grad, model in zip(grads, (te1, te2)):
        ref_grad = model.get_input_embeddings().weight.grad[49408]
        assert np.abs(ref_grad.numpy()).max() > 1e-3
        close(grad[0], ref_grad)
        assert not grad[1].asnumpy().any()  # "<unused>" is not in the prompts

    # a step on the new rows changes the output; the frozen tables stay as they were
    for table, p, g in zip(tables, new_rows, grads):
        table.set_learned_rows(p.asnumpy() - 10.0 * g.asnumpy())
    assert float(loss_fn(*inputs)) < float(loss)
    for table, before in zip(tables, frozen):
        np.testing.assert_array_equal(table.weight.asnumpy(), before)
    np.testing.assert_allclose(tables[0].get_learned_rows()[1], rows[0][1])


def test_each_text_encoder_reads_its_own_prompt_when_given(conditioner, tiny_sdxl):
    """"txt_clip_l" / "txt_clip_g" (from name.clip_l.txt / name.clip_g.txt) replace "txt" for that encoder only."""
    shared, own = ["a red star", "a blue circle"], ["a yellow ring", "a green square"]
    for encoder, index in (("clip_l", 0), ("clip_g", 1)):
        inputs = conditioner.tokenize(dict(conditioner_batch(shared), **{f"txt_{encoder}": own}))
        np.testing.assert_array_equal(inputs[index].asnumpy(), tiny_sdxl.token_ids(own)[index])
        np.testing.assert_array_equal(inputs[1 - index].asnumpy(), tiny_sdxl.token_ids(shared)[1 - index])


def test_nearest_words_of_learned_rows(conditioner):
    """The final summary's nearest vocabulary words: a row equal to a word's own row (scaled: cosine ignores the
    norm) has that word first; ids become words without BPE's end-of-word mark."""
    from gm.textual_inversion.placeholder import nearest_words

    for embedder in conditioner.text_embedders():
        ids = [embedder.tokenizer.encode(word)[0] for word in ("cat", "toy")]
        rows = embedder.token_embedding.weight.asnumpy()[ids] * np.array([[3.0], [0.5]], np.float32)
        words = nearest_words(embedder, rows, k=2)
        assert [w[0] for w in words] == ["cat", "toy"] and all(len(w) == 2 for w in words)
