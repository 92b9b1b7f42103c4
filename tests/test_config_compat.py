"""Option names from other trainers: InvokeAI's invokeai-ti names (aliases, its token syntax and
defaults, resume from "latest") and kohya's dataset keys that the seeds do not list."""

from __future__ import annotations

import pytest
import torch

from lib_ti import formats, outputs
from lib_ti.config import ConfigError, TrainConfig
from lib_ti.config_compat import INVOKEAI_DEFAULTS, NOTED_KEYS, REFUSED_WHEN_ON, latest_checkpoint
from lib_ti.embedding import Embedding
from lib_ti.model import SINGLE_SLOT

BASE = dict(token_string="mytok", train_data_dir="/data")

# every name InvokeAI's textual_inversion_training.py parses, with a value and the field it sets
INVOKEAI = {
    "model": ("/models/sd15", "pretrained_model_name_or_path", "/models/sd15"),
    "placeholder_token": ("<mytok>", "token_string", "mytok"),
    "initializer_token": ("dog", "init_word", "dog"),
    "train_data_dir": ("/data", "train_data_dir", "/data"),
    "output_dir": ("/out", "output_dir", "/out"),
    "resolution": (768, "resolution", "768"),
    "center_crop": (True, "center_crop", True),
    "train_batch_size": (2, "train_batch_size", 2),
    "max_train_steps": (300, "max_train_steps", 300),
    "gradient_accumulation_steps": (4, "gradient_accumulation_steps", 4),
    "gradient_checkpointing": (True, "gradient_checkpointing", True),
    "learning_rate": (5e-4, "learning_rate", "0.0005"),
    "scale_lr": (False, "scale_lr", False),
    "lr_scheduler": ("cosine", "lr_scheduler", "cosine"),
    "lr_warmup_steps": (10, "lr_warmup_steps", 10),
    "mixed_precision": ("bf16", "mixed_precision", "bf16"),
    "save_steps": (100, "save_every_n_steps", 100),
    "seed": (42, "seed", 42),
    "num_vectors": (3, "num_vectors_per_token", 3),
}


def test_every_invokeai_name_sets_the_same_option():
    cfg = TrainConfig.from_dict({k: v for k, (v, _, _) in INVOKEAI.items()})
    for key, (_, field, want) in INVOKEAI.items():
        assert getattr(cfg, key if key == field else field) == want, key


@pytest.mark.parametrize("raw, token", [("<mytok>", "mytok"), ("mytok", "mytok"), (" <my-tok.2> ", "my-tok.2")])
def test_placeholder_token_brackets_are_invokeai_syntax(raw, token):
    cfg = TrainConfig.from_dict({"placeholder_token": raw, "train_data_dir": "/d"})
    assert cfg.token_string == token and cfg.name == token
    assert f"<{token}>" in "\n".join(cfg.notes())  # says what InvokeAI prompts type


def test_bad_trigger_is_reported_under_the_users_name():
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"placeholder_token": "<my tok>", "train_data_dir": "/d"})
    assert set(e.value.errors) == {"placeholder_token"}


def test_learnable_property_picks_the_templates():
    assert TrainConfig.from_dict({**BASE, "learnable_property": "style"}).use_style_template
    obj = TrainConfig.from_dict({**BASE, "learnable_property": "object"})
    assert obj.use_object_template and not obj.use_style_template
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({**BASE, "learnable_property": "face"})
    assert "learnable_property" in e.value.errors


def test_invokeai_defaults_apply_only_in_its_dialect():
    kohya = TrainConfig.from_dict(BASE)
    invoke = TrainConfig.from_dict({"placeholder_token": "<mytok>", "train_data_dir": "/d"})
    for field, value in INVOKEAI_DEFAULTS.items():
        assert getattr(invoke, field) == value, field
        assert getattr(kohya, field) == getattr(TrainConfig(), field)
    assert invoke.use_object_template  # InvokeAI has no captions: object templates unless told style
    assert invoke.optimizer_kwargs() == {"weight_decay": 0.01}  # AdamW's decay there; none here
    assert kohya.optimizer_kwargs() == {} and not kohya.use_object_template
    # what the config says wins over the dialect's default
    mine = TrainConfig.from_dict({"placeholder_token": "<t1>", "train_data_dir": "/d", "learning_rate": 0.003,
                                  "train_batch_size": 1, "adam_weight_decay": 0.0, "adam_beta2": 0.99})
    assert mine.learning_rate == "0.003" and mine.train_batch_size == 1
    assert mine.optimizer_kwargs() == {"betas": (0.9, 0.99), "weight_decay": 0.0}
    assert "InvokeAI's defaults apply" in "\n".join(mine.notes())
    # replace() passes every field: nothing is re-defaulted
    assert invoke.replace(max_train_steps=7).learning_rate == "1e-4"


def test_save_and_checkpointing_steps_are_one_cadence_here():
    both = TrainConfig.from_dict({**BASE, "save_steps": 200, "checkpointing_steps": 50})
    assert both.save_every_n_steps == 50 and any("checkpointing_steps" in n for n in both.notes())
    assert TrainConfig.from_dict({**BASE, "checkpointing_steps": 30}).save_every_n_steps == 30


@pytest.mark.parametrize("key", ["only_save_embeds", "enable_xformers_memory_efficient_attention", "repeats",
                                 "num_train_epochs", "allow_tf32", "report_to", "local_rank", "logging_dir"])
def test_invokeai_options_without_meaning_here_are_explained(key):
    cfg = TrainConfig.from_dict({**BASE, key: True if key != "repeats" else 100})
    assert any(n.startswith(f"{key}: ") and NOTED_KEYS[key] in n for n in cfg.notes())


def test_alias_and_own_name_must_agree():
    ok = TrainConfig.from_dict({**BASE, "placeholder_token": "<mytok>"})
    assert ok.token_string == "mytok"
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({**BASE, "model": "/a", "pretrained_model_name_or_path": "/b"})
    assert "model" in e.value.errors and "pretrained_model_name_or_path" in e.value.errors["model"]


@pytest.mark.parametrize("key, on", [("push_to_hub", True), ("in_json", "meta.json")])
def test_unimplemented_options_are_refused_only_when_switched_on(key, on):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({**BASE, key: on})
    assert e.value.errors[key] == REFUSED_WHEN_ON[key]
    off = TrainConfig.from_dict({**BASE, key: None})
    assert any(n.startswith(f"{key}: off") for n in off.notes())


def test_kohya_caption_keys_are_options_with_ranges():
    cfg = TrainConfig.from_dict({**BASE, "caption_dropout_rate": 0.1, "caption_tag_dropout_rate": 0.2,
                                 "caption_dropout_every_n_epochs": 3, "caption_prefix": "mytok",
                                 "caption_suffix": "photo", "keep_tokens_separator": "|||",
                                 "secondary_separator": ";;;", "enable_wildcard": True, "token_warmup_min": 2,
                                 "token_warmup_step": 0.5, "debug_dataset": True})
    opts = cfg.subset_options()
    assert opts["caption_dropout_rate"] == 0.1 and opts["keep_tokens_separator"] == "|||"
    assert opts["token_warmup_step"] == 0.5 and cfg.debug_dataset
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({**BASE, "caption_dropout_rate": 1.5, "caption_tag_dropout_rate": -1})
    assert set(e.value.errors) == {"caption_dropout_rate", "caption_tag_dropout_rate"}


def test_squash_and_random_crop_contradict():
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({**BASE, "center_crop": False, "random_crop": True, "cache_latents": False})
    assert "center_crop" in e.value.errors


def _ckpt(path, step):
    formats.save_embedding(Embedding({SINGLE_SLOT: torch.ones(1, 8) * step}, step=step), str(path), "safetensors")


def test_resume_from_latest_picks_the_newest_checkpoint(tmp_path):
    invoke = {"placeholder_token": "<mytok>", "train_data_dir": "/d", "output_dir": str(tmp_path)}
    fresh = TrainConfig.from_dict({**invoke, "resume_from_checkpoint": "latest"})
    assert fresh.weights == "" and any("starting a new run" in n for n in fresh.notes())
    for step in (5, 40, 10):
        _ckpt(tmp_path / f"mytok-{step}.safetensors", step)
    _ckpt(tmp_path / "other-99.safetensors", 99)  # another run's checkpoints are not ours
    torch.save({"<mytok>": torch.zeros(8)}, tmp_path / "learned_embeds-steps-20.bin")  # InvokeAI's own
    assert latest_checkpoint(tmp_path, "mytok") == tmp_path / "mytok-40.safetensors"
    cfg = TrainConfig.from_dict({**invoke, "resume_from_checkpoint": "latest"})
    assert cfg.weights == str(tmp_path / "mytok-40.safetensors")
    # a plain name is looked up in output_dir, as InvokeAI does; a folder (accelerate state) is refused
    named = TrainConfig.from_dict({**invoke, "resume_from_checkpoint": "learned_embeds-steps-20.bin"})
    assert named.weights == str(tmp_path / "learned_embeds-steps-20.bin")
    (tmp_path / "checkpoint-500").mkdir()
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({**invoke, "resume_from_checkpoint": str(tmp_path / "checkpoint-500")})
    assert "folder" in e.value.errors["resume_from_checkpoint"]
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({**invoke, "resume_from_checkpoint": "latest", "weights": "/x.pt"})
    assert "resume_from_checkpoint" in e.value.errors


def test_invokeai_layout_paths(tmp_path):
    cfg = TrainConfig.from_dict({**BASE, "output_dir": str(tmp_path), "save_model_as": "invokeai"})
    assert outputs.output_file(cfg) == (tmp_path / "mytok" / "learned_embeds.bin", "diffusers", "<mytok>")
    # checkpoints keep their step (the InvokeAI format has no room for it), so "latest" resumes there
    assert outputs.output_file(cfg, step=50) == (tmp_path / "mytok-50.safetensors", "safetensors", None)
    assert outputs.output_file(cfg, sdxl=True)[:2] == (tmp_path / "mytok" / "learned_embeds.safetensors",
                                                       "safetensors")
    plain = cfg.replace(save_model_as="pt")
    assert outputs.output_file(plain, step=3) == (tmp_path / "mytok-3.pt", "a1111-pt", None)


def test_invokeai_bin_is_a_torch_dict_token_to_tensor(tmp_path):
    one, three = torch.randn(1, 768), torch.randn(3, 768)
    formats.save_embedding(Embedding({SINGLE_SLOT: one}, step=4), str(tmp_path / "a.bin"), "diffusers", token="<t>")
    formats.save_embedding(Embedding({SINGLE_SLOT: three}), str(tmp_path / "b.bin"), "diffusers", token="<t>")
    a = torch.load(tmp_path / "a.bin", weights_only=True)
    assert list(a) == ["<t>"] and a["<t>"].shape == (768,)  # one vector 1-D, as InvokeAI wrote it
    assert torch.load(tmp_path / "b.bin", weights_only=True)["<t>"].shape == (3, 768)
    back = formats.read_embedding(tmp_path / "a.bin")
    assert torch.equal(back.vectors[SINGLE_SLOT], one) and back.name == "<t>"
