"""Everything before the first step: token checks, start vectors, dataset, latent cache and the
fixed validation batch. Kept apart from the loop so the loop reads top to bottom."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lib_ti import data, formats
from lib_ti.config import TrainConfig
from lib_ti.data.latents import refuse_random_crop
from lib_ti.embedding import Embedding
from lib_ti.model import SINGLE_SLOT, SizeCond, TrainableModel
from lib_ti.tokens import TokenError, check_token_string, init_vectors


class PrepareError(ValueError):
    """A problem with the user's input found before training; `field` names the option."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


@dataclass
class ValidationBatch:
    latents: list[torch.Tensor]  # [C,h,w] float32 CPU each; buckets may differ
    noise: list[torch.Tensor]
    timesteps: torch.Tensor
    texts: list[str]
    sizes: list[SizeCond]


@dataclass
class Prepared:
    vectors: dict[str, torch.Tensor]  # start values, float32 CPU
    start_step: int
    items: list  # data.ImageItem
    skipped: list[tuple[str, str]]
    prompts: data.PromptBuilder
    cache: data.LatentCache | None
    validation: ValidationBatch | None
    warnings: list[str]
    batch_size: int = 1  # the dataset TOML's batch_size wins over train_batch_size, as in kohya


def start_vectors(cfg: TrainConfig, model: TrainableModel) -> tuple[dict[str, torch.Tensor], int]:
    slots = model.slots()
    if cfg.weights:
        try:
            emb = formats.read_embedding(cfg.weights)
        except (OSError, formats.FormatError) as e:
            raise PrepareError("weights", str(e)) from None
        vecs = dict(emb.vectors)
        if set(vecs) == {SINGLE_SLOT} and set(slots) != {SINGLE_SLOT}:
            pass  # width check below names both families
        elif len(vecs) == 1 and len(slots) == 1:
            vecs = {next(iter(slots)): next(iter(vecs.values()))}
        try:
            formats.check_widths(Embedding(vecs), slots)
        except formats.FormatError as e:
            raise PrepareError("weights", str(e)) from None
        return {k: v.float().clone() for k, v in vecs.items()}, int(emb.step or 0)
    try:
        return init_vectors(model, cfg.init_word, cfg.num_vectors_per_token, cfg.init_word_spread), 0
    except TokenError as e:
        raise PrepareError(e.field, str(e)) from None


def dataset_spec(cfg: TrainConfig) -> data.DatasetSpec:
    w, h = cfg.resolution_wh()
    opts = cfg.subset_options()
    base = dict(resolution=(h, w), enable_bucket=cfg.enable_bucket, min_bucket_reso=cfg.min_bucket_reso,
                max_bucket_reso=cfg.max_bucket_reso, bucket_reso_steps=cfg.bucket_reso_steps,
                bucket_no_upscale=cfg.bucket_no_upscale, batch_size=cfg.train_batch_size,
                center_crop=cfg.center_crop)
    if cfg.dataset_config:
        return data.load_dataset_toml(cfg.dataset_config, defaults={**base, **opts})
    for key in ("train_data_dir", "reg_data_dir"):
        p = getattr(cfg, key)
        if p and not Path(p).is_dir():
            raise PrepareError(key, f"folder '{p}' does not exist")
    subsets = data.subsets_from_train_dir(cfg.train_data_dir, **opts)
    if cfg.reg_data_dir:
        subsets += data.subsets_from_train_dir(cfg.reg_data_dir, is_reg=True, **opts)
    return data.DatasetSpec(subsets=subsets, **base)


def check_cacheable(cfg: TrainConfig, items: list) -> None:
    """kohya's rule (a cached latent is one fixed view): per-subset random_crop / color_aug /
    face_crop_aug_range from a dataset TOML need cache_latents off. Checked before any latent is
    encoded, and by the submit checks (the top-level options are config checks)."""
    if not cfg.cache_latents:
        return
    try:
        refuse_random_crop(items)
    except data.DataError as e:
        raise PrepareError("dataset_config" if cfg.dataset_config else "cache_latents", str(e)) from None


def check_data(cfg: TrainConfig) -> data.ScanResult:
    """The dataset read without a model (the CLI runs this before loading one)."""
    try:
        scan = data.scan(dataset_spec(cfg))
    except data.DataError as e:
        raise PrepareError("train_data_dir", str(e)) from None
    if not any(not it.subset.is_reg for it in scan.items):
        raise PrepareError("train_data_dir", "no training images (only regularization images were found)")
    return scan


def prompt_mode(cfg: TrainConfig) -> str:
    if cfg.use_object_template:
        return "object"
    if cfg.use_style_template:
        return "style"
    if cfg.template_file:
        return "template"
    return "caption" if cfg.prompt_source == "captions" else "auto"


def check_prompts(prompts: data.PromptBuilder, train_items: list, token: str) -> list[str]:
    """Notes on where the prompts come from and which captions lack the token; refuses a set of
    prompts that never names the token (no gradient could reach it: host pitfall 17)."""
    notes = []
    captioned = prompts.captioned(train_items)
    if prompts.mode == "auto":
        n = len(train_items) - len(captioned)
        notes.append(f"prompt source auto: {len(captioned)} images have captions, {n} use the object template"
                     + (f" ('a photo of a {token}', ...)" if n else ""))
    missing = data.captions_missing_token(captioned, token)
    if not captioned or not missing:
        return notes
    by_template = len(captioned) < len(train_items) or (
        prompts.mode == "template" and any("[name]" in t for t in prompts.templates))
    if len(missing) == len(train_items) and not by_template:
        raise PrepareError("token_string", f"no caption contains '{token}', so no training prompt names it. "
                           "Add it to the captions, or use the object/style template")
    if len(missing) == len(captioned) and prompts.mode == "template":
        notes.append(f"no caption contains '{token}': only template lines with [name] train it")
    else:
        notes.append(f"{len(missing)} of {len(captioned)} captions lack '{token}'")
    return notes


def prepare(cfg: TrainConfig, model: TrainableModel, progress: Callable[[str, int, int], None],
            should_stop: Callable[[], bool]) -> Prepared:
    warnings: list[str] = list(cfg.notes())
    try:
        check_token_string(model, cfg.token_string)
    except TokenError as e:
        raise PrepareError(e.field, str(e)) from None
    vectors, start_step = start_vectors(cfg, model)

    try:
        spec = dataset_spec(cfg)
        scan = data.scan(spec)
    except data.DataError as e:
        raise PrepareError("train_data_dir", str(e)) from None
    for path, why in scan.skipped:
        warnings.append(f"skipped {path}: {why}")
    items = scan.items
    try:
        templates = data.load_template(cfg.template_file) if cfg.template_file else None
        prompts = data.PromptBuilder(cfg.token_string, prompt_mode(cfg), templates)
    except (OSError, data.DataError) as e:
        raise PrepareError("template_file", str(e)) from None
    train_items = [it for it in items if not it.subset.is_reg]
    if not train_items:
        raise PrepareError("train_data_dir", "no training images (only regularization images were found)")
    warnings += check_prompts(prompts, train_items, cfg.token_string)

    check_cacheable(cfg, items)
    cache = None
    if cfg.cache_latents:
        cache = data.LatentCache.build(
            items, model.encode_images, cfg.vae_batch_size, flip_aug=cfg.flip_aug,
            to_disk=cfg.cache_latents_to_disk, cache_key=model.cache_key,
            progress=lambda done, total: progress("caching latents", done, total),
            should_stop=should_stop,
        )
    validation = None
    if cfg.validation_every_n_steps > 0:
        validation = validation_batch(cfg, model, train_items, items, cache, prompts)
    return Prepared(vectors, start_step, items, scan.skipped, prompts, cache, validation, warnings,
                    spec.batch_size)


def validation_batch(cfg: TrainConfig, model: TrainableModel, train_items: list, items: list,
                     cache: data.LatentCache | None, prompts: data.PromptBuilder) -> ValidationBatch:
    """Fixed images, prompts, noise and timesteps (DVAR): the only loss curve that is not noise.
    Images are cycled so that even one image gives a batch spread over the noise schedule."""
    gen = torch.Generator().manual_seed(cfg.validation_seed)
    latents, sizes, texts = [], [], []
    for j in range(cfg.validation_batch_size):
        it = train_items[j % len(train_items)]
        if cache is not None:
            latent, size = cache.get(items.index(it), flip=False)
        else:
            pixels, size = data.load_pixels(it, random.Random(cfg.validation_seed), flip=False, colour=False)
            latent = model.encode_images(pixels[None].to(model.device))[0].float().cpu()
        latents.append(latent.float())
        sizes.append(size)
        texts.append(prompts.fixed(it))
    n = len(latents)
    noise = [torch.randn(x.shape, generator=gen) for x in latents]
    # spread over the schedule, away from the ends where the loss says little about the prompt
    timesteps = torch.linspace(100, 900, n).round().long() if n > 1 else torch.tensor([500])
    return ValidationBatch(latents, noise, timesteps, texts, sizes)
