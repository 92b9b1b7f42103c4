"""Training data: folders and kohya TOML -> checked images with captions and buckets -> batches of
same-bucket indices, prompts, and cached latents. Host-free (stdlib, torch, numpy, PIL, safetensors).

Size order: `DatasetSpec.resolution` and SizeCond are (h, w); image, bucket and resize sizes on
`ImageItem` are (w, h) as in kohya.
"""

from __future__ import annotations

from lib_ti.data.buckets import BucketManager, assign_bucket, cover_size, make_buckets
from lib_ti.data.captions import (
    A1111_TEMPLATES,
    IMAGENET_STYLE_TEMPLATES_SMALL,
    IMAGENET_TEMPLATES_SMALL,
    PromptBuilder,
    captions_missing_token,
    load_template,
    load_template_file,
    process_caption,
)
from lib_ti.data.dataset_toml import load_dataset_toml
from lib_ti.data.images import ImageItem, ScanResult, load_pixels, scan
from lib_ti.data.latents import LatentCache
from lib_ti.data.sampler import BatchSampler, epoch_samples
from lib_ti.data.spec import IMAGE_EXTS, DataError, DatasetSpec, SubsetSpec, subsets_from_train_dir

__all__ = [
    "A1111_TEMPLATES", "IMAGENET_STYLE_TEMPLATES_SMALL", "IMAGENET_TEMPLATES_SMALL", "IMAGE_EXTS",
    "BatchSampler", "BucketManager", "DataError", "DatasetSpec", "ImageItem", "LatentCache",
    "PromptBuilder", "ScanResult", "SubsetSpec", "assign_bucket", "captions_missing_token", "cover_size",
    "epoch_samples", "load_dataset_toml", "load_pixels", "load_template", "load_template_file",
    "make_buckets", "process_caption", "scan", "subsets_from_train_dir",
]
