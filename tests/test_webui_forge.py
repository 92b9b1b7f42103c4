"""lib_ti/webui/forge_model.py and forge_embeddings.py (the Forge adapter) against the stand-in
Forge (tests/fakehost/forge_host.py) with tiny SD1 and SDXL models: the host is told apart from
A1111, only the vectors get gradients and they equal an out-of-place reference through Forge's
in-place transformer block (with and without checkpointing), everything is back after a run and
after an exception, every engine's database is hot-reloaded, refusals say what to do.
The same in a real Forge: tests/host/test_forge_host.py."""

from __future__ import annotations

import contextlib
import hashlib
import sys
from pathlib import Path

import pytest
import torch
from conftest import fake_host_modules

from lib_ti.model import SizeCond, TrainableModel

TOKEN = "tiok-ti42"
WIDTHS = {"sd1": {"emb": 32}, "sdxl": {"clip_l": 32, "clip_g": 64}}
ENGINES = {"sd1": ["text_processing_engine"], "sdxl": ["text_processing_engine_l", "text_processing_engine_g"]}
SIZES = [SizeCond((64, 64), (0, 0), (64, 64))] * 2
TEXTS = [f"a photo of {TOKEN}", f"{TOKEN} on a table"]


@pytest.fixture
def forge(tmp_path):
    """`forge(family, **options)` starts the stand-in Forge and returns the fake `modules`; afterwards
    sys.modules (including `backend`) and sys.path are as before."""
    before = set(sys.modules)
    with fake_host_modules():
        from fakehost import forge_host

        yield lambda family="sd1", **kw: forge_host.install(str(tmp_path / "forge"), family, **kw)
    from lib_ti.webui import forge_embeddings

    forge_embeddings._app.clear()  # an app remembered by on_app_started belongs to this test only
    for name in set(sys.modules) - before:
        if name.split(".")[0] in ("backend", "modules", "fakehost"):
            del sys.modules[name]


def engines(m) -> dict:
    return {a: getattr(m, a) for a in ("text_processing_engine", "text_processing_engine_l",
                                       "text_processing_engine_g") if hasattr(m, a)}


def snapshot(m) -> dict:
    """Everything a run may touch, as comparable values."""
    from backend.nn import unet
    from backend.text_processing import classic_engine

    roots = {"unet": m.forge_objects.unet.model, "clip": m.forge_objects.clip.cond_stage_model}
    mods = [(f"{r}.{n}", x) for r, root in roots.items() for n, x in root.named_modules()]
    return {
        "objects": [(n, k, id(t)) for n, x in mods for k, t in [*x._parameters.items(), *x._buffers.items()]],
        "flags": [(n, p.requires_grad, p.is_inference(), p.grad is None) for n, x in mods
                  for p in x._parameters.values() if p is not None],
        "values": [(n, k, *fingerprint(t)) for n, x in mods for k, t in [*x._parameters.items(), *x._buffers.items()]
                   if t is not None],
        "hooks": [(n, list(x._forward_pre_hooks.values()), list(x._forward_hooks.values())) for n, x in mods],
        "instance_forward": [n for n, x in mods if "forward" in vars(x)],
        "attention": unet.attention_function,
        "dbs": {a: ([(k, id(v)) for k, v in e.embeddings.word_embeddings.items()],
                    {k: [(tuple(i), id(x)) for i, x in v] for k, v in e.embeddings.ids_lookup.items()})
                for a, e in engines(m).items()},
        "clip_skip": [e.clip_skip for e in engines(m).values()],
        "infotext": dict(classic_engine.last_extra_generation_params),
    }


def fingerprint(t: torch.Tensor) -> tuple:
    """dtype, device, shape and a hash of the exact bytes."""
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return str(t.dtype), str(t.device), tuple(t.shape), hashlib.sha1(raw).hexdigest()


def start_vectors(model, n: int = 2) -> dict[str, torch.Tensor]:
    rows = model.token_embeddings("cat")
    return {k: v[:1].repeat(n, 1).clone().requires_grad_(True) for k, v in rows.items()}


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    return x0, noise, torch.randint(0, 1000, (2,), generator=g)


def loss_of(model, vectors, seed: int = 0) -> torch.Tensor:
    x0, noise, t = batch(seed)
    a = model.alphas_cumprod()[t].view(-1, 1, 1, 1)
    cond = model.encode_prompts(TEXTS, TOKEN, vectors, SIZES)
    pred = model.predict(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, cond)
    return torch.nn.functional.mse_loss(pred, noise)


def txt2img(prompt: str) -> tuple[bytes, str]:
    from modules import processing

    p = processing.StableDiffusionProcessingTxt2Img(prompt=prompt, steps=3, seed=7, width=64, height=64)
    with contextlib.closing(p):
        out = processing.process_images(p)
    return out.images[0].tobytes(), out.info


def save_embedding(folder: Path, name: str, family: str, n: int = 2, widths=None):
    from lib_ti import formats
    from lib_ti.embedding import Embedding

    g = torch.Generator().manual_seed(3)
    vecs = {k: torch.randn(n, w, generator=g) for k, w in (widths or WIDTHS[family]).items()}
    path = folder / f"{name}.safetensors"
    formats.save_embedding(Embedding(vecs, name=name), str(path), "safetensors", overwrite=True)
    return path


# ---------------------------------------------------------------- the protocol


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_forge_is_detected_and_read_through_its_engines(forge, family):
    forge(family)
    from modules import shared

    from lib_ti.webui import forge_embeddings, forge_model, host_model

    m = shared.sd_model
    assert forge_embeddings.is_forge()
    assert next(m.forge_objects.unet.model.parameters()).is_inference()  # as Forge builds it
    model = host_model.borrow()
    assert isinstance(model, forge_model.ForgeModel) and isinstance(model, TrainableModel)
    assert (model.family, model.prediction_type, model.dtype) == (family, "epsilon", torch.float32)
    assert model.slots() == WIDTHS[family]
    name_engine = engines(m)[ENGINES[family][0]]
    assert model.tokenize(TOKEN) == name_engine.tokenize([TOKEN])[0]  # what the dbs match names with
    assert model.decode_tokens(model.tokenize(TOKEN)) == ["ti", "ok</w>", "-</w>", "ti</w>", "4</w>", "2</w>"]
    rows = model.token_embeddings("cat")
    for slot, eng in zip(WIDTHS[family], ENGINES[family]):
        weight = getattr(m, eng).text_encoder.transformer.text_model.embeddings.token_embedding.wrapped.weight
        assert torch.equal(rows[slot], weight[name_engine.tokenize(["cat"])[0]].float())
    assert torch.equal(model.alphas_cumprod(), m.forge_objects.unet.model.predictor.alphas_cumprod)
    latents = model.encode_images(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert latents.shape == (2, 4, 8, 8) and not latents.is_inference()


def test_the_stand_in_has_forges_autograd_traps(forge):
    """Without the adapter's changes backward fails as in Forge: inference-tensor weights, then the
    in-place residual adds."""
    forge("sd1")
    from modules import shared

    from lib_ti.webui import forge_patches, inference_weights

    m = shared.sd_model
    dm = m.forge_objects.unet.model.diffusion_model
    ctx = torch.randn(1, 77, 32, requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        dm(torch.randn(1, 4, 8, 8), torch.tensor([10.0]), context=ctx).sum().backward()
    with inference_weights.trainable([m.forge_objects.unet.model]), forge_patches.pytorch_attention(), \
            pytest.raises(RuntimeError, match="inplace"):
        dm(torch.randn(1, 4, 8, 8), torch.tensor([10.0]), context=ctx).sum().backward()


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_only_the_vectors_train_and_everything_is_restored(forge, tmp_path, family, checkpointing):
    forge(family)
    from modules import shared

    from lib_ti.webui import host_model

    m = shared.sd_model
    previous = save_embedding(tmp_path / "forge" / "embeddings", TOKEN, family)
    host_model.reload_embeddings()  # a file of that name was loaded before the run
    plain = txt2img("a red ball")
    before = snapshot(m)
    model = host_model.borrow()
    vectors = start_vectors(model)
    start = {k: v.detach().clone() for k, v in vectors.items()}
    opt = torch.optim.AdamW(list(vectors.values()), lr=0.1)
    with model.training(gradient_checkpointing=checkpointing):
        for i in range(3):
            loss_of(model, vectors, seed=i).backward()
            assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in vectors.values())
            assert not any(p.requires_grad or p.grad is not None for r in (m.forge_objects.unet.model,
                           m.forge_objects.clip.cond_stage_model) for p in r.parameters())
            for eng in engines(m).values():
                live = eng.embeddings.word_embeddings[TOKEN]
                assert live.vectors == 2 and getattr(live, "filename", None) is None  # ours, not the file
            opt.step()
            opt.zero_grad(set_to_none=True)
            _, info = txt2img(f"a photo of {TOKEN}")  # a preview: weights come back as inference tensors
            assert "TI: " + TOKEN in info
    assert all(not torch.equal(v.detach(), start[k]) for k, v in vectors.items())
    assert snapshot(m) == before
    for eng in engines(m).values():
        assert eng.embeddings.word_embeddings[TOKEN].filename == str(previous)
    assert txt2img("a red ball") == plain


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_equals_an_out_of_place_reference(forge, checkpointing):
    """The adapter's gradient through Forge's in-place transformer block, with and without
    checkpointing, equals the gradient through the same block written out of place."""
    forge("sd1")
    from backend.nn import unet

    from lib_ti.webui import host_model

    model = host_model.borrow()
    vectors = start_vectors(model)
    with model.training(gradient_checkpointing=checkpointing):
        loss_of(model, vectors).backward()
    got = vectors["emb"].grad.clone()

    def out_of_place(self, x, context=None, transformer_options=None):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context=context)
        return x + self.ff(self.norm3(x))

    vectors["emb"].grad = None
    original = unet.BasicTransformerBlock._forward
    unet.BasicTransformerBlock._forward = out_of_place
    try:
        with model.training(gradient_checkpointing=False):
            loss_of(model, vectors).backward()
    finally:
        unet.BasicTransformerBlock._forward = original
    ref = vectors["emb"].grad
    assert ref.abs().max() > 0
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-7)


def test_everything_is_restored_after_an_exception(forge):
    forge("sd1")
    from modules import shared

    from lib_ti.webui import host_model

    m = shared.sd_model
    txt2img("a red ball")  # Forge's prompts turn the fp16 token embedding to float32 (the run's would too)
    before = snapshot(m)
    model = host_model.borrow()
    vectors = start_vectors(model)
    with pytest.raises(RuntimeError, match="boom"), model.training(gradient_checkpointing=True):
        loss_of(model, vectors).backward()
        assert TOKEN in m.text_processing_engine.embeddings.word_embeddings
        raise RuntimeError("boom")
    assert snapshot(m) == before
    assert TOKEN not in m.text_processing_engine.embeddings.word_embeddings


def test_first_use_builds_the_model(forge):
    forge("sd1", load=False)
    from modules import sd_models, shared

    from lib_ti.webui import host_model

    assert isinstance(shared.sd_model, sd_models.FakeInitialModel)
    model = host_model.borrow()
    assert model.family == "sd1" and shared.sd_model.forge_objects is not None


@pytest.mark.parametrize(("options", "words"), [
    ({"refiner": True}, "refiner"),
    ({"inpaint": True}, "inpainting"),
    ({"prediction_type": "edm"}, "eps and v"),
    ({"storage_dtype": "nf4"}, "Diffusion in Low Bits"),
])
def test_refusals_say_what_to_do(forge, options, words):
    forge("sdxl" if "refiner" in options else "sd1", **options)
    from lib_ti.webui import host_model

    with pytest.raises(host_model.HostError, match=words):
        host_model.borrow()


def test_weight_streaming_is_refused_at_the_step(forge):
    forge("sd1")
    from backend import memory_management

    from lib_ti.webui import host_model

    model = host_model.borrow()
    assert model.prediction_type == "epsilon"
    memory_management.cpu_swap = True
    with model.training(), pytest.raises(host_model.HostError, match="GPU Weights"):
        loss_of(model, start_vectors(model))


# ---------------------------------------------------------------- after a save


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_hot_reload_reaches_every_database_and_the_next_prompt(forge, tmp_path, family):
    forge(family)
    from fastapi import FastAPI
    from modules import processing, ui_extra_networks_textual_inversion

    from lib_ti.webui import entry, host_model

    class Api:  # modules/api/api.py keeps its own listing db on the object behind its routes
        def __init__(self):
            self.embedding_db = ui_extra_networks_textual_inversion.ListingDatabase()
            self.embedding_db.add_embedding_dir(str(tmp_path / "forge" / "embeddings"))

        def get_embeddings(self):
            return list(self.embedding_db.word_embeddings)

    app, api = FastAPI(), Api()
    app.add_api_route("/sdapi/v1/embeddings", api.get_embeddings, methods=["GET"])
    entry.on_app_started(None, app)
    emb_dir = tmp_path / "forge" / "embeddings"
    plain = txt2img("a red ball")
    token_before, info = txt2img(f"a photo of {TOKEN}")
    assert "TI:" not in info
    path = save_embedding(emb_dir, TOKEN, family)
    wrong = save_embedding(emb_dir, "otherfam", family, widths={"emb": 48})
    processing.StableDiffusionProcessing.cached_c = [("stale",), "cond", {}]
    host_model.reload_embeddings()
    assert processing.StableDiffusionProcessing.cached_c == [None, None, None]
    assert TOKEN in api.embedding_db.word_embeddings
    assert TOKEN in ui_extra_networks_textual_inversion.embedding_db.word_embeddings
    assert host_model.host_load_check(TOKEN, 2, str(path))[0]
    ok, message = host_model.host_load_check(TOKEN, 3)
    assert not ok and "3" in message
    ok, message = host_model.host_load_check("otherfam", 2, str(wrong))
    assert not ok and "skipped" in message
    with_token, info = txt2img(f"a photo of {TOKEN}")
    assert f"TI: {TOKEN}" in info and with_token != token_before
    assert txt2img("a red ball") == plain


def test_a_job_trains_in_forge_and_the_next_prompt_uses_it(forge, tmp_path):
    """The run layer unchanged on Forge: job.execute trains, saves, reloads, checks the load."""
    forge("sd1")
    from PIL import Image

    from lib_ti.webui import job
    from lib_ti.webui.tasks import REGISTRY

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 120, 200)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a photo of {TOKEN}")
    plain = txt2img("a red ball")
    cfg = job.make_config({"token_string": TOKEN, "train_data_dir": str(data), "resolution": "64",
                           "max_train_steps": 3, "init_word": "ball", "num_vectors_per_token": 2,
                           "sample_every_n_steps": 2, "validation_every_n_steps": 0})
    task = REGISTRY.create(cfg.name)
    job.execute(task, cfg, {"prompt": f"a photo of {TOKEN}", "steps": 2, "width": 64, "height": 64, "seed": 1})
    got = REGISTRY.get(task.id)
    assert got.status == "done", (got.error, got.message)
    assert got.load_check.startswith("ok"), got.load_check
    assert got.previews
    _, info = txt2img(f"a photo of {TOKEN}")
    assert f"TI: {TOKEN}" in info
    assert txt2img("a red ball") == plain


def test_the_train_tab_is_a_top_level_tab_in_forge(forge):
    """Forge never calls on_ui_train_tabs: on_ui_tabs gives the full tab instead of the notice."""
    forge("sd1")
    pytest.importorskip("gradio")
    from lib_ti.webui import entry, tab

    entry.on_script_unloaded()
    tab._built["train_tab"] = False
    ((blocks, title, elem_id),) = entry.on_ui_tabs()
    assert (title, elem_id) == ("TI Trainer", "ti_trainer")
    ids = {getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    assert {"ti_trainer_token_string", "ti_trainer_train", "ti_trainer_interrupt"} <= ids
    assert "ti_trainer_fallback" not in ids
