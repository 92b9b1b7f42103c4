"""lib_ti/webui/host_model.py (the adapter over the host's loaded model) against the stand-in host
(tests/fakehost) with tiny SD1 and SDXL models: only the vectors get gradients, every flag / hook /
db entry is back after a run (also after an exception), prompts are encoded exactly as the host's
txt2img encodes them, reload clears the cond caches, and host_load_check says why a file did not load.
The same checks against the real host: tests/host/README.md."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch
from conftest import fake_host_modules

from lib_ti.model import SizeCond, TrainableModel

TESTS = Path(__file__).resolve().parent
TOKEN = "tiok-ti42"
WIDTHS = {"sd1": {"emb": 32}, "sdxl": {"clip_l": 32, "clip_g": 64}}
FAMILIES = ("sd1", "sdxl")


@pytest.fixture
def host(tmp_path):
    """Installs the stand-in host in sys.modules: `host(family, **options)` loads a tiny model and
    returns the fake `modules` package. Afterwards sys.modules and sys.path are exactly as before."""
    with fake_host_modules() as fakehost:
        yield lambda family="sd1", **kw: fakehost.install(str(tmp_path / "webui"), family, **kw)


# ---------------------------------------------------------------- helpers

def snapshot(m, db) -> dict:
    """Everything a run may touch, as comparable values."""
    mods = list(m.named_modules())
    embedders = getattr(getattr(m, "conditioner", None), "embedders", [])
    return {
        "requires_grad": [(n, p.requires_grad) for n, p in m.named_parameters()],
        "grads": [n for n, p in m.named_parameters() if p.grad is not None],
        "hooks": [(n, list(x._forward_pre_hooks.values()), list(x._forward_hooks.values()),
                   list(x._backward_hooks.values())) for n, x in mods],
        "instance_forward": [n for n, x in mods if "forward" in vars(x)],
        "modes": [(n, x.training) for n, x in mods],
        "db_words": [(k, id(v)) for k, v in db.word_embeddings.items()],
        "db_lookup": {k: [(tuple(ids), id(e)) for ids, e in v] for k, v in db.ids_lookup.items()},
        "embedders": [(getattr(e, "is_trainable", None), getattr(e, "ucg_rate", None)) for e in embedders],
    }


def host_embedding(family: str, name: str, n: int = 2, seed: int = 1):
    from modules.textual_inversion.textual_inversion import Embedding

    g = torch.Generator().manual_seed(seed)
    vecs = {k: torch.randn(n, w, generator=g) for k, w in WIDTHS[family].items()}
    emb = Embedding(vecs["emb"] if family == "sd1" else vecs, name)
    emb.vectors, emb.shape = n, sum(WIDTHS[family].values())
    return emb


def start_vectors(model, n: int = 2) -> dict[str, torch.Tensor]:
    rows = model.token_embeddings("cat")
    return {k: v[:1].repeat(n, 1).clone().requires_grad_(True) for k, v in rows.items()}


SIZES = [SizeCond((64, 64), (0, 0), (64, 64))] * 2
TEXTS = [f"a photo of {TOKEN}", f"{TOKEN} on a table"]


def step(model, vectors, seed: int = 0, texts=TEXTS) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    a = model.alphas_cumprod()[t].view(-1, 1, 1, 1)
    cond = model.encode_prompts(texts, TOKEN, vectors, SIZES)
    pred = model.predict((a.sqrt() * x0 + (1 - a).sqrt() * noise).to(model.dtype), t, cond)
    loss = torch.nn.functional.mse_loss(pred, noise)
    loss.backward()
    return loss


def txt2img(m, prompt: str, seed: int = 7, cond: list | None = None) -> bytes:
    """The image's bytes; `cond` collects the conditioning the host sampled with (p.c), which is what
    a check that the vectors reached the render can compare with margin (a tiny random model's
    uint8 image may round two different conditionings to the same bytes)."""
    from modules import processing

    p = processing.StableDiffusionProcessingTxt2Img(sd_model=m, prompt=prompt, steps=3, seed=seed, width=64,
                                                    height=64, do_not_reload_embeddings=True)
    with contextlib.closing(p):
        image = processing.process_images(p).images[0].tobytes()
        if cond is not None:  # before close(), which drops it
            c = p.c
            cond.append(torch.cat([c[k].flatten() for k in sorted(c)]) if isinstance(c, dict) else c.flatten())
    return image


# ---------------------------------------------------------------- the protocol


@pytest.mark.parametrize("family", FAMILIES)
def test_protocol_reads_the_host_model(host, family):
    host(family)

    from modules import shared

    from lib_ti.webui import host_model

    m = shared.sd_model
    model = host_model.borrow()
    assert isinstance(model, TrainableModel)
    assert (model.family, model.prediction_type, model.dtype) == (family, "epsilon", torch.float32)
    assert model.slots() == WIDTHS[family]
    ids = model.tokenize(TOKEN)
    assert ids == m.cond_stage_model.tokenize([TOKEN])[0]  # what the db matches names with
    assert model.decode_tokens(ids) == ["ti", "ok</w>", "-</w>", "ti</w>", "4</w>", "2</w>"]
    rows = model.token_embeddings("cat")
    host_rows = m.cond_stage_model.encode_embedding_init_text("cat", 1)  # rows before the transformer
    assert torch.equal(torch.cat([rows[k] for k in WIDTHS[family]], dim=1), host_rows)
    alphas = model.alphas_cumprod()
    m.alphas_cumprod = m.alphas_cumprod.half()  # the last generation's override must not leak in
    assert torch.equal(model.alphas_cumprod(), alphas) and torch.equal(alphas, m.alphas_cumprod_original)
    latents = model.encode_images(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float32
    assert model.cache_key == host_model.borrow().cache_key


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_gives_gradients_to_the_vectors_only_and_restores_everything(host, family, checkpointing):
    host(family)

    from modules import sd_hijack, shared

    from lib_ti.webui import host_model

    m, db = shared.sd_model, sd_hijack.model_hijack.embedding_db
    previous = host_embedding(family, TOKEN)
    db.register_embedding(previous, m)  # a file of that name was loaded before the run
    model = host_model.borrow()
    before = snapshot(m, db)
    assert any(f for _, f in before["requires_grad"])  # the host leaves the UNet trainable
    vectors = start_vectors(model)
    start = {k: v.detach().clone() for k, v in vectors.items()}
    opt = torch.optim.AdamW(list(vectors.values()), lr=0.1)
    with model.training(gradient_checkpointing=checkpointing):
        assert not any(p.requires_grad for p in m.parameters())
        assert bool(snapshot(m, db)["instance_forward"]) == checkpointing
        for i in range(3):
            step(model, vectors, seed=i)
            assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in vectors.values())
            assert not any(p.grad is not None for p in m.parameters())
            live = db.word_embeddings[TOKEN]
            assert live is not previous and live.vectors == 2
            assert (live.vec is vectors["emb"]) if family == "sd1" else \
                all(live.vec[k] is vectors[k] for k in vectors)
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert all(not torch.equal(v.detach(), start[k]) for k, v in vectors.items())
    assert snapshot(m, db) == before
    assert db.word_embeddings[TOKEN] is previous


@pytest.mark.parametrize("family", FAMILIES)
def test_everything_is_restored_after_an_exception(host, family):
    host(family)

    from modules import sd_hijack, shared

    from lib_ti.webui import host_model

    m, db = shared.sd_model, sd_hijack.model_hijack.embedding_db
    model = host_model.borrow()
    before = snapshot(m, db)
    vectors = start_vectors(model)
    with pytest.raises(RuntimeError, match="boom"), model.training(gradient_checkpointing=True):
        step(model, vectors)
        assert TOKEN in db.word_embeddings
        raise RuntimeError("boom")
    assert snapshot(m, db) == before
    assert TOKEN not in db.word_embeddings


def test_sdxl_text_embedders_trainable_and_without_dropout_for_the_run_only(host):
    host("sdxl")

    from modules import shared

    from lib_ti.webui import host_model

    m = shared.sd_model
    embedders = list(m.conditioner.embedders)
    embedders[1].ucg_rate = 0.5  # a prompt-dropout rate left by someone: training must not drop prompts
    del embedders[0].ucg_rate  # and a wrapper that never got one (set only by get_learned_conditioning)
    model = host_model.borrow()
    with model.training():
        assert [e.is_trainable for e in embedders] == [True, True, False, False, False]
        assert all(e.ucg_rate == 0.0 for e in embedders)
        vectors = start_vectors(model)
        for seed in range(3):  # with a 0.5 dropout some rows would lose their gradient
            step(model, vectors, seed=seed)
            assert all(bool((v.grad.abs().sum(dim=-1) > 0).all()) for v in vectors.values())
            for v in vectors.values():
                v.grad = None
    assert [e.is_trainable for e in embedders] == [False] * 5
    assert embedders[1].ucg_rate == 0.5 and "ucg_rate" not in vars(embedders[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_training_prompts_are_encoded_exactly_as_txt2img_encodes_them(host, family):
    host(family)

    from modules import processing, sd_hijack, shared

    from lib_ti.webui import host_model

    m, db = shared.sd_model, sd_hijack.model_hijack.embedding_db
    emb = host_embedding(family, TOKEN)
    db.register_embedding(emb, m)
    prompt = f"a photo of {TOKEN}, on a table"
    with torch.no_grad():
        ref = m.get_learned_conditioning(processing.SdConditioning([prompt], width=64, height=64))
    db.register_embedding_by_name(None, m, TOKEN)
    vectors = {k: v.clone() for k, v in (emb.vec.items() if family == "sdxl" else {"emb": emb.vec}.items())}
    model = host_model.borrow()
    with model.training(), torch.no_grad():
        got = model.encode_prompts([prompt], TOKEN, vectors, SIZES[:1])
    if family == "sdxl":
        assert got.keys() == ref.keys() == {"crossattn", "vector"}
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    else:
        assert torch.equal(got, ref)


def test_clip_skip_override_applies_to_training_prompts_only(host):
    host("sd1")

    from modules import shared

    from lib_ti.webui import host_model

    m = shared.sd_model
    with torch.no_grad():
        shared.opts.CLIP_stop_at_last_layers = 2
        ref = m.get_learned_conditioning(["a photo of a cat"])
        shared.opts.CLIP_stop_at_last_layers = 1
        plain = m.get_learned_conditioning(["a photo of a cat"])
        model = host_model.borrow(clip_skip=2)
        vectors = start_vectors(model)
        with model.training():
            assert torch.equal(model.encode_prompts(["a photo of a cat"], TOKEN, vectors), ref)
        assert torch.equal(host_model.borrow().encode_prompts(["a photo of a cat"], TOKEN, vectors), plain)
    assert shared.opts.CLIP_stop_at_last_layers == 1


def test_gradient_checkpointing_gives_the_same_gradients(host):
    host("sd1")

    from modules import shared

    from lib_ti.webui import host_model

    model = host_model.borrow()
    grads = []
    for checkpointing in (False, True):
        vectors = start_vectors(model)
        with model.training(gradient_checkpointing=checkpointing):
            step(model, vectors)
        grads.append(vectors["emb"].grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert not any("forward" in vars(x) for x in shared.sd_model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_encoding_outside_a_run_leaves_the_db_alone(host, family):
    host(family)

    from modules import sd_hijack, shared

    from lib_ti.webui import host_model

    m, db = shared.sd_model, sd_hijack.model_hijack.embedding_db
    before = snapshot(m, db)
    model = host_model.borrow()
    with torch.no_grad():
        model.encode_prompts(TEXTS, TOKEN, start_vectors(model), SIZES)
    assert snapshot(m, db) == before


def test_previews_during_a_run_see_the_live_vectors_and_the_db_comes_back(host):
    host("sd1")

    from modules import sd_hijack, shared

    from lib_ti.webui import host_model

    m, db = shared.sd_model, sd_hijack.model_hijack.embedding_db
    db.register_embedding(host_embedding("sd1", TOKEN), m)
    conds: list[torch.Tensor] = []
    plain, with_token = txt2img(m, "a photo of a cat"), txt2img(m, f"a photo of {TOKEN}", cond=conds)
    model = host_model.borrow()
    vectors = start_vectors(model)
    with model.training():
        for i in range(2):
            step(model, vectors, seed=i)
            with torch.no_grad():  # a big optimizer step; not a constant shift, which the first layer norm undoes
                vectors["emb"] += 0.5 * torch.randn(vectors["emb"].shape, generator=torch.Generator().manual_seed(i))
            txt2img(m, f"a photo of {TOKEN}", cond=conds)  # same prompt: the cond cache must not serve it
            live = model.encode_prompts([f"a photo of {TOKEN}"], TOKEN, vectors, SIZES[:1]).detach().flatten()
            assert torch.allclose(conds[-1], live, atol=1e-5)  # the preview sampled with the live vectors
    before, first, second = conds
    assert (first - before).abs().max() > 1e-2 and (second - first).abs().max() > 1e-2
    # afterwards the host renders exactly as before (same computation, so same bytes)
    assert txt2img(m, "a photo of a cat") == plain
    after: list[torch.Tensor] = []
    assert txt2img(m, f"a photo of {TOKEN}", cond=after) == with_token and torch.equal(after[0], before)


# ---------------------------------------------------------------- memory modes and refusals


@pytest.mark.parametrize("family", FAMILIES)
def test_medvram_keeps_unet_and_text_encoder_in_place_for_the_run(host, family):
    host(family, medvram=True)

    from modules import lowvram, sd_hijack, shared

    from lib_ti.webui import host_model

    m, db = shared.sd_model, sd_hijack.model_hijack.embedding_db
    assert m.lowvram

    def hooked(root) -> int:
        return sum(getattr(h, "__name__", "") == "send_me_to_gpu" for x in root.modules()
                   for h in x._forward_pre_hooks.values())

    text_root = m.conditioner if family == "sdxl" else m.cond_stage_model
    assert hooked(m.model) == 1 and hooked(text_root) == 1
    before = snapshot(m, db)
    model = host_model.borrow()
    vectors = start_vectors(model)
    with model.training():
        assert hooked(m.model) == 0 and hooked(text_root) == 0 and hooked(m.first_stage_model) == 1
        model.encode_images(torch.rand(1, 3, 64, 64) * 2 - 1)  # the VAE comes in, and goes out again
        assert lowvram.module_in_gpu is None
        step(model, vectors)
        assert all(v.grad is not None for v in vectors.values())
    assert snapshot(m, db) == before and lowvram.module_in_gpu is None


def test_lowvram_and_other_unusable_hosts_are_refused_with_a_reason(host):
    host("sd1", lowvram=True)

    from modules import sd_hijack, sd_unet, shared

    from lib_ti.webui import host_model

    with pytest.raises(host_model.HostError, match="--lowvram"):
        host_model.borrow()
    shared.cmd_opts.lowvram = False
    model = host_model.borrow()
    shared.cmd_opts.lowvram = True
    with pytest.raises(host_model.HostError, match="--lowvram"), model.training():
        pass
    shared.cmd_opts.lowvram = False
    sd_unet.current_unet = "TensorRT"
    with pytest.raises(host_model.HostError, match="UNet"):
        host_model.borrow()
    sd_unet.current_unet = None
    m = shared.sd_model
    m.is_sd1, m.is_sd3 = False, True
    with pytest.raises(host_model.HostError, match="SD3"):
        host_model.borrow()
    m.is_sd1, m.is_sd3 = True, False
    db = sd_hijack.model_hijack.embedding_db
    del sd_hijack.model_hijack.embedding_db  # Forge: no database in sd_hijack
    try:
        with pytest.raises(host_model.HostError, match="embedding_db"):
            host_model.borrow()
    finally:
        sd_hijack.model_hijack.embedding_db = db
    shared.sd_model = None
    with pytest.raises(host_model.HostError, match="no model"):
        host_model.borrow()


# ---------------------------------------------------------------- after saving


def write_embedding(path: Path, widths: dict[str, int], n: int = 2) -> None:
    from lib_ti import formats
    from lib_ti.embedding import Embedding

    emb = Embedding({k: torch.randn(n, w) for k, w in widths.items()}, step=3, name=path.stem)
    formats.save_embedding(emb, str(path), "safetensors", overwrite=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_reload_and_host_load_check(host, family, tmp_path):
    host(family)

    from modules import processing, sd_hijack, shared

    from lib_ti.webui import host_model

    db = sd_hijack.model_hijack.embedding_db
    folder = Path(host_model.embeddings_dir())
    assert folder == Path(shared.cmd_opts.embeddings_dir) and folder.is_dir()
    assert host_model.checkpoint_ids() == ("0123456789", f"tiny-{family}")

    path = folder / "newtok-ti11.safetensors"
    write_embedding(path, WIDTHS[family], n=3)
    processing.StableDiffusionProcessing.cached_c = ["stale", "stale"]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_uc = ["stale", "stale"]
    assert "newtok-ti11" not in db.word_embeddings
    host_model.reload_embeddings()
    assert "newtok-ti11" in db.word_embeddings
    assert processing.StableDiffusionProcessing.cached_c == [None, None]
    assert processing.StableDiffusionProcessingTxt2Img.cached_hr_uc == [None, None]

    ok, msg = host_model.host_load_check("newtok-ti11", 3, path=str(path))
    assert ok, msg
    ok, msg = host_model.host_load_check("newtok-ti11", 2)
    assert not ok and "3 vectors" in msg
    ok, msg = host_model.host_load_check("missing-ti12", 2)
    assert not ok and "did not load" in msg and str(folder) in msg

    other = {"emb": 48} if family == "sd1" else {"emb": 32}  # the other family's width
    write_embedding(folder / "wrongtok-ti13.safetensors", other)
    host_model.reload_embeddings()
    ok, msg = host_model.host_load_check("wrongtok-ti13", 2)
    assert not ok and "skipped" in msg and str(sum(WIDTHS[family].values())) in msg

    (folder / "sub").mkdir()  # a second file of the same name (names are unique across sub-folders)
    write_embedding(folder / "sub" / "newtok-ti11.safetensors", WIDTHS[family], n=3)
    host_model.reload_embeddings()
    loaded_from = db.word_embeddings["newtok-ti11"].filename
    ok, msg = host_model.host_load_check("newtok-ti11", 3, path=str(path))
    assert ok == (os.path.samefile(loaded_from, path)), msg
    if not ok:
        assert "share the name" in msg
