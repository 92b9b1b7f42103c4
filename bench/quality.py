"""Does TI recover a concept the model knows by name? A micro text-to-image test on the CPU.

1. A micro model (diffusers UNet + CLIP text encoder with the real 49,408-word vocabulary, in a
   4x-pooled pixel space) is trained from scratch to draw six coloured-shape concepts, each named
   by a real one-token word ("apple" = red disc on white, ...). Cached under bench/.cache/.
2. TI (lib_ti.train.run_training, object templates) learns a new token from 6 images of one
   concept, starting from another concept's word. It has recovered the concept when the token's
   conditioning (the text encoder's output over the 27 object templates) ends closer (L2) to the
   true word's than to the init word's.
3. The same runs with auto_stop (DVAR on the fixed-batch validation loss): steps saved and the
   validation loss where they stopped.
Last line: concept_recovery=<fraction of runs>.

    python bench/quality.py            # ~9 min on 1 CPU thread (2.5 of them training the micro model,
                                       # cached in bench/.cache/ for the next run)
    python bench/quality.py --quick    # smoke run: tiny budget, meaningless numbers
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from bench import common
except ImportError:  # run as `python bench/quality.py`
    import common  # type: ignore[no-redef]

from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from lib_ti.config import TrainConfig
from lib_ti.data.captions import IMAGENET_TEMPLATES_SMALL as TEMPLATES
from lib_ti.diffusers_backend import inject
from lib_ti.diffusers_backend.diffusers_sd import DiffusersSD
from lib_ti.loss import add_noise
from lib_ti.train import run_training
from tests.support import random_models

CACHE = Path(__file__).resolve().parent / ".cache"
POOL, SIZE = 4, 64  # 64 px images, 16 x 16 x 3 "latents"
# word -> (shape, foreground, background)
CONCEPTS = {
    "apple": ("disc", (220, 30, 30), (235, 235, 235)),
    "lemon": ("disc", (240, 215, 40), (40, 40, 40)),
    "ocean": ("square", (30, 60, 220), (235, 235, 235)),
    "grass": ("triangle", (40, 170, 40), (245, 235, 200)),
    "cherry": ("square", (150, 20, 90), (190, 225, 250)),
    "cloud": ("disc", (250, 250, 250), (80, 140, 225)),
}
WORDS = list(CONCEPTS)
TE_CFG = dict(vocab_size=49408, max_position_embeddings=77, hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu", projection_dim=64,
              bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
UNET_CFG = dict(sample_size=SIZE // POOL, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
                norm_num_groups=16, cross_attention_dim=64)


class MicroModel(DiffusersSD):
    """An SD1-shaped TrainableModel whose "VAE" is a fixed 4x average pool of the pixels, so a
    micro UNet can learn real images in seconds. Everything else (prompts, splicing, predict,
    training flags) is the product's own DiffusersSD code."""

    cache_key = f"micro-pool{POOL}"

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(pixels.to(self.device, torch.float32), POOL)


def draw(word: str, rng: random.Random):
    from PIL import Image, ImageDraw

    shape, fg, bg = CONCEPTS[word]
    img = Image.new("RGB", (SIZE, SIZE), bg)
    s = rng.randint(SIZE // 3, SIZE // 2)
    x, y = rng.randint(0, SIZE - s), rng.randint(0, SIZE - s)
    d = ImageDraw.Draw(img)
    if shape == "disc":
        d.ellipse([x, y, x + s, y + s], fill=fg)
    elif shape == "square":
        d.rectangle([x, y, x + s, y + s], fill=fg)
    else:
        d.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=fg)
    return img


def pixels(img) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


def build_micro(seed: int = 0) -> MicroModel:
    parts = random_models.components("tiny", "sd1", seed=seed)
    torch.manual_seed(seed)
    te, unet = CLIPTextModel(CLIPTextConfig(**TE_CFG)), UNet2DConditionModel(**UNET_CFG)
    return MicroModel("sd1", unet, parts["vae"], te, parts["tokenizer"], parts["scheduler"])


def encode(model: MicroModel, texts: list[str]) -> torch.Tensor:
    batch = model.prompts.batch(texts, "", 1, int(model.tokenizer.pad_token_id), model.device)
    return inject.encode(model.text_encoder, batch, None)[0]


def pretrain(model: MicroModel, steps: int, batch: int, seed: int, log) -> dict:
    """Train UNet and text encoder jointly on the six concepts (eps objective, uniform timesteps)."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    bank = {w: model.encode_images(torch.stack([pixels(draw(w, rng)) for _ in range(64)])) for w in WORDS}
    alphas = model.alphas_cumprod()
    params = [*model.unet.parameters(), *model.text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * (1 - s / (steps + 1)))
    model.unet.train()
    model.text_encoder.train()
    t0 = time.monotonic()
    for step in range(steps):
        words = [rng.choice(WORDS) for _ in range(batch)]
        x0 = torch.stack([bank[w][rng.randrange(64)] for w in words])
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        cond = encode(model, [rng.choice(TEMPLATES).format(w) for w in words])
        pred = model.unet(add_noise(x0, noise, t, alphas), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log(f"  pretrain step {step:5d}  loss {float(loss.detach()):.4f}  {time.monotonic() - t0:6.1f} s")
    model.unet.eval()
    model.text_encoder.eval()
    return {"gap": word_gap(model, bank, gen, alphas), "seconds": time.monotonic() - t0}


@torch.no_grad()
def word_gap(model: MicroModel, bank: dict, gen: torch.Generator, alphas: torch.Tensor) -> float:
    """Denoising loss with a wrong concept word / with the right one (1 = words are ignored)."""
    right = wrong = 0.0
    for k, w in enumerate(WORDS):
        x0 = bank[w][:32]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(100, 900, (x0.shape[0],), generator=gen)
        noisy = add_noise(x0, noise, t, alphas)
        for word, acc in ((w, "right"), (WORDS[(k + 1) % len(WORDS)], "wrong")):
            pred = model.unet(noisy, t, encoder_hidden_states=encode(model, [f"a photo of a {word}"] * 32)).sample
            loss = float(F.mse_loss(pred, noise))
            right, wrong = (right + loss, wrong) if acc == "right" else (right, wrong + loss)
    return wrong / right


def micro_model(args: argparse.Namespace, log) -> tuple[MicroModel, dict]:
    spec = json.dumps([CONCEPTS, TE_CFG, UNET_CFG, POOL, args.pretrain_steps, args.pretrain_batch, 1], default=str)
    path = CACHE / f"micro_t2i_{hashlib.sha1(spec.encode()).hexdigest()[:12]}.pt"
    model = build_micro()
    if path.is_file() and not args.no_cache:
        saved = torch.load(path, map_location="cpu")
        model.unet.load_state_dict(saved["unet"])
        model.text_encoder.load_state_dict(saved["text_encoder"])
        log(f"micro model from {path}")
        return model, saved["report"]
    log(f"training the micro model ({args.pretrain_steps} steps, batch {args.pretrain_batch})")
    report = pretrain(model, args.pretrain_steps, args.pretrain_batch, 0, log)
    if not args.no_cache:
        CACHE.mkdir(exist_ok=True)
        (CACHE / ".gitignore").write_text("*\n")  # the folder ignores itself: nothing here is committed
        tmp = path.with_suffix(".tmp")
        torch.save({"unet": model.unet.state_dict(), "text_encoder": model.text_encoder.state_dict(),
                    "report": report}, tmp)
        tmp.replace(path)
    return model, report


@torch.no_grad()
def distances(model: MicroModel, vectors: dict, target: str, init: str) -> tuple[float, float, float, float]:
    """(L2 to the true word's conditioning, L2 to the init word's, cosine of the vector to the true
    word's token embedding, cosine to the init word's), conditioning over all object templates."""
    learned = model.encode_prompts([t.format(common.TOKEN) for t in TEMPLATES], common.TOKEN, vectors)
    d = [float((learned - encode(model, [t.format(w) for t in TEMPLATES])).flatten(1).norm(dim=1).mean())
         for w in (target, init)]
    rows = model.token_embeddings(f"{target} {init}")["emb"]
    v = vectors["emb"].float().mean(0)
    return d[0], d[1], float(F.cosine_similarity(v, rows[0], 0)), float(F.cosine_similarity(v, rows[1], 0))


def ti_run(model: MicroModel, target: str, init: str, seed: int, args, work: Path, auto_stop: bool) -> dict:
    data = work / f"{target}-{seed}"
    if not data.exists():
        rng = random.Random(1000 + seed)
        data.mkdir(parents=True)
        for i in range(args.images):
            draw(target, rng).save(data / f"{i}.png")
    cfg = TrainConfig.from_dict(dict(
        token_string=common.TOKEN, init_word=init, train_data_dir=str(data), output_dir=str(work / "out"),
        resolution=str(SIZE), use_object_template=True, train_batch_size=4, max_train_steps=args.ti_steps,
        learning_rate=str(args.lr), validation_every_n_steps=args.val_every, validation_batch_size=8,
        seed=seed, auto_stop=auto_stop, auto_stop_window=args.window, overwrite=True))
    t0 = time.monotonic()
    res = run_training(cfg, model)
    d_true, d_init, c_true, c_init = distances(model, res.embedding.vectors, target, init)
    return dict(target=target, init=init, seed=seed, status=res.status, steps=res.step, vals=res.val_losses,
                d_true=d_true, d_init=d_init, cos_true=c_true, cos_init=c_init, recovered=d_true < d_init,
                seconds=time.monotonic() - t0)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--pairs", type=int, default=6, help="(target, init) concept pairs per seed, up to 6")
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--ti-steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--val-every", type=int, default=5)
    p.add_argument("--window", type=int, default=10, help="auto_stop_window (validation points)")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--pretrain-batch", type=int, default=16)
    p.add_argument("--no-cache", action="store_true", help="train the micro model afresh, do not save it")
    p.add_argument("--no-auto-stop", action="store_true", help="skip the auto_stop comparison")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: immune to slowdowns when other jobs share the cores; 0: torch's default)")
    p.add_argument("--quick", action="store_true", help="smoke run: minimal budget, meaningless figures")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.pairs, args.ti_steps, args.pretrain_steps, args.val_every = 1, 1, 8, 20, 2
        args.window, args.images, args.no_cache = 3, 4, True
    return args


def main(argv: list[str] | None = None) -> float:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, report = micro_model(args, print)
    print(f"micro model: word gap {report['gap']:.2f} (denoising loss with a wrong concept word / the right one), "
          f"trained in {report['seconds']:.0f} s")
    pairs = [(WORDS[i], WORDS[(i + 1 + i // 2) % len(WORDS)]) for i in range(min(args.pairs, len(WORDS)))]
    runs, stops = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for target, init in pairs:
                r = ti_run(model, target, init, seed, args, Path(tmp), auto_stop=False)
                runs.append(r)
                line = (f"seed {seed} {init:>6} -> {target:<6} d_true {r['d_true']:.3f} d_init {r['d_init']:.3f} "
                        f"cos_true {r['cos_true']:+.2f} cos_init {r['cos_init']:+.2f} "
                        f"val {r['vals'][0][1]:.4f} -> {r['vals'][-1][1]:.4f}")
                if not args.no_auto_stop:
                    s = ti_run(model, target, init, seed, args, Path(tmp), auto_stop=True)
                    stops.append((r, s))
                    line += f" | auto_stop at {s['steps']} val {s['vals'][-1][1]:.4f} recovered {s['recovered']}"
                print(line + f" ({r['seconds']:.1f} s)")
    print(f"machine: {common.machine()}")
    print(f"TI: {args.images} images, batch 4, lr {args.lr}, {args.ti_steps} steps, 1 vector, object templates")
    curve = {}
    for r in runs:
        for step, v in r["vals"]:
            curve.setdefault(step, []).append(v / r["vals"][0][1])
    marks = sorted(curve)[:: max(1, len(curve) // 10)]
    print("validation loss / its start value, mean over runs: "
          + "  ".join(f"{s}:{statistics.mean(curve[s]):.3f}" for s in marks))
    if stops:
        saved = [r["steps"] - s["steps"] for r, s in stops]
        rel = [s["vals"][-1][1] / r["vals"][-1][1] - 1 for r, s in stops]
        print(f"auto_stop (window {args.window} points every {args.val_every} steps, threshold 0.15): stopped "
              f"{sum(s['status'] == 'auto_stopped' for _, s in stops)}/{len(stops)} runs at median step "
              f"{statistics.median(s['steps'] for _, s in stops):.0f} of {args.ti_steps}; "
              f"saved {statistics.mean(saved):.0f} steps ({statistics.mean(saved) / args.ti_steps:.0%}) at "
              f"validation loss {statistics.mean(rel):+.1%} vs the full run's final (median "
              f"{statistics.median(rel):+.1%}); recovery with auto_stop "
              f"{sum(s['recovered'] for _, s in stops)}/{len(stops)}")
    frac = sum(r["recovered"] for r in runs) / len(runs)
    print(f"recovered {sum(r['recovered'] for r in runs)}/{len(runs)}; vector closer to the true word's "
          f"embedding than the init's: {sum(r['cos_true'] > r['cos_init'] for r in runs)}/{len(runs)}")
    print(f"concept_recovery={frac:.3f}")
    return frac


if __name__ == "__main__":
    main()
