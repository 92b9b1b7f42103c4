"""The A1111 adapter (lib_ti/webui/host_model.py, host_patches.py, host.py) against the stand-in
reForge (tests/fakehost/reforge_host.py) with tiny SD1 and SDXL models: reForge is served by the
A1111 adapter through reForge's own text wrappers, only the vectors get gradients, gradient
checkpointing really recomputes reForge's ldm_patched UNet blocks (and gives the same gradients),
a run right after a txt2img done under torch.inference_mode works, everything is back afterwards
and txt2img is bit-identical, a preview needs no script runner, the tab's job trains and
hot-reloads; weights left as inference tensors (reForge on a GPU) train, and are put back as they were.
The same in a real reForge: tests/host/check_adapter.py, tests/host/test_reforge_host.py."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import fake_host_modules

from lib_ti.model import SizeCond

TESTS = Path(__file__).resolve().parent
TOKEN = "tiok-ti42"
TEXTS = [f"a photo of {TOKEN}", f"{TOKEN} on a table"]
WIDTHS = {"sd1": {"emb": 32}, "sdxl": {"clip_l": 32, "clip_g": 64}}
SIZES = [SizeCond((64, 64), (0, 0), (64, 64))] * 2


@pytest.fixture
def reforge(tmp_path):
    """`reforge(family)` starts the stand-in reForge and returns the fake `modules`; afterwards
    sys.modules (including `ldm_patched`, `modules_forge`) and sys.path are as before."""
    before = set(sys.modules)
    with fake_host_modules():
        from fakehost import reforge_host

        yield lambda family="sd1": reforge_host.install(str(tmp_path / "reforge"), family)
        tops = reforge_host.TOPS
    for name in set(sys.modules) - before:
        if name.split(".")[0] in tops:
            del sys.modules[name]


def snapshot(m, db) -> dict:
    """Everything a run may touch, as comparable values (weights as objects and flags)."""
    mods = list(m.named_modules())
    return {
        "objects": [(n, k, id(t)) for n, x in mods for k, t in [*x._parameters.items(), *x._buffers.items()]],
        "flags": [(n, p.requires_grad, p.is_inference(), p.grad is None) for n, p in m.named_parameters()],
        "hooks": [(n, list(x._forward_pre_hooks.values()), list(x._forward_hooks.values()),
                   list(x._backward_hooks.values())) for n, x in mods],
        "instance_forward": [n for n, x in mods if "forward" in vars(x)],
        "modes": [(n, x.training) for n, x in mods],
        "db_words": [(k, id(v)) for k, v in db.word_embeddings.items()],
        "db_lookup": {k: [(tuple(ids), id(e)) for ids, e in v] for k, v in db.ids_lookup.items()},
        "embedders": [(getattr(e, "is_trainable", None), getattr(e, "ucg_rate", None))
                      for e in getattr(getattr(m, "conditioner", None), "embedders", [])],
        "forge_unet": id(m.forge_objects.unet.model.diffusion_model),
    }


def weights(m) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def txt2img(m, prompt: str, conds: list | None = None) -> bytes:
    """reForge's txt2img (under inference_mode) as a script-less job gets it from the adapter."""
    from modules import processing

    from lib_ti.webui import host

    p = processing.StableDiffusionProcessingTxt2Img(sd_model=m, prompt=prompt, steps=3, seed=7, width=64,
                                                    height=64, do_not_reload_embeddings=True)
    host.empty_script_runner(p)
    with contextlib.closing(p):
        image = processing.process_images(p).images[0].tobytes()
        if conds is not None:
            c = p.c
            conds.append(torch.cat([c[k].flatten() for k in sorted(c)]) if isinstance(c, dict) else c.flatten())
    return image


def host_embedding(family: str, name: str, n: int = 2):
    from modules.textual_inversion.textual_inversion import Embedding

    g = torch.Generator().manual_seed(1)
    vecs = {k: torch.randn(n, w, generator=g) for k, w in WIDTHS[family].items()}
    emb = Embedding(vecs["emb"] if family == "sd1" else vecs, name)
    emb.vectors, emb.shape = n, sum(WIDTHS[family].values())
    return emb


def start_vectors(model) -> dict[str, torch.Tensor]:
    return {k: v[:1].repeat(2, 1).clone().requires_grad_(True) for k, v in model.token_embeddings("cat").items()}


def loss_of(model, vectors, latents, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (latents.shape[0],), generator=g)
    a = model.alphas_cumprod()[t].view(-1, 1, 1, 1)
    cond = model.encode_prompts(TEXTS, TOKEN, vectors, SIZES)
    pred = model.predict(a.sqrt() * latents + (1 - a).sqrt() * noise, t, cond)
    return torch.nn.functional.mse_loss(pred, noise)


def unet_blocks(m) -> list[tuple[str, torch.nn.Module]]:
    """reForge's ldm_patched transformer and res blocks in the loaded UNet."""
    from ldm_patched.ldm.modules import attention
    from ldm_patched.ldm.modules.diffusionmodules import openaimodel

    kinds = (attention.BasicTransformerBlock, openaimodel.ResBlock)
    return [(n, x) for n, x in m.model.diffusion_model.named_modules() if isinstance(x, kinds)]


# ---------------------------------------------------------------- the protocol


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_stand_in_is_reforge_and_the_a1111_adapter_serves_it(reforge, family):
    reforge(family)
    from ldm_patched.ldm.modules.diffusionmodules import openaimodel
    from modules import processing, sd_hijack, shared

    from lib_ti.webui import forge_embeddings, host_model

    m, db = shared.sd_model, sd_hijack.model_hijack.embedding_db
    assert isinstance(m.model.diffusion_model, openaimodel.UNetModel)  # ldm_patched's, not ldm's
    assert m.model.diffusion_model is m.forge_objects.unet.model.diffusion_model
    kinds = {type(b).__name__: b for _, b in unet_blocks(m)}
    assert not hasattr(kinds["BasicTransformerBlock"], "_forward") and hasattr(kinds["ResBlock"], "_forward")
    assert not forge_embeddings.is_forge()
    model = host_model.borrow()
    assert (type(model).__name__, model.family, model.slots()) == \
        ("HostSDXL" if family == "sdxl" else "HostSD", family, WIDTHS[family])
    wrappers = {k: type(t).__name__ for k, t in model.text_models().items()}  # reForge's forge_clip wrappers,
    assert wrappers == ({"clip_l": "CLIP_SD_XL_L", "clip_g": "CLIP_SD_XL_G"} if family == "sdxl"  # clip_g read
                        else {"emb": "CLIP_SD_15_L"})  # through its HF-style transformer, not as OpenCLIP
    rows = model.token_embeddings("cat")
    assert torch.equal(torch.cat([rows[k] for k in WIDTHS[family]], 1),
                       m.cond_stage_model.encode_embedding_init_text("cat", 1))
    emb = host_embedding(family, TOKEN)
    db.register_embedding(emb, m)
    prompt = f"a photo of {TOKEN}, on a table"
    with torch.no_grad():
        ref = m.get_learned_conditioning(processing.SdConditioning([prompt], width=64, height=64))
    db.register_embedding_by_name(None, m, TOKEN)
    vectors = {k: v.clone() for k, v in (emb.vec.items() if family == "sdxl" else {"emb": emb.vec}.items())}
    with model.training(), torch.no_grad():  # training prompts are encoded as txt2img encodes them
        got = model.encode_prompts([prompt], TOKEN, vectors, SIZES[:1])
    assert all(torch.equal(got[k], ref[k]) for k in ref) if family == "sdxl" else torch.equal(got, ref)
    latents = model.encode_images(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert latents.shape == (2, 4, 8, 8) and latents.is_inference()  # reForge encodes under inference_mode
    p = processing.StableDiffusionProcessingTxt2Img(sd_model=m, prompt="a cat", steps=2, width=64, height=64)
    with pytest.raises(AttributeError, match="alwayson_scripts"):  # reForge's unguarded read, as in the real one
        processing.process_images(p)
    assert not any("forward" in vars(x) for x in m.modules())


@pytest.mark.parametrize(("family", "checkpointing"), [("sd1", False), ("sd1", True), ("sdxl", True)])
def test_a_run_after_a_txt2img_trains_only_the_vectors_and_restores_everything(reforge, family, checkpointing):
    reforge(family)
    from modules import sd_hijack, shared

    from lib_ti.webui import host_model

    m, db = shared.sd_model, sd_hijack.model_hijack.embedding_db
    previous = host_embedding(family, TOKEN)
    db.register_embedding(previous, m)  # a file of that name was loaded before the run
    conds: list[torch.Tensor] = []
    plain, with_token = txt2img(m, "a photo of a cat"), txt2img(m, f"a photo of {TOKEN}", conds)
    before, state = snapshot(m, db), weights(m)
    assert any(f for _, f, _, _ in before["flags"])  # reForge leaves the UNet trainable too
    model = host_model.borrow()
    latents = model.encode_images(torch.rand(2, 3, 64, 64) * 2 - 1)
    vectors = start_vectors(model)
    start = {k: v.detach().clone() for k, v in vectors.items()}
    opt = torch.optim.AdamW(list(vectors.values()), lr=0.1)
    with model.training(gradient_checkpointing=checkpointing):
        assert not any(p.requires_grad for p in m.parameters())
        for i in range(3):
            loss_of(model, vectors, latents, seed=i).backward()
            assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in vectors.values())
            assert not any(p.grad is not None for p in m.parameters())
            live = db.word_embeddings[TOKEN].vec
            assert (live is vectors["emb"]) if family == "sd1" else all(live[k] is v for k, v in vectors.items())
            opt.step()
            opt.zero_grad(set_to_none=True)
        txt2img(m, "a photo of a cat")  # a preview mid-run (under inference_mode), then one more step
        loss_of(model, vectors, latents, seed=3).backward()
    assert all(not torch.equal(v.detach(), start[k]) for k, v in vectors.items())
    assert snapshot(m, db) == before and db.word_embeddings[TOKEN] is previous
    assert all(torch.equal(v, state[k]) for k, v in weights(m).items())
    after: list[torch.Tensor] = []
    assert txt2img(m, "a photo of a cat") == plain
    assert txt2img(m, f"a photo of {TOKEN}", after) == with_token and torch.equal(after[0], conds[0])


def test_checkpointing_recomputes_the_ldm_patched_blocks_with_the_same_gradients(reforge):
    """Without the ldm_patched block classes in host_patches the UNet runs unchecheckpointed and
    nothing is recomputed: this test is what fails then."""
    reforge("sd1")
    from modules import shared

    from lib_ti.webui import host_model

    m = shared.sd_model
    blocks = unet_blocks(m)
    assert {type(b).__name__ for _, b in blocks} == {"BasicTransformerBlock", "ResBlock"}
    calls: dict[str, int] = {}
    # a child of each block: checkpointing re-runs the block's own code in backward, which calls it again
    handles = [(b.norm1 if hasattr(b, "norm1") else b.in_layers).register_forward_hook(
        lambda *_a, n=n: calls.__setitem__(n, calls.get(n, 0) + 1)) for n, b in blocks]
    model = host_model.borrow()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    grads, reruns = [], []
    try:
        for checkpointing in (False, True):
            vectors = start_vectors(model)
            with model.training(gradient_checkpointing=checkpointing):
                patched = [n for n, b in blocks if "forward" in vars(b)]
                loss = loss_of(model, vectors, latents)
                forward = dict(calls)
                loss.backward()
            reruns.append({n: calls[n] - forward[n] for n, _ in blocks})
            calls.clear()
            grads.append(vectors["emb"].grad)
            assert patched == ([n for n, _ in blocks] if checkpointing else [])
    finally:
        for h in handles:
            h.remove()
    assert all(v == 0 for v in reruns[0].values())  # no checkpointing: nothing runs twice
    # every block recomputed once in backward, but the first: it comes before the text conditioning
    # and sees nothing that needs a gradient (frozen weights, noisy latents), so backward never gets there
    assert reruns[1] == {n: int(i > 0) for i, (n, _) in enumerate(blocks)}, reruns[1]
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    assert not any("forward" in vars(x) for x in m.modules())


# ---------------------------------------------------------------- the tab's job, previews included


def test_a_job_with_previews_trains_saves_and_the_next_prompt_uses_it(reforge, tmp_path):
    reforge("sd1")
    from modules import sd_hijack, shared

    from lib_ti import formats
    from lib_ti.webui import host, job

    sys.path.insert(0, str(TESTS))
    try:
        from ui_harness import make_dataset
    finally:
        sys.path.remove(str(TESTS))

    m, db = shared.sd_model, sd_hijack.model_hijack.embedding_db
    image = host.render_preview("a photo of a cat", steps=2, width=64, height=64)  # no script runner given
    assert image is not None and image.size == (64, 64)
    data = make_dataset(tmp_path / "imgs", n=2)
    unknown: list[torch.Tensor] = []
    plain, state = txt2img(m, "a photo of a cat"), weights(m)
    txt2img(m, "a photo of rftok", unknown)  # the name is plain text before the run
    before = snapshot(m, db)
    values = dict(token_string="rftok", init_word="ball", train_data_dir=str(data), resolution="64",
                  max_train_steps=2, learning_rate="0.05", validation_every_n_steps=0, seed=3, train_batch_size=2,
                  use_object_template=True, gradient_checkpointing=True, sample_every_n_steps=2,
                  sample_prompts="a photo of rftok --w 64 --h 64 --s 2")
    task = job.ui_train(f"task(rftok-{time.monotonic_ns()})", values, None)
    assert task.status == "done", task.error
    assert task.previews and task.load_check.startswith("ok"), task.load_check
    saved = formats.read_embedding(task.output).vectors["emb"]
    assert torch.equal(db.word_embeddings["rftok"].vec.float(), saved)  # hot-reloaded from the file
    after = snapshot(m, db)
    assert {k: v for k, v in after.items() if not k.startswith("db")} == \
        {k: v for k, v in before.items() if not k.startswith("db")}
    assert all(torch.equal(v, state[k]) for k, v in weights(m).items())
    assert txt2img(m, "a photo of a cat") == plain
    used: list[torch.Tensor] = []
    txt2img(m, "a photo of rftok", used)  # the next prompt samples with the saved vectors
    assert (used[0] - unknown[0]).abs().max() > 1e-2


def test_weights_made_inference_tensors_by_a_gpu_load_train_and_are_put_back_as_they_were(reforge):
    """On a GPU, reForge loads the UNet to the CPU unless the GPU has more free memory than the CPU
    (model_management.unet_inital_load_device), and the first txt2img moves it onto the GPU inside
    torch.inference_mode (load_models_gpu), which turns its weights into inference tensors that
    autograd cannot save for backward. On the CPU (the stand-in, and the real reForge run with
    --always-cpu) that move changes nothing; here it is made by hand as `.to(device)` does it (a new
    tensor per weight, set as param.data). The adapter gives those weights ordinary tensors on their
    storage for the run (no copy) and trains with the gradients the ordinary weights gave; afterwards
    the weights are reForge's own objects again, inference tensors as it left them."""
    reforge("sd1")
    from modules import shared

    from lib_ti.webui import host_model

    m = shared.sd_model
    plain = txt2img(m, "a photo of a cat")
    assert not any(p.is_inference() for p in m.parameters())  # on the CPU the weights stay ordinary
    model = host_model.borrow()
    latents = model.encode_images(torch.rand(2, 3, 64, 64) * 2 - 1)
    vectors = start_vectors(model)
    with model.training(gradient_checkpointing=True):
        loss_of(model, vectors, latents).backward()
    reference = {k: v.grad.clone() for k, v in vectors.items()}
    state, objects = weights(m), [id(p) for p in m.parameters()]
    with torch.inference_mode():
        m.forge_objects.unet.model._apply(lambda t: t.clone())
    moved = [n for n, t in [*m.named_parameters(), *m.named_buffers()] if t.is_inference()]
    assert moved
    model = host_model.borrow()
    vectors = start_vectors(model)
    with model.training(gradient_checkpointing=True):
        loss_of(model, vectors, latents).backward()
        assert not any(p.grad is not None for p in m.parameters())
    assert all(torch.allclose(v.grad, reference[k], rtol=1e-5, atol=1e-7) for k, v in vectors.items())
    assert [n for n, t in [*m.named_parameters(), *m.named_buffers()] if t.is_inference()] == moved
    assert [id(p) for p in m.parameters()] == objects
    assert all(torch.equal(v, state[k]) for k, v in weights(m).items())
    assert txt2img(m, "a photo of a cat") == plain
