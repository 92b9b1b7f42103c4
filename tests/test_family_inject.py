"""Prompt tokenization with slots, vector splicing, gradients and the training() flags."""

from __future__ import annotations

import pytest
import torch

from lib_ti.diffusers_backend import inject, vocab
from lib_ti.model import TrainableModel

TOKEN = "mytok123"
FAMILIES = ["tiny_sd1", "tiny_sd2v", "tiny_sdxl"]


@pytest.fixture()
def prompts(tokenizer_dir):
    return inject.PromptTokenizer(vocab.make_tokenizer(cache_dir=tokenizer_dir))


def vectors_for(model, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, w, generator=g).requires_grad_(True) for k, w in model.slots().items()}


def all_weights(model):
    for m in [model.unet, model.vae, *model.text_encoders.values()]:
        yield from m.parameters()


def test_rows_replace_every_occurrence_case_insensitively(prompts):
    name = prompts.ids(TOKEN)
    assert len(name) > 1  # the test is only meaningful for a multi-token name
    row = prompts.row(f"a {TOKEN} and a MyTok123, {TOKEN}", TOKEN, 3)
    a, and_, comma = prompts.ids("a")[0], prompts.ids("and")[0], prompts.ids(",")[0]
    assert row.ids == (49406, a, 0, 0, 0, and_, a, 0, 0, 0, comma, 0, 0, 0, 49407)
    assert row.slot == (-1, -1, 0, 1, 2, -1, -1, 0, 1, 2, -1, 0, 1, 2, -1)
    # a word that merely starts with the name's first pieces is not the name
    assert all(s == -1 for s in prompts.row("mytok 12", TOKEN, 3).slot)


def test_long_prompts_are_cut_into_75_token_chunks(prompts):
    """A1111's tokenize_line: 75 tokens a chunk, each with its own BOS/EOS."""
    cat, dog, comma = prompts.ids("cat")[0], prompts.ids("dog")[0], prompts.ids(",")[0]
    row = prompts.row(f"{TOKEN} " + " ".join(["cat"] * 80), TOKEN, 2)
    assert [c.ids for c in row.chunks] == [(49406, 0, 0, *[cat] * 73, 49407), (49406, *[cat] * 7, 49407)]
    assert row.chunks[0].slot[:4] == (-1, 0, 1, -1) and set(row.chunks[1].slot) == {-1}
    # past position 75 the name still becomes slots, in the second chunk
    late = prompts.row(" ".join(["cat"] * 80) + f" {TOKEN}", TOKEN, 2)
    assert late.chunks[1].slot == (-1, *[-1] * 5, 0, 1, -1)
    # a full chunk breaks after a comma within the last 20 tokens; the rest moves on
    commas = prompts.row(" ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10), TOKEN, 2)
    assert [c.ids[1:-1] for c in commas.chunks] == [(*[cat] * 70, comma), (dog,) * 10]
    # vectors are never split between chunks: 74 + 3 does not fit, so all 3 go to the next chunk
    split = prompts.row(" ".join(["cat"] * 74) + f" {TOKEN}", TOKEN, 3)
    assert [len(c.ids) for c in split.chunks] == [76, 5] and split.chunks[1].slot == (-1, 0, 1, 2, -1)
    # 75 vectors after any other word: a chunk of their own (issue 13 item 8)
    most = prompts.row(f"a photo of {TOKEN}", TOKEN, 75)
    assert [c.slot[1:-1] for c in most.chunks] == [(-1, -1, -1), tuple(range(75))]
    assert prompts.row("", TOKEN, 1).chunks == (inject.Chunk((49406, 49407), (-1, -1)),)


def test_batch_pads_chunks_to_the_longest_prompt(prompts):
    long = " ".join(["cat"] * 80)
    b = prompts.batch([f"{TOKEN} " + long, "a cat", long], TOKEN, 2, pad_id=0)
    assert b.chunks == 2 and b.ids.shape == b.slot.shape == (6, 77)
    assert b.ids[0, 0] == 49406 and b.ids[0, 76] == 49407 and b.slot[0, 1:3].tolist() == [0, 1]
    assert b.ids[2, :4].tolist() == [49406, 320, 2368, 49407] and (b.ids[2, 4:] == 0).all()
    assert b.ids[3, :2].tolist() == [49406, 49407] and (b.ids[3, 2:] == 0).all()  # the short prompt's empty chunk
    assert b.has_slots and not prompts.batch(["a cat"], TOKEN, 2, 0).has_slots
    states = torch.arange(6.0).reshape(6, 1, 1).expand(6, 77, 1)
    assert b.join(states).shape == (3, 154, 1) and b.join(states)[1, 77:, 0].eq(3).all()
    assert b.first(torch.arange(6.0)[:, None]).flatten().tolist() == [0, 2, 4]


@pytest.mark.parametrize("family", FAMILIES)
def test_long_prompt_is_the_chunks_encoded_apart(family, request):
    """Conditioning of a two-chunk prompt = each chunk's own encoding, joined (pooled: the first's)."""
    model = request.getfixturevalue(family)
    vec = vectors_for(model)
    first, second = " ".join(["cat"] * 70) + f" {TOKEN} dog dog", f"{TOKEN} on a hill"  # 74 + 2 > 75
    with torch.no_grad():
        whole = model.encode_prompts([f"{first} {second}"], TOKEN, vec)
        a, b = model.encode_prompts([first], TOKEN, vec), model.encode_prompts([second], TOKEN, vec)
    if family == "tiny_sdxl":
        assert whole.crossattn.shape[1] == 154
        torch.testing.assert_close(whole.crossattn, torch.cat([a.crossattn, b.crossattn], 1))
        torch.testing.assert_close(whole.pooled, a.pooled)  # batch sizes differ: float noise only
    else:
        assert whole.shape[1] == 154
        torch.testing.assert_close(whole, torch.cat([a, b], 1))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_token_past_75_gets_gradients(family, request):
    model = request.getfixturevalue(family)
    vec = vectors_for(model)
    text = " ".join(["cat"] * 80) + f" {TOKEN}"
    assert len(model.tokenize(text)) > 75
    with model.training():
        cond = model.encode_prompts([text, "a cat"], TOKEN, vec)
        model.predict(torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), cond).square().mean().backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in vec.values())


def test_prompts_are_tokenized_once(prompts, monkeypatch):
    calls = []
    real = prompts.tokenizer.__class__.__call__
    monkeypatch.setattr(prompts.tokenizer.__class__, "__call__",
                        lambda self, text, **kw: calls.append(text) or real(self, text, **kw))
    for _ in range(3):
        prompts.batch(["a photo of " + TOKEN, "a cat"], TOKEN, 2, 0)
    assert sorted(calls) == sorted(["a photo of " + TOKEN, "a cat", TOKEN])


def test_splice_only_touches_slots_and_keeps_the_graph():
    embeds = torch.randn(2, 5, 4)
    slot = torch.tensor([[-1, 0, 1, -1, -1], [-1, -1, -1, 0, 1]])
    vec = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    out = inject.splice(embeds, slot, vec)
    assert out.dtype == embeds.dtype
    assert torch.equal(out[0, 1:3], vec.detach().float()) and torch.equal(out[1, 3:5], vec.detach().float())
    assert torch.equal(out[slot < 0], embeds[slot < 0])
    out.sum().backward()
    assert torch.equal(vec.grad, torch.full((2, 4), 2.0, dtype=torch.float64))  # each vector used twice


def test_hook_is_removed_even_after_an_error(tiny_sd1):
    emb = tiny_sd1.text_encoder.get_input_embeddings()
    with pytest.raises(RuntimeError), inject.spliced(emb, torch.zeros(1, 77, dtype=torch.long), torch.zeros(1, 32)):
        raise RuntimeError("boom")
    tiny_sd1.encode_prompts([f"a {TOKEN}"], TOKEN, vectors_for(tiny_sd1))
    assert not emb._forward_hooks


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_vectors_get_gradients(family, request):
    model = request.getfixturevalue(family)
    assert isinstance(model, TrainableModel)
    vec = vectors_for(model)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with model.training():
        assert not any(p.requires_grad for p in all_weights(model))
        cond = model.encode_prompts([f"a photo of {TOKEN}", f"{TOKEN} and {TOKEN}"], TOKEN, vec)
        model.predict(latents, torch.tensor([10, 700]), cond).square().mean().backward()
    for k, v in vec.items():
        assert v.grad is not None and v.grad.abs().sum() > 0, k
    assert all(p.grad is None for p in all_weights(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_without_the_token_is_the_plain_encoding(family, request):
    model = request.getfixturevalue(family)
    texts = ["a photo of a cat", "watercolor, a house by the sea"]
    with torch.no_grad():
        ours = model.encode_prompts(texts, TOKEN, vectors_for(model))
        plain = []
        for te, tok in [(model.text_encoder, model.tokenizer), (getattr(model, "text_encoder_2", None),
                                                                getattr(model, "tokenizer_2", None))]:
            if te is None:
                continue
            ids = tok(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
            out = te(ids, output_hidden_states=True)
            plain.append(out.hidden_states[-2] if model.family == "sdxl" else out[0])
    if model.family == "sdxl":
        torch.testing.assert_close(ours.crossattn, torch.cat(plain, -1), rtol=0, atol=0)
    else:
        torch.testing.assert_close(ours, plain[0], rtol=0, atol=0)


def test_multi_vector_positions_reach_the_encoder(tiny_sd1):
    """The spliced embeddings are exactly the vectors at the placeholder positions."""
    vec = vectors_for(tiny_sd1, n=3)
    seen = []
    emb = tiny_sd1.text_encoder.get_input_embeddings()
    h = emb.register_forward_hook(lambda m, i, o: seen.append(o.detach()))  # registered first: sees the raw output
    try:
        with torch.no_grad():
            tiny_sd1.encode_prompts([f"{TOKEN} x {TOKEN}"], TOKEN, vec)
    finally:
        h.remove()
    # our hook runs after the probe, so splice the probe's output ourselves and compare rows
    row = tiny_sd1.prompts.row(f"{TOKEN} x {TOKEN}", TOKEN, 3)
    assert row.slot[:9] == (-1, 0, 1, 2, -1, 0, 1, 2, -1)
    out = inject.splice(seen[0], tiny_sd1.prompts.batch([f"{TOKEN} x {TOKEN}"], TOKEN, 3, 0).slot, vec["emb"])
    assert torch.equal(out[0, 1:4], vec["emb"].detach()) and torch.equal(out[0, 5:8], vec["emb"].detach())


def test_training_restores_flags_after_an_exception(tiny_sd1):
    m = tiny_sd1
    probe = m.unet.conv_in.weight
    probe.requires_grad_(False)  # a mixed state, to see that it comes back exactly
    m.text_encoder.train()
    try:
        before_grad = [p.requires_grad for p in all_weights(m)]
        before_mode = [s.training for mod in (m.unet, m.vae, m.text_encoder) for s in mod.modules()]
        with pytest.raises(RuntimeError, match="boom"), m.training(gradient_checkpointing=True):
            assert not any(p.requires_grad for p in all_weights(m))
            assert m.unet.training and m.text_encoder.text_model.encoder.gradient_checkpointing
            assert not m.vae.training
            raise RuntimeError("boom")
        assert [p.requires_grad for p in all_weights(m)] == before_grad
        assert [s.training for mod in (m.unet, m.vae, m.text_encoder) for s in mod.modules()] == before_mode
        ckpt = [s.gradient_checkpointing for mod in (m.unet, m.text_encoder) for s in mod.modules()
                if hasattr(s, "gradient_checkpointing")]
        assert ckpt and not any(ckpt)
    finally:
        probe.requires_grad_(True)
        m.text_encoder.eval()


def test_gradient_checkpointing_gives_the_same_gradients(tiny_sd1):
    grads = []
    for ckpt in (False, True):
        vec = vectors_for(tiny_sd1)
        with tiny_sd1.training(gradient_checkpointing=ckpt):
            cond = tiny_sd1.encode_prompts([f"a {TOKEN}"], TOKEN, vec)
            tiny_sd1.predict(torch.ones(1, 4, 8, 8), torch.tensor([300]), cond).sum().backward()
        grads.append(vec["emb"].grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_token_helpers(tiny_sdxl):
    ids = tiny_sdxl.tokenize("photograph")
    assert tiny_sdxl.decode_tokens(ids) == ["photograph</w>"]
    rows = tiny_sdxl.token_embeddings("teddy bear")
    assert {k: tuple(v.shape) for k, v in rows.items()} == {"clip_l": (2, 32), "clip_g": (2, 64)}
    assert torch.equal(rows["clip_g"], tiny_sdxl.text_encoder_2.get_input_embeddings().weight[
        torch.tensor(tiny_sdxl.tokenize("teddy bear"))].detach())
    with pytest.raises(ValueError, match="slots"):
        tiny_sdxl.encode_prompts(["a"], TOKEN, {"emb": torch.zeros(1, 32)})


def test_alphas_and_latents(tiny_sd2v):
    a = tiny_sd2v.alphas_cumprod()
    assert a.dtype == torch.float32 and a.shape == (1000,)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(a, torch.cumprod(1 - betas, 0).float())
    assert tiny_sd2v.prediction_type == "v_prediction"
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    lat = tiny_sd2v.encode_images(x)
    assert lat.shape == (2, 4, 8, 8) and lat.dtype == torch.float32 and not lat.requires_grad
    assert isinstance(tiny_sd2v.cache_key, str) and tiny_sd2v.cache_key == tiny_sd2v.cache_key


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_listen_to_the_text(family, request):
    """random_models tunes the tiny UNets so the vectors move the prediction (else no test could
    see training learn); two random vector sets must give clearly different outputs."""
    model = request.getfixturevalue(family)
    g = torch.Generator().manual_seed(0)
    lat, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([200, 700])
    with torch.no_grad():
        a, b = (model.predict(lat, t, model.encode_prompts([f"a photo of {TOKEN}"] * 2, TOKEN,
                                                             vectors_for(model, seed=s))) for s in (1, 2))
    assert float((a - b).square().mean() / a.var()) > 0.05
