"""lib_ti/webui/host_model.py inside a REAL WebUI host: run with the host's python.

    <host python> tests/host/check_adapter.py --host-dir HOST --tiny-dir TINY --family sd1|sd2|sdxl
        [--checkpointing] [--host-arg=--medvram ...] [--data-dir DIR]

TINY is what make_tiny_checkpoint.py wrote (its hf-home/ and models/). The host is booted in this
process the way webui.py boots it (initialize.imports, initialize.initialize), offline, on the CPU,
with DIR as --data-dir so the install's own settings and embeddings are not touched. Checks:

- the host took the checkpoint for its family (SD2: is_sd2, v-parameterization, the OpenCLIP wrapper);
- the adapter's reads agree with the host (tokenizer, init rows = encode_embedding_init_text,
  alphas_cumprod_original, VAE encode; SDXL: an fp16 VAE encodes in fp32 and stays fp16);
- a few manual steps (noise, timesteps, MSE to the eps / v target, AdamW on the vectors): only the vectors get
  gradients, the db holds the live vectors, previews rendered meanwhile follow them;
- afterwards every requires_grad flag, hook, module mode, instance attribute, embedding-db entry
  and SDXL embedder flag is as before, also after an exception inside training();
- txt2img with the same seed is bit-identical before and after (prompt without the token), and the
  token gives the previously registered embedding's image again;
- reload_embeddings / host_load_check on a file written by lib_ti.formats.

Prints one line per check and exits non-zero if any failed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKEN = "tiok-ti42"


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host-dir", default=os.environ.get("TI_TRAINER_HOST_DIR", ""))
    ap.add_argument("--tiny-dir", required=True)
    ap.add_argument("--family", choices=["sd1", "sd2", "sdxl"], default="sd1")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--host-arg", action="append", default=[], help="extra host flag, e.g. --host-arg=--medvram")
    ap.add_argument("--data-dir", default="")
    ap.add_argument("--inference-weights", action="store_true",
                    help="after the first txt2img, turn the weights into inference tensors as a GPU load inside "
                         "reForge's generation does (.to under torch.inference_mode)")
    return ap.parse_args()


def boot(a: argparse.Namespace):
    """Start the host in this process on the tiny checkpoint; returns its loaded sd_model."""
    tiny = os.path.abspath(a.tiny_dir)
    os.environ["HF_HOME"] = os.path.join(tiny, "hf-home")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    host = os.path.abspath(a.host_dir)
    os.chdir(host)
    sys.path.insert(0, host)
    sys.path.append(REPO)
    ckpts = os.path.join(tiny, "models", "Stable-diffusion")
    data = [f"--data-dir={os.path.abspath(a.data_dir)}"] if a.data_dir else []
    sys.argv = ["webui.py", "--skip-prepare-environment", "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half",
                "--precision", "full", "--no-download-sd-model", "--skip-load-model-at-start", *data,
                "--ckpt-dir", ckpts, "--ckpt", os.path.join(ckpts, f"tiny-{a.family}.safetensors"), *a.host_arg]
    if os.path.isdir(os.path.join(host, "modules_forge")):  # reForge: its webui.py starts ldm_patched first
        from modules_forge.initialization import initialize_forge

        initialize_forge()
    from modules import initialize

    initialize.imports()
    initialize.check_versions()
    initialize.initialize()
    from modules import shared

    shared.opts.data["live_previews_enable"] = False  # SDXL's preview decoder would be downloaded
    return shared.sd_model


class Checks:
    def __init__(self):
        self.results: list[tuple[str, bool]] = []

    def __call__(self, name: str, ok: object, detail: object = "") -> None:
        self.results.append((name, bool(ok)))
        print(f"[{'ok' if ok else 'FAIL'}] {name} {detail}", flush=True)


def main() -> int:
    a = parse()
    m = boot(a)

    import numpy as np
    import torch
    from modules import processing, sd_hijack
    from modules.textual_inversion.textual_inversion import Embedding as HostEmbedding

    from lib_ti import formats
    from lib_ti.embedding import Embedding
    from lib_ti.model import SizeCond
    from lib_ti.webui import host, host_model

    check = Checks()
    db = sd_hijack.model_hijack.embedding_db
    fam = a.family
    print(f"== {type(m).__name__} family={host_model.family_of(m)} lowvram={getattr(m, 'lowvram', False)} "
          f"checkpointing={a.checkpointing} host args={a.host_arg}", flush=True)

    def flat(c) -> torch.Tensor:
        """The host's prompt conditioning (MulticondLearnedConditioning > schedules > cond) as one vector."""
        if isinstance(c, torch.Tensor):
            return c.detach().float().flatten().cpu()
        if isinstance(c, dict):
            return torch.cat([flat(c[k]) for k in sorted(c)])
        for attr in ("batch", "schedules", "cond"):  # before tuple: ScheduledPromptConditioning is a namedtuple
            if hasattr(c, attr):
                return flat(getattr(c, attr))
        return torch.cat([flat(x) for x in c])

    def txt2img(prompt: str, seed: int = 1234, conds: list | None = None) -> str:
        """The image's hash; `conds` collects the conditioning it sampled with: comparing that has
        margin, where a tiny random model's uint8 images may round different inputs to the same bytes."""
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=m, prompt=prompt, negative_prompt="", steps=4, sampler_name="Euler", cfg_scale=7.0, seed=seed,
            width=64, height=64, do_not_save_grid=True, do_not_save_samples=True, do_not_reload_embeddings=True)
        host.empty_script_runner(p)  # reForge
        try:
            res = processing.process_images(p)
            if conds is not None:
                conds.append(flat(p.c))  # before close(), which drops it
        finally:
            p.close()
        return hashlib.sha256(np.asarray(res.images[0]).tobytes()).hexdigest()

    def snapshot() -> dict:
        mods = list(m.named_modules())
        return {
            "requires_grad": [(n, p.requires_grad) for n, p in m.named_parameters()],
            "grads": [n for n, p in m.named_parameters() if p.grad is not None],
            "hooks": [(n, list(x._forward_pre_hooks.values()), list(x._forward_hooks.values()),
                       list(x._backward_hooks.values())) for n, x in mods],
            "instance_forward": [n for n, x in mods if "forward" in vars(x)],
            "modes": [(n, x.training) for n, x in mods],
            "db_words": [(k, id(v)) for k, v in db.word_embeddings.items()],
            "db_lookup": {k: [(tuple(ids), id(e)) for ids, e in v] for k, v in db.ids_lookup.items()},
            "embedders": [(type(e).__name__, getattr(e, "is_trainable", None), getattr(e, "ucg_rate", None))
                          for e in getattr(getattr(m, "conditioner", None), "embedders", [])],
            "dtypes": sorted({str(p.dtype) for p in m.parameters()}),
        }

    def weights() -> str:
        """A hash of every parameter and buffer: the run must leave the model's values as they were."""
        h = hashlib.sha1()
        with torch.no_grad():
            for n, t in [*m.named_parameters(), *m.named_buffers()]:
                h.update(n.encode())
                h.update(t.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
        return h.hexdigest()

    model = host_model.borrow()
    slots = model.slots()
    # An embedding already registered under the token (as if loaded from a file), and another one.
    prev_vec = {k: torch.randn(2, w) for k, w in slots.items()}
    width = sum(slots.values())
    prev = HostEmbedding(prev_vec if fam == "sdxl" else prev_vec["emb"], TOKEN)
    prev.vectors, prev.shape = 2, width
    db.register_embedding_by_name(prev, m, TOKEN)
    other = HostEmbedding({k: v.clone() for k, v in prev_vec.items()} if fam == "sdxl" else prev_vec["emb"].clone(),
                          "zzother")
    other.vectors, other.shape = 2, width
    db.register_embedding_by_name(other, m, "zzother")

    base_conds: list = []
    base_img, base_tok_img = txt2img("a photo of a cat"), txt2img(f"a photo of {TOKEN}", conds=base_conds)
    if a.inference_weights:  # Module._apply under inference_mode, as reForge's model management moves it
        with torch.inference_mode():
            m._apply(lambda t: t.clone())
        check("the weights are inference tensors now", all(p.is_inference() for p in m.parameters()))
    before, weights_before = snapshot(), weights()

    # -- reads
    check("family", model.family == fam, model.family)
    want = "v_prediction" if fam == "sd2" else "epsilon"
    check("prediction type", model.prediction_type == want, model.prediction_type)
    flags = {k: getattr(m, k, None) for k in ("is_sd1", "is_sd2", "is_sdxl")}
    check("the host's model type", flags == {f"is_{f}": f == fam for f in ("sd1", "sd2", "sdxl")}, flags)
    if fam == "sd2":
        wrapper = type(m.cond_stage_model).__name__
        check("SD2: v-parameterization, OpenCLIP wrapper, penultimate layer",
              m.parameterization == "v" and wrapper == "FrozenOpenCLIPEmbedderWithCustomWords"
              and m.cond_stage_model.wrapped.layer_idx == 1, f"{m.parameterization} {wrapper}")
    ids = model.tokenize(TOKEN)
    check("tokenize = the db's tokenize", ids == list(m.cond_stage_model.tokenize([TOKEN])[0]),
          f"{ids} {model.decode_tokens(ids)}")
    rows = model.token_embeddings("cat")
    host_rows = m.cond_stage_model.encode_embedding_init_text("cat", 1).float().cpu()
    check("token_embeddings = encode_embedding_init_text", torch.equal(torch.cat(list(rows.values()), 1), host_rows),
          {k: tuple(v.shape) for k, v in rows.items()})
    alphas = model.alphas_cumprod()
    check("alphas_cumprod", alphas.shape == (1000,) and bool((alphas.diff() < 0).all()))
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    lat = model.encode_images(pixels)
    check("encode_images", lat.shape == (2, 4, 8, 8) and bool(torch.isfinite(lat).all()), tuple(lat.shape))
    if fam == "sdxl":  # the host's default fp16 VAE: encoded in fp32, left fp16
        keep = {k: v.clone() for k, v in m.first_stage_model.state_dict().items()}
        torch.manual_seed(7)
        lat32 = model.encode_images(pixels)
        m.first_stage_model.half()
        torch.manual_seed(7)
        lat16 = model.encode_images(pixels)
        check("SDXL fp16 VAE encodes in fp32 and stays fp16", torch.allclose(lat16, lat32, atol=1e-2) and
              next(m.first_stage_model.parameters()).dtype == torch.float16,
              f"max diff {float((lat16 - lat32).abs().max()):.1e}")
        m.first_stage_model.float()
        m.first_stage_model.load_state_dict(keep)
    check("reads leave the host as it was", snapshot() == before)

    # -- a few manual training steps
    vectors = {k: v[:1].repeat(2, 1).clone().to(model.device).requires_grad_(True) for k, v in rows.items()}
    start = {k: v.detach().clone() for k, v in vectors.items()}
    opt = torch.optim.AdamW(list(vectors.values()), lr=5e-2, weight_decay=0.0)
    texts = [f"a photo of {TOKEN}", f"{TOKEN} on a table, (detailed:1.2)"]
    sizes = [SizeCond((64, 64), (0, 0), (64, 64))] * 2
    gen = torch.Generator().manual_seed(0)
    losses, previews = [], []
    if a.checkpointing:  # checkpointed blocks must give the very gradient the plain ones give
        noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(5))
        t5 = torch.tensor([300, 700])
        x5 = (alphas[t5].view(-1, 1, 1, 1).sqrt() * lat + (1 - alphas[t5].view(-1, 1, 1, 1)).sqrt() * noise)

        def vector_grads(ckpt: bool) -> dict:
            v = {k: x[:1].repeat(2, 1).clone().to(model.device).requires_grad_(True) for k, x in rows.items()}
            with model.training(gradient_checkpointing=ckpt):
                cond = model.encode_prompts(texts, TOKEN, v, sizes)
                pred = model.predict(x5.to(model.device, model.dtype), t5.to(model.device), cond)
                torch.nn.functional.mse_loss(pred.float(), noise.to(pred.device)).backward()
            return {k: x.grad.detach().float().cpu() for k, x in v.items()}

        plain, ckpt = vector_grads(False), vector_grads(True)
        err = max(float((plain[k] - ckpt[k]).abs().max()) for k in plain)
        scale = max(float(g.abs().max()) for g in plain.values())
        check("checkpointed gradient = plain gradient", scale > 0 and err <= 1e-4 * scale, f"max err {err:.2e} of {scale:.2e}")
    with model.training(gradient_checkpointing=a.checkpointing):
        inside = snapshot()
        check("inside: no model weight requires grad", not any(f for _, f in inside["requires_grad"]))
        check("inside: db untouched before the first encode", db.word_embeddings.get(TOKEN) is prev)
        if getattr(m, "lowvram", False):
            roots = [m.model, m.conditioner if fam == "sdxl" else m.cond_stage_model]
            n_in = sum(getattr(h, "__name__", "") == "send_me_to_gpu" for r in roots for x in r.modules()
                       for h in x._forward_pre_hooks.values())
            n_before = sum(getattr(h, "__name__", "") == "send_me_to_gpu" for _, pre, _, _ in before["hooks"]
                           for h in pre)
            check("inside: medvram hooks off the UNet and text side", n_in == 0 < n_before, f"{n_before} -> {n_in}")
        if a.checkpointing:
            check("inside: blocks checkpointed", len(inside["instance_forward"]) > 0, len(inside["instance_forward"]))
        if fam == "sdxl":
            check("inside: text embedders trainable, no prompt dropout",
                  [f[1:] for f in inside["embedders"][:2]] == [(True, 0.0), (True, 0.0)], inside["embedders"])
        for i in range(6):
            noise = torch.randn(lat.shape, generator=gen)
            t = torch.randint(0, 1000, (2,), generator=gen)
            ab = alphas[t].view(-1, 1, 1, 1)
            x_t = ab.sqrt() * lat + (1 - ab).sqrt() * noise
            cond = model.encode_prompts(texts, TOKEN, vectors, sizes)
            pred = model.predict(x_t.to(model.device, model.dtype), t.to(model.device), cond)
            target = ab.sqrt() * noise - (1 - ab).sqrt() * lat if want == "v_prediction" else noise
            loss = torch.nn.functional.mse_loss(pred.float(), target.to(pred.device))
            loss.backward()
            if i == 0:
                live = db.word_embeddings.get(TOKEN)
                live_vec = live.vec["clip_l"] if fam == "sdxl" else live.vec
                check("inside: the db holds the live vectors", live is not prev and
                      live_vec is vectors["clip_l" if fam == "sdxl" else "emb"])
                got = {k: v.grad is not None and float(v.grad.abs().sum()) > 0 for k, v in vectors.items()}
                model_grads = [n for n, p in m.named_parameters() if p.grad is not None]
                check("only the vectors got gradients", all(got.values()) and not model_grads,
                      f"vectors={got} weights with grad={len(model_grads)}")
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(round(float(loss), 4))
            if i in (1, 4):  # a preview as the job renders one: host txt2img with the token, no reload
                txt2img(f"a photo of {TOKEN}", conds=previews)
        print("losses", losses, flush=True)
        check("vectors moved", all(not torch.equal(start[k], v.detach()) for k, v in vectors.items()))
        gaps = [float((x - y).abs().max()) for x, y in ((previews[0], base_conds[0]), (previews[1], previews[0]))]
        check("previews follow the live vectors (their conditioning moved)", min(gaps) > 1e-3, gaps)

    d = [k for k, v in snapshot().items() if v != before[k]]
    check("after the run: everything as before", not d, d)
    check("after the run: previous db entries back", db.word_embeddings.get(TOKEN) is prev and
          db.word_embeddings.get("zzother") is other)
    check("after the run: the model's weights unchanged", weights() == weights_before)
    check("txt2img without the token bit-identical", txt2img("a photo of a cat") == base_img)
    check("txt2img with the token gives the previous embedding again", txt2img(f"a photo of {TOKEN}") == base_tok_img)

    try:
        with model.training(gradient_checkpointing=True):
            cond = model.encode_prompts(texts, TOKEN, vectors, sizes)
            model.predict(x_t.to(model.device, model.dtype), t.to(model.device), cond).float().mean().backward()
            raise RuntimeError("boom")
    except RuntimeError as e:
        check("an exception inside training() propagates", str(e) == "boom")
    d = [k for k, v in snapshot().items() if v != before[k]]
    check("after the exception: everything as before", not d, d)
    check("after the exception: the model's weights unchanged", weights() == weights_before)
    check("txt2img still bit-identical", txt2img("a photo of a cat") == base_img)

    # -- after saving
    os.makedirs(host_model.embeddings_dir(), exist_ok=True)
    path = os.path.join(host_model.embeddings_dir(), f"{TOKEN}.safetensors")
    formats.save_embedding(Embedding({k: v.detach().cpu() for k, v in vectors.items()}, step=6, name=TOKEN), path,
                           "safetensors", overwrite=True)
    processing.StableDiffusionProcessing.cached_c = ["stale", "stale"]
    host_model.reload_embeddings()
    check("reload clears the cond caches", processing.StableDiffusionProcessing.cached_c == [None, None])
    ok, msg = host_model.host_load_check(TOKEN, 2, path=path)
    check("host_load_check: loaded", ok, msg)
    ok, msg = host_model.host_load_check(TOKEN, 3)
    check("host_load_check: wrong vector count", not ok, msg)
    ok, msg = host_model.host_load_check("nope-ti99", 2)
    check("host_load_check: missing", not ok, msg)
    os.remove(path)
    host_model.reload_embeddings()

    passed = sum(ok for _, ok in check.results)
    print(f"== {passed}/{len(check.results)} checks passed ({fam}, checkpointing={a.checkpointing}, {a.host_arg})")
    return 0 if passed == len(check.results) else 1


if __name__ == "__main__":
    sys.exit(main())
