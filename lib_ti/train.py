"""The training loop. It reads nothing global: the model comes through the family protocol and
everything the host does (progress, interrupt, saving, previews) through `Callbacks`."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lib_ti import data, resume
from lib_ti.config import TrainConfig
from lib_ti.embedding import Embedding
from lib_ti.loss import add_noise, flattened, per_sample_mse, snr_weight, target_for
from lib_ti.model import TrainableModel
from lib_ti.optim import make_optimizer
from lib_ti.prepare import Prepared, ValidationBatch, prepare
from lib_ti.schedule import lr_at, parse_piecewise


@dataclass
class Progress:
    phase: str  # "preparing" | "training" | "done"
    step: int = 0
    max_steps: int = 0
    epoch: int = 0
    loss: float | None = None
    loss_avg: float | None = None
    lr: float | None = None
    val_loss: float | None = None
    norms: dict[str, list[float]] = field(default_factory=dict)
    eta_s: float | None = None
    message: str = ""
    validated: bool = False  # val_loss was computed at this step (else it repeats the last one)


MAX_NORM = 65504.0  # float16 max: a longer vector overflows the host's half-precision text encoder


def _noop(*_a: object, **_k: object) -> None:
    return None


@dataclass
class Callbacks:
    progress: Callable[[Progress], None] = _noop
    should_stop: Callable[[], bool] = lambda: False
    # (embedding snapshot, final) -> path written or None. Called every save_every_n_steps and at the end.
    on_checkpoint: Callable[[Embedding, bool], str | None] = lambda emb, final: None
    # (step, embedding snapshot) every sample_every_n_steps; renders previews however the host can.
    on_sample: Callable[[int, Embedding], None] = _noop
    log: Callable[[str], None] = _noop
    # multi-GPU: average a gradient in place across processes; a no-op for one process
    all_reduce: Callable[[torch.Tensor], None] = _noop
    rank: int = 0
    world_size: int = 1
    # filled by the loop for the run layer: the last finite vectors, and the state to resume from
    live: Live = field(default_factory=lambda: Live())
    # a resume state (lib_ti/resume.py) that matched this run: continue exactly from there
    resume: dict | None = None


@dataclass
class Live:
    """What the run layer reads from outside the loop. `good` holds the vectors that produced the
    last finite loss (updated in place after each step); `state()` is what an exact resume needs
    at the current step boundary, or None when the optimizer went past the good vectors."""

    good: dict[str, torch.Tensor] = field(default_factory=dict)
    step: int = 0
    start_step: int = 0
    state: Callable[[], dict | None] = lambda: None


@dataclass
class TrainResult:
    status: str  # "done" | "interrupted" | "auto_stopped" | "nan"
    step: int
    embedding: Embedding
    output: str | None
    losses: list[tuple[int, float]]
    val_losses: list[tuple[int, float]]
    warnings: list[str]
    message: str


def autocast_for(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.float16 if cfg.mixed_precision == "fp16" else torch.bfloat16
    if device.type == "cpu" and dtype == torch.float16:
        return contextlib.nullcontext()  # CPU autocast is bf16-only on older torch; fp32 is exact
    return torch.autocast(device.type, dtype=dtype)


def make_scaler(cfg: TrainConfig, device: torch.device):
    """fp16 needs loss scaling or small gradients underflow; bf16 and fp32 do not."""
    enabled = cfg.mixed_precision == "fp16" and device.type == "cuda"
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # torch < 2.3


def loss_on(model: TrainableModel, token: str, vectors: dict[str, torch.Tensor], latents: torch.Tensor,
            noise: torch.Tensor, t: torch.Tensor, texts: list[str], sizes: list, alphas: torch.Tensor,
            cfg: TrainConfig) -> torch.Tensor:
    """Per-sample diffusion loss: noise the latents to step t, ask the UNet, compare with the target."""
    noisy = add_noise(latents, noise, t, alphas)
    cond = model.encode_prompts(texts, token, vectors, sizes)
    pred = model.predict(noisy.to(model.dtype), t, cond)
    loss = per_sample_mse(pred, target_for(model.prediction_type, latents, noise, t, alphas))
    if cfg.min_snr_gamma > 0:
        loss = loss * snr_weight(t, alphas, cfg.min_snr_gamma, model.prediction_type)
    return loss


@torch.no_grad()
def validation_loss(model: TrainableModel, cfg: TrainConfig, vb: ValidationBatch,
                    vectors: dict[str, torch.Tensor], alphas: torch.Tensor) -> float:
    dev, total = model.device, 0.0
    with autocast_for(cfg, dev):
        for i in range(len(vb.latents)):  # one at a time: validation images may sit in different buckets
            x0, n = vb.latents[i][None].to(dev), vb.noise[i][None].to(dev)
            t = vb.timesteps[i : i + 1].to(dev)
            total += float(loss_on(model, cfg.token_string, vectors, x0, n, t, vb.texts[i : i + 1],
                                   vb.sizes[i : i + 1], alphas, cfg).sum())
    return total / len(vb.latents)


def guard_update(vectors: dict[str, torch.Tensor], good: dict[str, torch.Tensor]) -> bool:
    """After an optimizer step: True, with `good` updated in place, when every vector is finite and
    no longer than MAX_NORM; else the vectors roll back to `good` and False. The norm too: elements
    of 1e30 are finite, but their norm (and the host's fp16) overflow."""
    with torch.no_grad():
        ok = all(bool(torch.isfinite(v).all()) and float(v.norm(dim=-1).max()) <= MAX_NORM
                 for v in vectors.values())
        src, dst = (vectors, good) if ok else (good, vectors)
        for k in vectors:
            dst[k].copy_(src[k])
    return ok


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    if cfg.max_train_epochs > 0:
        return cfg.max_train_epochs * math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps)
    return cfg.max_train_steps


def run_training(cfg: TrainConfig, model: TrainableModel, cb: Callbacks | None = None) -> TrainResult:
    """Train `cfg.token_string` on `model`. Raises PrepareError for bad input before any step."""
    cb = cb or Callbacks()
    seed = cfg.seed if cfg.seed >= 0 else random.randrange(2**31)
    if cb.resume is not None:
        seed = int(cb.resume["seed"])  # the same latents and batches as the run it continues
    cb.progress(Progress("preparing", message="checking the token and reading images"))
    # Seeded, without disturbing the host's global RNG: the VAE samples latents from it, and every
    # process of a multi-GPU run must cache the same latents (same validation loss, same auto-stop).
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(seed)
        prep = prepare(cfg, model,
                       lambda what, done, n: cb.progress(Progress("preparing", message=f"{what} {done}/{n}")),
                       cb.should_stop)
    for w in prep.warnings:
        cb.log(w)
    fp = resume.fingerprint(cfg, prep.items)
    if cb.resume is not None:
        why = resume.mismatch(cb.resume, fp, prep.vectors, prep.start_step)
        if why:
            cb.log(f"weights: resuming from the vectors only: {why}")
            cb.resume = None
        else:
            cb.log(f"weights: resuming exactly from step {prep.start_step}: optimizer moments, data order "
                   "and noise continue where the saved run was")
    with model.training(cfg.gradient_checkpointing):
        return _loop(cfg, model, cb, prep, seed, fp)


def _loop(cfg: TrainConfig, model: TrainableModel, cb: Callbacks, prep: Prepared, seed: int,
          fp: str) -> TrainResult:
    dev = model.device
    rng = random.Random(seed + cb.rank)  # prompts, flips: differ per process, repeat per seed
    gen = torch.Generator().manual_seed(seed + cb.rank)  # noise and timesteps, made on CPU so any device repeats
    alphas = model.alphas_cumprod().to(dev, torch.float32)
    # The only trainable parameters: fp32 leaf tensors, one per text encoder. Nothing else gets a grad.
    vectors = {k: v.to(dev, torch.float32).clone().requires_grad_(True) for k, v in prep.vectors.items()}
    # each process draws its own shuffle; all_reduce averages their gradients (data parallel)
    sampler = data.BatchSampler(prep.items, prep.batch_size, seed=seed + cb.rank)
    max_steps = total_steps(cfg, sampler.batches_per_epoch())
    pieces = parse_piecewise(cfg.learning_rate)
    scale = prep.batch_size * cfg.gradient_accumulation_steps * cb.world_size if cfg.scale_lr else 1.0

    def lr_for(s: int) -> float:
        return lr_at(pieces, cfg.lr_scheduler, s, max_steps, cfg.lr_warmup_steps,
                     cfg.lr_scheduler_num_cycles, cfg.lr_scheduler_power, scale)

    step = prep.start_step
    optimizer = make_optimizer(cfg, list(vectors.values()), lr_for(step))
    scaler = make_scaler(cfg, dev)
    losses: list[tuple[int, float]] = []
    vals: list[tuple[int, float]] = []
    good = {k: v.detach().clone() for k, v in vectors.items()}  # last finite vectors, restored on NaN
    status, message, output = "done", "", None
    t0, steps_timed, accum, running, epoch, pos = time.monotonic(), 0, 0, [], 0, 0
    epoch_batches: list[list[int]] = []
    cb.live.good, cb.live.step, cb.live.start_step = good, step, step
    if cb.resume is not None:
        r = cb.resume
        optimizer.load_state_dict(r["optimizer"])
        if r.get("scaler"):
            scaler.load_state_dict(r["scaler"])
        rng.setstate(r["rng"])
        gen.set_state(r["gen"])
        epoch, pos, vals = int(r["epoch"]), int(r["pos"]), [tuple(v) for v in r["vals"]]
        epoch_batches = sampler.epoch(epoch) if epoch else []

    def state() -> dict | None:
        if status == "nan":  # the optimizer moved past the rolled-back vectors
            return None
        return {"fingerprint": fp, "seed": seed, "step": step, "epoch": epoch, "pos": pos, "rng": rng.getstate(),
                "gen": gen.get_state(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "vals": vals}

    cb.live.state = state

    def snapshot() -> Embedding:
        return Embedding({k: v.detach() for k, v in vectors.items()}, step=step, name=cfg.name).detached()

    if prep.validation is not None and step < max_steps and cb.resume is None:
        vals.append((step, validation_loss(model, cfg, prep.validation, vectors, alphas)))

    while step < max_steps:
        if cb.should_stop():
            status, message = "interrupted", f"interrupted at step {step}"
            break
        if pos >= len(epoch_batches):  # a new epoch
            epoch, pos = epoch + 1, 0
            epoch_batches = sampler.epoch(epoch)
            continue
        batch = epoch_batches[pos]
        pos += 1
        items = [prep.items[i] for i in batch]
        flips = [it.subset.flip_aug and rng.random() < 0.5 for it in items]
        latents, sizes = _latents(model, prep, batch, flips, rng)
        texts = [prep.prompts.build(it, rng, epoch=epoch, step=step, max_steps=max_steps) for it in items]
        weights = torch.tensor([cfg.prior_loss_weight if it.subset.is_reg else 1.0 for it in items], device=dev)
        noise = torch.randn(latents.shape, generator=gen)
        if cfg.noise_offset > 0:  # shifts the mean per channel so the model learns dark/bright images
            noise += cfg.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=gen)
        t = torch.randint(0, alphas.shape[0], (latents.shape[0],), generator=gen)
        with autocast_for(cfg, dev):
            per = loss_on(model, cfg.token_string, vectors, latents.to(dev), noise.to(dev), t.to(dev),
                          texts, sizes, alphas, cfg)
            loss = (per * weights).mean()
        if loss.requires_grad:  # a batch whose prompts all lack the token teaches nothing
            scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
        running.append(loss.detach())  # no float() here: one device sync per optimizer step, below
        accum += 1
        if accum < cfg.gradient_accumulation_steps:
            continue
        accum = 0
        step_loss = float(torch.stack(running).mean())
        running = []
        if not math.isfinite(step_loss):  # the vectors are still the last good ones: no update yet
            status, message = "nan", f"the loss became {step_loss} at step {step}; kept the last good vectors"
            break
        for v in vectors.values():
            if v.grad is None:  # no prompt of these batches named the token (prepare checked some do)
                v.grad = torch.zeros_like(v)
            cb.all_reduce(v.grad)
        scaler.unscale_(optimizer)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(vectors.values()), cfg.max_grad_norm)
        for g in optimizer.param_groups:
            g["lr"] = lr_for(step)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if not guard_update(vectors, good):
            status, message = "nan", (f"the update at step {step} made the vectors non-finite or overflowing "
                                      "(learning rate too high?); kept the last good ones")
            break
        step += 1
        cb.live.step = step
        steps_timed += 1
        losses.append((step, step_loss))
        val = None
        if prep.validation is not None and step % cfg.validation_every_n_steps == 0:
            val = validation_loss(model, cfg, prep.validation, vectors, alphas)
            vals.append((step, val))
        elapsed = time.monotonic() - t0
        recent = [x for _, x in losses[-50:]]
        cb.progress(Progress(
            "training", step, max_steps, epoch, losses[-1][1], sum(recent) / len(recent), lr_for(step - 1),
            val if val is not None else (vals[-1][1] if vals else None),
            {k: v.detach().norm(dim=-1).tolist() for k, v in vectors.items()},
            elapsed / steps_timed * (max_steps - step), validated=val is not None,
        ))
        if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 and step < max_steps:
            cb.on_checkpoint(snapshot(), False)
        if cfg.sample_every_n_steps and step % cfg.sample_every_n_steps == 0:
            cb.on_sample(step, snapshot())
        if cfg.auto_stop and val is not None and flattened([x for _, x in vals], cfg.auto_stop_window,
                                                          cfg.auto_stop_threshold):
            status, message = "auto_stopped", f"validation loss flattened at step {step}"
            break

    final = snapshot()
    if not message:
        message = f"trained {step} steps" if step > prep.start_step else f"already at step {step} of {max_steps}"
    if step > prep.start_step:
        output = cb.on_checkpoint(final, True)
    else:  # nothing learned: writing the start vectors would only take the name
        message += "; nothing was saved"
    cb.progress(Progress("done", step, max_steps, epoch, losses[-1][1] if losses else None,
                         val_loss=vals[-1][1] if vals else None, norms=final.norms(), message=message))
    return TrainResult(status, step, final, output, losses, vals, prep.warnings, message)


def _latents(model: TrainableModel, prep: Prepared, batch: list[int], flips: list[bool],
             rng: random.Random) -> tuple[torch.Tensor, list]:
    if prep.cache is not None:
        got = [prep.cache.get(i, flip=f) for i, f in zip(batch, flips)]
        return torch.stack([g[0] for g in got]).float(), [g[1] for g in got]
    pixels, sizes = [], []
    for i, f in zip(batch, flips):
        px, size = data.load_pixels(prep.items[i], rng, flip=f)
        pixels.append(px)
        sizes.append(size)
    # The VAE samples each latent from torch's global RNG: seed it from the run's RNG (part of the
    # resume state), so a run without the latent cache repeats per seed and resumes exactly.
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(rng.getrandbits(63))
        return model.encode_images(torch.stack(pixels).to(model.device)).float().cpu(), sizes
