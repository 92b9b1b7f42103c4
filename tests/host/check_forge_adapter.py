"""Boot a real Forge in-process on a tiny checkpoint and check lib_ti/webui/forge_model.py there.

    cd FORGE && <forge python> <repo>/tests/host/check_forge_adapter.py --ckpt FILE --data-dir DIR

Prints one JSON line `RESULT {...}` (and writes it to --result); every check is an assert (exit code 1 on the first failure).
Checks: the adapter's gradient on the vectors equals (a) an out-of-place reference of Forge's
BasicTransformerBlock (checkpointing on and off) and (b) a central finite difference; a few
optimizer steps with a Forge txt2img preview in between (the preview turns weights back into
inference tensors); afterwards every parameter object, flag and value, every engine database,
the attention function and the infotext state are as before, and a txt2img without the token is
bit-identical. Runs with Forge's default CPU attention (not --attention-pytorch), so the swap for
the run is exercised too. Memory: during the run the process holds no more than a fraction of the
model's weight bytes beyond what it held before (all tensor storages alive, via gc), and every
original weight has handed its storage over (nothing outside the model holds one).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKEN = "fgcheck"


def boot(ckpt: str, data_dir: str) -> None:
    emb = os.path.join(data_dir, "embeddings")
    os.makedirs(emb, exist_ok=True)
    sys.argv = [sys.argv[0], "--always-cpu", "--skip-torch-cuda-test", "--skip-version-check",
                "--no-download-sd-model", "--data-dir", data_dir, "--embeddings-dir", emb,
                "--ckpt-dir", os.path.dirname(ckpt), "--ckpt", ckpt]
    sys.path[:0] = [os.getcwd(), REPO]
    from modules_forge.initialization import initialize_forge

    initialize_forge()
    from modules import initialize

    initialize.imports()
    initialize.initialize()
    from modules_forge import main_entry

    main_entry.refresh_model_loading_parameters()


def state(m) -> dict:
    import torch
    from backend.nn import unet
    from backend.text_processing import classic_engine

    fo = m.forge_objects
    mods = [(f"{r}.{n}", x) for r, root in (("unet", fo.unet.model), ("clip", fo.clip.cond_stage_model),
                                            ("vae", fo.vae.first_stage_model)) for n, x in root.named_modules()]
    h = hashlib.sha256()
    objects, flags = [], []
    with torch.inference_mode():
        for n, x in mods:
            for k, t in [*x._parameters.items(), *x._buffers.items()]:
                if t is None:
                    continue
                objects.append((n, k, id(t)))
                flags.append((n, k, t.requires_grad, t.is_inference(), str(t.dtype), str(t.device)))
                h.update(t.detach().float().cpu().numpy().tobytes())
    engines = {a: getattr(m, a) for a in ("text_processing_engine", "text_processing_engine_l",
                                          "text_processing_engine_g") if hasattr(m, a)}
    return {
        "objects": objects, "flags": flags, "values": h.hexdigest(),
        "hooks": [(n, len(x._forward_pre_hooks), len(x._forward_hooks)) for n, x in mods],
        "instance_forward": [n for n, x in mods if "forward" in vars(x)],
        "attention": unet.attention_function.__name__,
        "dbs": {a: [(k, id(v)) for k, v in e.embeddings.word_embeddings.items()] for a, e in engines.items()},
        "clip_skip": [e.clip_skip for e in engines.values()],
        "infotext": dict(classic_engine.last_extra_generation_params),
    }


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and aliases counted once)."""
    sizes: dict = {}
    for t in tensors:
        s = t.untyped_storage()
        key = (str(s.device), s.data_ptr())
        sizes[key] = max(sizes.get(key, 0), s.nbytes())
    return sum(sizes.values())


def live_bytes() -> int:
    import gc

    import torch

    gc.collect()
    return storage_bytes(o for o in gc.get_objects()
                         if isinstance(o, torch.Tensor) and o.layout == torch.strided and o.device.type != "meta")


def txt2img(prompt: str) -> tuple[bytes, str]:
    from modules import processing, shared

    p = processing.StableDiffusionProcessingTxt2Img(sd_model=shared.sd_model, prompt=prompt, steps=3, seed=11,
                                                    width=64, height=64, sampler_name="Euler", cfg_scale=7.0,
                                                    do_not_save_grid=True, do_not_save_samples=True)
    try:
        out = processing.process_images(p)
    finally:
        p.close()
    return out.images[0].tobytes(), out.infotexts[0]


def refused(words: str, result_file: str | None) -> None:
    """borrow() refuses the loaded model with a message naming `words`, and nothing is changed."""
    from modules import shared

    from lib_ti.webui import host_model

    try:
        host_model.borrow()
    except host_model.HostError as e:
        message = str(e)
    else:
        raise AssertionError("training was not refused")
    result = {"refused": message, "kind": type(shared.sd_model).__name__,
              "is_inpaint": bool(getattr(shared.sd_model, "is_inpaint", False))}
    assert words in message, result
    print("RESULT " + json.dumps(result), flush=True)
    if result_file:
        with open(result_file, "w", encoding="utf-8") as f:
            json.dump(result, f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--result", help="also write the result JSON here (Forge may take over stdout)")
    ap.add_argument("--prediction", help="the prediction type the adapter must find (epsilon, v_prediction)")
    ap.add_argument("--refusal", help="only check that training is refused with a message containing this")
    a = ap.parse_args()
    boot(os.path.abspath(a.ckpt), os.path.abspath(a.data_dir))
    if a.refusal:
        return refused(a.refusal, a.result)

    import torch
    from backend.nn import unet
    from modules import sd_models, shared

    from lib_ti.webui import forge_model, host_model

    shared.opts.data["live_previews_enable"] = False  # SDXL live previews download a decoder (offline)
    result: dict = {"attention_before": unet.attention_function.__name__}
    plain = txt2img("a photo of a red cat")
    m = shared.sd_model
    assert not isinstance(m, sd_models.FakeInitialModel)
    before = state(m)
    assert any(f[3] for f in before["flags"]), "Forge's weights are expected to be inference tensors"
    model = host_model.borrow()
    want = {"sd1": {"emb": 768}, "sd2": {"emb": 1024}, "sdxl": {"clip_l": 768, "clip_g": 1280}}
    assert isinstance(model, forge_model.ForgeModel) and model.family in want, model
    assert model.slots() == want[model.family], model.slots()
    result["family"], result["prediction_type"] = model.family, model.prediction_type
    assert a.prediction in (None, model.prediction_type), result

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([400])
    a_t = model.alphas_cumprod()[t].view(-1, 1, 1, 1)
    x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
    texts = [f"a photo of {TOKEN}"]
    rows = model.token_embeddings("ball")
    slots = list(rows)
    # one flat tensor for all slots, so the finite difference moves every vector at once
    start = torch.cat([rows[k][:1].repeat(2, 1) for k in slots], dim=1)
    cuts = [rows[k].shape[1] for k in slots]

    def loss(v: torch.Tensor) -> torch.Tensor:
        vectors = dict(zip(slots, torch.split(v, cuts, dim=1)))
        pred = model.predict(x_t, t, model.encode_prompts(texts, TOKEN, vectors))
        return torch.nn.functional.mse_loss(pred, noise)

    def grad(checkpointing: bool) -> torch.Tensor:
        v = start.clone().requires_grad_(True)
        with model.training(gradient_checkpointing=checkpointing):
            loss(v).backward()
        return v.grad.detach().clone()

    g_plain, g_ckpt = grad(False), grad(True)

    def out_of_place(self, x, context=None, transformer_options=None):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context=context)
        return x + self.ff(self.norm3(x))

    original = unet.BasicTransformerBlock._forward
    unet.BasicTransformerBlock._forward = out_of_place
    try:
        g_ref = grad(False)
    finally:
        unet.BasicTransformerBlock._forward = original
    scale = float(g_ref.abs().max())
    result["grad_max"] = scale
    result["err_plain_vs_ref"] = float((g_plain - g_ref).abs().max())
    result["err_ckpt_vs_ref"] = float((g_ckpt - g_ref).abs().max())
    assert scale > 0
    assert result["err_plain_vs_ref"] <= 1e-4 * scale and result["err_ckpt_vs_ref"] <= 1e-4 * scale, result

    d = torch.randn(start.shape, generator=torch.Generator().manual_seed(1))
    d = d / d.norm()
    h = 1e-2 * float(start.norm())
    with torch.no_grad(), model.training():
        fd = (float(loss(start + h * d)) - float(loss(start - h * d))) / (2 * h)
    directional = float((g_plain * d).sum())
    result["fd"], result["autograd"] = fd, directional
    assert abs(fd - directional) <= 0.05 * abs(directional) + 1e-7, result

    v = start.clone().requires_grad_(True)
    opt = torch.optim.AdamW([v], lr=0.05)
    fo = m.forge_objects
    size = storage_bytes(t for r in (fo.unet.model, fo.clip.cond_stage_model) for t in [*r.parameters(), *r.buffers()])
    base, extra = live_bytes(), []
    with model.training(gradient_checkpointing=True):
        for i in range(3):
            loss(v).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i == 0:  # a preview with the live vectors, through Forge's own txt2img
                extra.append(live_bytes() - base)
                originals = model._trainable.originals.values()
                result["weights_handed_over"] = [sum(r.released for r in originals), len(originals)]
                _, info = txt2img(f"a photo of {TOKEN}")
                # SDXL: both engines name it and Forge quotes the list: TI: "fgcheck, fgcheck"
                assert re.search(rf'TI: "?{TOKEN}\b', info), info
                result["preview_infotext_ti"] = True
                extra.append(live_bytes() - base)
    result["memory"] = {"model_mib": size / 2**20, "extra_during_run_mib": [x / 2**20 for x in extra],
                        "extra_after_run_mib": (live_bytes() - base) / 2**20}
    handed, total = result["weights_handed_over"]
    assert total > 0 and handed == total, result
    assert max(extra) < 0.25 * size, result  # the old copies: +1.0
    assert not torch.equal(v.detach(), start)
    after = state(m)
    for key in before:
        assert after[key] == before[key], f"{key} changed by training"
    result["restored"] = sorted(before)
    result["plain_bit_identical"] = txt2img("a photo of a red cat") == plain
    assert result["plain_bit_identical"]
    print("RESULT " + json.dumps(result), flush=True)
    if a.result:
        with open(a.result, "w", encoding="utf-8") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
