"""reForge moves and casts the model inside torch.inference_mode (a GPU load at the first txt2img,
a CLIP move in every encode), so its weights may be inference tensors when a run starts, or again
after a preview: parameters whose data was swapped, and buffers replaced by tensors made under
inference_mode. The A1111 adapter (lib_ti/webui/host_model.py) gives the run ordinary tensors on
their storage and puts the originals back exactly (lib_ti/webui/inference_weights.py).
Checked in the stand-in host with the move done the way torch does it (Module._apply under
inference_mode); in a real reForge: tests/host/check_adapter.py --inference-weights."""

from __future__ import annotations

import pytest
import torch
from conftest import fake_host_modules
from test_webui_host_model import TOKEN, start_vectors, step


@pytest.fixture
def host(tmp_path):
    with fake_host_modules() as fakehost:
        yield lambda family="sd1", **kw: fakehost.install(str(tmp_path / "webui"), family, **kw)


def moved_under_inference_mode(m: torch.nn.Module) -> None:
    with torch.inference_mode():
        m._apply(lambda t: t.clone())  # what .to(device) does inside reForge's generation


def inference_tensors(m: torch.nn.Module) -> list[str]:
    return [n for n, t in [*m.named_parameters(), *m.named_buffers()] if t.is_inference()]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_run_after_a_move_under_inference_mode_trains_with_the_same_gradients(host, family):
    host(family)

    from modules import shared

    from lib_ti.webui import host_model

    m = shared.sd_model
    model = host_model.borrow()
    values = {k: v.clone() for k, v in m.state_dict().items()}
    vectors = start_vectors(model)
    with model.training(gradient_checkpointing=True):
        step(model, vectors, seed=1)
    reference = {k: v.grad.clone() for k, v in vectors.items()}

    moved_under_inference_mode(m)
    assert inference_tensors(m)  # both kinds: swapped parameter data and replaced buffers
    assert any(b.is_inference() for b in m.buffers())
    as_moved = inference_tensors(m)
    objects = {n: t for n, t in [*m.named_parameters(), *m.named_buffers()]}
    vectors = start_vectors(model)
    with model.training(gradient_checkpointing=True):
        step(model, vectors, seed=1)
        for k, v in vectors.items():
            assert torch.allclose(v.grad, reference[k], rtol=1e-5, atol=1e-7), k
        assert not any(p.grad is not None for p in m.parameters())
        moved_under_inference_mode(m)  # a preview moved it again mid-run: the next step still trains
        for v in vectors.values():
            v.grad = None
        step(model, vectors, seed=2)
        assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in vectors.values())
    # put back exactly as reForge had them: the same parameter and buffer objects, still inference
    # tensors (what its next generation expects), the same values
    assert inference_tensors(m) == as_moved
    assert all(t is objects[n] for n, t in [*m.named_parameters(), *m.named_buffers()])
    after = m.state_dict()
    assert after.keys() == values.keys() and all(torch.equal(after[k], v) for k, v in values.items())
    assert model.tokenize(TOKEN)  # and the model still reads as before
