"""The typed config: kohya names, coercion from every front end, one error listing every bad field."""

import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lib_ti.config import ConfigError, TrainConfig

BASE = {"token_string": "mytok123", "train_data_dir": "/data"}


def test_defaults_are_valid_and_named_like_kohya():
    cfg = TrainConfig.from_dict(BASE)
    assert cfg.num_vectors_per_token == 1 and cfg.lr_scheduler == "constant"
    for kohya in ("token_string", "init_word", "num_vectors_per_token", "weights", "use_object_template",
                  "use_style_template", "train_data_dir", "dataset_config", "reg_data_dir", "prior_loss_weight",
                  "caption_extension", "shuffle_caption", "keep_tokens", "resolution", "enable_bucket",
                  "min_bucket_reso", "max_bucket_reso", "flip_aug", "random_crop", "train_batch_size",
                  "gradient_accumulation_steps", "max_train_steps", "learning_rate", "scale_lr", "lr_scheduler",
                  "lr_warmup_steps", "max_grad_norm", "optimizer_type", "mixed_precision",
                  "gradient_checkpointing", "cache_latents", "cache_latents_to_disk", "vae_batch_size",
                  "min_snr_gamma", "noise_offset", "clip_skip", "seed", "save_every_n_steps",
                  "sample_every_n_steps", "sample_prompts", "output_name", "save_model_as"):
        assert kohya in TrainConfig.field_names()


def test_kohya_toml_runs_unchanged(tmp_path):
    p = tmp_path / "args.toml"
    p.write_text(textwrap.dedent("""
        pretrained_model_name_or_path = "/models/sd15"
        train_data_dir = "/data/dog"
        output_dir = "/out"
        output_name = "dog_ti"
        save_model_as = "safetensors"
        token_string = "mydog123"
        init_word = "dog"
        num_vectors_per_token = 4
        learning_rate = 1e-6
        max_train_steps = 1600
        optimizer_type = "AdamW8bit"
        xformers = true
        mixed_precision = "fp16"
        resolution = "512,768"
        train_batch_size = 4
        max_data_loader_n_workers = 8
        seed = 42
        """))
    cfg = TrainConfig.from_toml(p)
    assert cfg.num_vectors_per_token == 4 and cfg.resolution_wh() == (512, 768)
    assert cfg.optimizer_name() == "AdamW"
    notes = "\n".join(cfg.notes())
    assert "xformers" in notes and "AdamW8bit runs as AdamW" in notes and "max_data_loader_n_workers" in notes


def test_every_bad_field_is_named_with_its_range():
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({**BASE, "num_vectors_per_token": 80, "learning_rate": "0.005:100, abc",
                               "lr_scheduler": "cosine_annealing", "train_batch_siz": 2, "flip_aug": "maybe"})
    errs = e.value.errors
    assert "1..75" in errs["num_vectors_per_token"]
    assert "abc" in errs["learning_rate"]
    assert "cosine_with_restarts" in errs["lr_scheduler"]
    assert "did you mean 'train_batch_size'" in errs["train_batch_siz"]
    assert "true or false" in errs["flip_aug"]


def test_missing_required_and_conflicts():
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"use_object_template": True, "use_style_template": True, "random_crop": True})
    assert {"token_string", "train_data_dir", "use_style_template", "random_crop"} <= set(e.value.errors)
    assert TrainConfig.from_dict(BASE).prompt_source == "auto"  # captions where there are any, else a template
    with pytest.raises(ConfigError, match="prompt_source"):
        TrainConfig.from_dict({**BASE, "prompt_source": "caption"})


def test_ui_values_coerce():
    # gradio sends floats for integer sliders and strings from text boxes
    cfg = TrainConfig.from_dict({**BASE, "max_train_steps": 200.0, "learning_rate": 0.005, "resolution": 512,
                                 "optimizer_args": "weight_decay=0.01 betas=(0.9,0.99)"})
    assert cfg.max_train_steps == 200 and cfg.learning_rate == "0.005"
    assert cfg.optimizer_kwargs() == {"weight_decay": 0.01, "betas": (0.9, 0.99)}
    with pytest.raises(ConfigError):
        TrainConfig.from_dict({**BASE, "max_train_steps": 2.5})


def test_replace_revalidates():
    cfg = TrainConfig.from_dict(BASE)
    assert cfg.replace(max_train_steps=7).max_train_steps == 7
    with pytest.raises(ConfigError):
        cfg.replace(train_batch_size=0)


@given(st.integers(min_value=-5, max_value=100))
def test_vector_count_range(n):
    vals = {**BASE, "num_vectors_per_token": n}
    if 1 <= n <= 75:
        assert TrainConfig.from_dict(vals).num_vectors_per_token == n
    else:
        with pytest.raises(ConfigError, match="num_vectors_per_token"):
            TrainConfig.from_dict(vals)


@given(st.integers(min_value=8, max_value=9000), st.integers(min_value=8, max_value=9000))
def test_resolution_parse(w, h):
    vals = {**BASE, "resolution": f"{w},{h}"}
    ok = all(64 <= x <= 8192 and x % 8 == 0 for x in (w, h))
    if ok:
        assert TrainConfig.from_dict(vals).resolution_wh() == (w, h)
    else:
        with pytest.raises(ConfigError, match="resolution"):
            TrainConfig.from_dict(vals)
