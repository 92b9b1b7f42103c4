"""The Forge adapter holds the model's weights once during a run (lib_ti/webui/inference_weights.py
`Trainable`): the ordinary tensors the run uses share the storage of Forge's inference-tensor
weights instead of copying them, and at the end the original Parameter / buffer objects take the
storage back. Measured as the bytes of all distinct tensor storages alive in the process (gc),
on the stand-in Forge (tests/fakehost/forge), whose previews move weights under inference_mode
as Forge does. Also: the restore is exact after success, an exception and a KeyboardInterrupt
with a preview in between, a weight shared with a module outside the model keeps its data, and
casts made during the run end as the same casts end without the run."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from test_webui_forge import (  # noqa: F401
    TOKEN,
    fingerprint,
    forge,
    loss_of,
    snapshot,
    start_vectors,
    txt2img,
)

from lib_ti.webui import inference_weights


def roots(m) -> list[torch.nn.Module]:
    return [m.forge_objects.unet.model, m.forge_objects.clip.cond_stage_model]


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and aliases counted once)."""
    sizes: dict[tuple, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        key = (str(s.device), s.data_ptr())
        sizes[key] = max(sizes.get(key, 0), s.nbytes())
    return sum(sizes.values())


def live_bytes() -> int:
    """Every tensor storage alive in this process."""
    gc.collect()
    return storage_bytes(o for o in gc.get_objects()
                         if isinstance(o, torch.Tensor) and o.layout == torch.strided and o.device.type != "meta")


def model_bytes(m) -> int:
    return storage_bytes(t for r in roots(m) for x in r.modules()
                         for t in [*x._parameters.values(), *x._buffers.values()] if t is not None)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_run_holds_the_weights_once(forge, family):  # noqa: F811 (the fixture)
    """Before: the run kept Forge's weights and an ordinary copy of each (twice the model). Now
    the process holds at most a fraction more than before, also after a preview moved the
    weights (the stand-in's load under inference_mode gives each one new storage), and the same
    as before once the run is over."""
    forge(family)
    from modules import shared

    from lib_ti.webui import host_model

    m = shared.sd_model
    plain = txt2img("a red ball")  # Forge's first prompt turns the token embedding to float32
    size = model_bytes(m)
    before = snapshot(m)
    base = live_bytes()
    model = host_model.borrow()
    vectors = start_vectors(model)
    opt = torch.optim.AdamW(list(vectors.values()), lr=0.1)
    extra = []
    with model.training(gradient_checkpointing=True):
        for i in range(2):
            loss_of(model, vectors, seed=i).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            extra.append(live_bytes() - base)
            txt2img(f"a photo of {TOKEN}")  # a preview: Forge moves the weights under inference_mode
            extra.append(live_bytes() - base)
        assert model_bytes(m) == size
    assert max(extra) < 0.2 * size, (extra, size)
    assert abs(live_bytes() - base) < 0.05 * size
    assert snapshot(m) == before
    assert txt2img("a red ball") == plain


def test_no_weight_is_copied_on_the_way_in_or_out(forge):  # noqa: F811 (the fixture)
    """The run's tensors share the originals' storage; the originals hold nothing during the run
    and take over the storage of what is in their slot at the end (no copy, no peak); a weight
    registered twice (CLIPEmbeddingForTextualInversion.weight) is one tensor during the run too."""
    forge("sd1")
    from modules import shared

    m = shared.sd_model
    txt2img("a red ball")
    before = snapshot(m)
    params = {id(p): weakref.ref(p) for r in roots(m) for p in r.parameters()}  # a reference would keep them
    ptrs = {k: p().data_ptr() for k, p in params.items()}
    token = m.text_processing_engine.text_encoder.transformer.text_model.embeddings.token_embedding
    with inference_weights.trainable(roots(m)) as trainable:
        run = {id(p): p for r in roots(m) for p in r.parameters()}
        assert not set(run) & set(params) and len(run) == len(params)
        assert sorted(p.data_ptr() for p in run.values()) == sorted(ptrs.values())
        assert not any(p.is_inference() or p.requires_grad for p in run.values())
        assert all(p().numel() == 0 for p in params.values())  # handed over
        assert token.weight is token.wrapped.weight
        txt2img("a red ball")  # moves the weights: new storage, inference tensors again
        assert trainable.ensure() > 0
        at_end = {(id(x), k): t.data_ptr() for r in roots(m) for x in r.modules()
                  for k, t in x._parameters.items() if t is not None}
    assert {(id(x), k): t.data_ptr() for r in roots(m) for x in r.modules()
            for k, t in x._parameters.items() if t is not None} == at_end
    assert snapshot(m) == before


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_exact_restore_after_an_error_that_follows_a_preview(forge, error):  # noqa: F811 (the fixture)
    forge("sdxl")
    from modules import shared

    from lib_ti.webui import host_model

    m = shared.sd_model
    txt2img("a red ball")
    before = snapshot(m)
    model = host_model.borrow()
    vectors = start_vectors(model)
    with pytest.raises(error), model.training():
        loss_of(model, vectors).backward()
        txt2img(f"a photo of {TOKEN}")
        raise error("stop")
    assert snapshot(m) == before


def test_a_weight_shared_outside_the_model_keeps_its_data(forge):  # noqa: F811 (the fixture)
    """A module outside the training roots holding one of the same Parameter objects (Forge has
    none; an extension might) still computes with it during the run, and everything is restored."""
    forge("sd1")
    from modules import shared

    from lib_ti.webui import host_model

    m = shared.sd_model
    txt2img("a red ball")
    lin = m.forge_objects.unet.model.diffusion_model.time_embed[0]
    outside = torch.nn.Linear(lin.in_features, lin.out_features)
    outside.weight, outside.bias = lin.weight, lin.bias
    x = torch.randn(2, lin.in_features)
    with torch.inference_mode():
        want = outside(x)
    before = snapshot(m)
    model = host_model.borrow()
    vectors = start_vectors(model)
    with model.training():
        loss_of(model, vectors).backward()
        assert lin.weight is not outside.weight  # the run's alias in the model
        with torch.inference_mode():
            assert torch.equal(outside(x), want)
    assert outside.weight is lin.weight and snapshot(m) == before


def test_a_weight_object_forge_replaces_during_the_run(forge):  # noqa: F811 (the fixture)
    """Forge's set_parameter_devices / module_move put a *new* Parameter object in a slot
    (`tensor2parameter(p.to(device))`, under inference_mode in a generation): the run uses it from
    the next step on, the replaced one is freed, and the original object comes back with the
    values; still one model's worth of bytes."""
    forge("sd1")
    from modules import shared

    from lib_ti.webui import host_model

    m = shared.sd_model
    txt2img("a red ball")
    size, before = model_bytes(m), snapshot(m)
    base = live_bytes()
    conv = m.forge_objects.unet.model.diffusion_model.conv_in
    model = host_model.borrow()
    vectors = start_vectors(model)
    with model.training():
        loss_of(model, vectors).backward()
        with torch.inference_mode():  # a move to another device, as Forge makes it
            conv.weight = torch.nn.Parameter(conv.weight.clone(), requires_grad=False)
        assert conv.weight.is_inference()
        loss_of(model, vectors, seed=1).backward()
        assert not conv.weight.is_inference()
        assert live_bytes() - base < 0.2 * size
    assert snapshot(m) == before


def test_casts_during_the_run_end_as_without_the_run(forge):  # noqa: F811 (the fixture)
    """The engine's float32 cast of the fp16 token embedding (Forge does it per prompt) and a
    lossy fp16 round trip of the UNet under inference_mode (as an extension's move might do)
    leave each weight exactly as the same casts leave it on a model that never trained."""
    forge("sd1", load=False)
    from fakehost import forge_models
    from modules import sd_models, shared

    from lib_ti.webui import host_model

    model = host_model.borrow()  # builds the model; no prompt yet: the token embedding is fp16
    m = shared.sd_model
    params = sd_models.model_data.forge_loading_parameters
    with torch.inference_mode():
        twin = forge_models.build(params["family"], params.get("seed", 0), shared.cmd_opts.embeddings_dir)
    embedding = m.text_processing_engine.text_encoder.transformer.text_model.embeddings.token_embedding
    assert embedding.weight.dtype == torch.float16

    def casts(model):
        with torch.inference_mode():
            model.forge_objects.unet.model.diffusion_model.half().float()

    objects = snapshot(m)["objects"]
    vectors = start_vectors(model)
    with model.training():
        loss_of(model, vectors).backward()  # the engine turns the token embedding to float32
        casts(m)
        loss_of(model, vectors, seed=1).backward()
    casts(twin)
    with torch.inference_mode():
        twin.text_processing_engine(["a photo"])  # the same float32 cast, without the run
    after = snapshot(m)
    assert after["objects"] == objects
    assert embedding.weight.dtype == torch.float32 and embedding.weight.is_inference()
    expect = {n: fingerprint(t) for r in roots(twin) for n, t in [*r.named_parameters(), *r.named_buffers()]}
    got = {n: fingerprint(t) for r in roots(m) for n, t in [*r.named_parameters(), *r.named_buffers()]}
    assert got == expect
