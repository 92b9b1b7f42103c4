"""The TI Trainer tab on gradio 3.41 inside the stand-in host (tests/fakehost): every option is
reachable with a stable label and id, and the handlers do what the buttons promise, called the way
gradio calls them (one list of input values per click)."""

from __future__ import annotations

import collections
import re
import sys
from pathlib import Path

import pytest
from conftest import fake_host_modules

from lib_ti.config import TrainConfig
from lib_ti.webui import plot

TESTS = Path(__file__).resolve().parent
TOKEN = "mytok123"
CLI_ONLY = ("pretrained_model_name_or_path", "device", "v2", "output_dir", "debug_dataset",
            "weighted_captions")


# ---------------------------------------------------------------- plot (no host needed)

def test_plot_draws_raw_smoothed_and_validation_points():
    losses = [(s, 1.0 / (1 + s) + (0.2 if s % 2 else 0.0)) for s in range(1, 41)]
    svg = plot.loss_svg(losses, [(10, 0.3), (20, 0.2), (30, float("nan"))])
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    raw = re.search(r'class="ti-raw" points="([^"]+)"', svg).group(1).split()
    smooth = re.search(r'class="ti-smooth" points="([^"]+)"', svg).group(1).split()
    assert len(raw) == len(smooth) == 40
    assert svg.count('class="ti-val"') == 2  # the NaN point is dropped, not drawn at the edge
    assert "step 1" in svg and "step 40" in svg


def test_plot_smoothing_and_edge_cases():
    sm = plot.smooth([1.0, 0.0] * 50)
    assert all(0.0 <= v <= 1.0 for v in sm) and abs(sm[-1] - 0.5) < 0.2
    assert plot.smooth([2.0])[0] == pytest.approx(2.0)  # bias-corrected: no pull towards 0
    assert "no loss yet" in plot.loss_svg([], [])
    assert "<polyline" in plot.loss_svg([(5, 0.4)], [])  # one point, flat range: no division by zero
    many = plot.loss_svg([(s, 0.1) for s in range(10_000)])
    assert len(re.search(r'class="ti-raw" points="([^"]+)"', many).group(1).split()) <= plot.MAX_RAW + 1
    assert "v1" in plot.norms_table({"clip_l": [0.1, 0.2], "clip_g": [0.3, 0.4]})


# ---------------------------------------------------------------- the stand-in host

@pytest.fixture
def host(tmp_path):
    """The stand-in host in sys.modules (with a tiny SD1 model loaded) for one test, then the
    module table and sys.path exactly as before: no fake `modules` leaks into other tests."""
    with fake_host_modules() as fakehost:
        fake = fakehost.install(data_dir=str(tmp_path / "webui"), family="sd1")
        yield fake


@pytest.fixture
def images(tmp_path):
    sys.path.insert(0, str(TESTS))
    try:
        from ui_harness import make_dataset
    finally:
        sys.path.remove(str(TESTS))
    return make_dataset(tmp_path / "data", n=3)


def is_update(v) -> bool:
    """gr.update(): {"__type__": "generic_update"} in gradio 3, "update" in 4."""
    return isinstance(v, dict) and "update" in str(v.get("__type__", ""))


class Tab:
    """The tab built inside gr.Blocks, plus helpers that fire its events like gradio does."""

    def __init__(self, txt2img: bool = False):
        import gradio as gr

        from lib_ti.webui import tab

        tab._built["train_tab"] = False
        with gr.Blocks() as self.demo, gr.Tabs():
            params = type("P", (), {"txt2img_preview_params": []})()
            if txt2img:
                params.txt2img_preview_params = [
                    gr.Textbox(f"a photo of {TOKEN}"), gr.Textbox(""), gr.Number(3), gr.Textbox("Euler a"),
                    gr.Number(7.0), gr.Number(1), gr.Number(64), gr.Number(64)]
            self.ui = tab.build_train_tab(params)
        self.values = {c._id: getattr(c, "value", None) for c in self.demo.blocks.values()}

    def set(self, **values):
        for name, v in values.items():
            self.values[self.ui.form[name]._id] = v

    def fire(self, component, trigger="click"):
        """Run the event's Python function with the components' current values; store outputs."""
        for i, dep in enumerate(self.demo.dependencies):
            if component._id in dep["targets"] and dep["trigger"] == trigger:
                args = [self.values[j] for j in dep["inputs"]]
                out = self.demo.fns[i].fn(*args)
                out = out if isinstance(out, (list, tuple)) else [out]
                for j, v in zip(dep["outputs"], out):
                    if not is_update(v):
                        self.values[j] = v
                return out
        raise AssertionError(f"no {trigger} event on {component}")

    def train(self, task_id, **values):
        self.set(**values)
        self.values[self.ui.parts["task_id"]._id] = task_id
        return self.fire(self.ui.parts["train"])


def test_every_option_is_reachable_with_stable_labels_and_ids(host):
    from lib_ti.webui.ui_form import PROMPT_SOURCE_FIELDS, UI_FIXED

    t = Tab()
    reachable = set(t.ui.form) | set(PROMPT_SOURCE_FIELDS)
    missing = [f for f in TrainConfig.field_names() if f not in reachable and f not in CLI_ONLY]
    assert missing == []  # save_model_as too: the WebUI writes .pt on request (job.make_config)
    assert set(UI_FIXED) == set(CLI_ONLY)

    ours = [b for b in t.demo.blocks.values() if getattr(b, "elem_id", None)]
    assert all(b.elem_id.startswith("ti_trainer_") for b in ours), [b.elem_id for b in ours]
    for name, comp in t.ui.form.items():
        assert comp.elem_id == f"ti_trainer_{name}"
        if name in TrainConfig.field_names():
            assert f"[{name}]" in comp.info  # the help text says which option this is
    labels = [b.label for b in t.demo.blocks.values() if getattr(b, "label", None)]
    dupes = [lab for lab, n in collections.Counter(labels).items() if n > 1]
    assert not dupes, dupes  # ui-config.json keys on labels


def test_prompt_source_choices_map_onto_the_config(host):
    from lib_ti.webui.ui_form import PROMPT_SOURCES, to_config_values

    keys = ("prompt_source", "use_object_template", "use_style_template", "template_file")
    got = {s: tuple(to_config_values({"prompt_source": s, "template_file": "subject"}, None)[k] for k in keys)
           for s in PROMPT_SOURCES}
    assert got == {"auto": ("auto", False, False, ""), "captions": ("captions", False, False, ""),
                   "object template": ("auto", True, False, ""), "style template": ("auto", False, True, ""),
                   "A1111 template file": ("auto", False, False, "subject")}
    assert Tab().ui.form["prompt_source"].value == "auto"  # the default, as in the config


def test_settings_give_the_starting_values(host):
    from modules import shared

    from lib_ti.webui import settings

    assert settings.default("max_train_steps") == 1000  # before on_ui_settings: the config's defaults
    settings.register()
    assert shared.opts.ti_trainer_max_train_steps == 1000
    shared.opts.set("ti_trainer_max_train_steps", 321)
    shared.opts.set("ti_trainer_learning_rate", "0.01:10, 1e-3")
    t = Tab()
    assert t.ui.form["max_train_steps"].value == 321
    assert t.ui.form["learning_rate"].value == "0.01:10, 1e-3"
    assert t.ui.form["validation_every_n_steps"].value == 50


def test_train_writes_the_embedding_and_the_live_view_shows_it(host, images):
    from lib_ti.webui import host_model

    t = Tab()
    t.set(save_every_n_steps=4, sample_every_n_steps=4, sample_prompts=f"a photo of {TOKEN}")
    for key, value in {"steps": 2, "width": 64, "height": 64}.items():
        t.values[t.ui.preview[key]._id] = value
    status, error = t.train("task(tab-ok)", token_string=TOKEN, train_data_dir=str(images), resolution="64",
                            max_train_steps=8, validation_every_n_steps=2, validation_batch_size=2)
    assert "done" in status and "error" not in error.split("performance")[0], error
    path = Path(host_model.embeddings_dir()) / f"{TOKEN}.safetensors"
    assert path.is_file()

    st, svg, norms, load_check, gallery, checkpoints, seen = t.fire(t.ui.parts["refresh"])
    assert 'data-status="done"' in st and "step 8/8" in st
    assert len(re.search(r'class="ti-smooth" points="([^"]+)"', svg).group(1).split()) >= 8
    assert 'class="ti-val"' in svg and "<td>" in norms
    assert "Host load check" in load_check
    assert [caption for _img, caption in gallery] == ["step 4", "step 8"]
    assert checkpoints["choices"] == [f"{TOKEN}-4.safetensors"]
    again = t.fire(t.ui.parts["refresh"])
    assert is_update(again[5]) and "choices" not in again[5] and is_update(again[4])  # unchanged: not resent

    t.values[t.ui.parts["checkpoints"]._id] = checkpoints["value"]
    (msg,) = t.fire(t.ui.parts["publish"])
    assert "Published" in msg and (path.parent / f"{TOKEN}-4.safetensors").is_file()
    (msg,) = t.fire(t.ui.parts["publish"])
    assert "already exists" in msg

    # the same name again: refused, naming the field, nothing overwritten
    before = path.stat().st_mtime_ns
    _st, error = t.train("task(tab-again)")
    assert 'data-field="token_string"' in error and "Overwrite" in error
    assert path.stat().st_mtime_ns == before


def test_bad_input_lists_every_field(host, images):
    t = Tab()
    _st, error = t.train("task(tab-bad)", token_string="cat", train_data_dir=str(images), resolution="64")
    assert 'data-field="token_string"' in error and "already the known word" in error

    _st, error = t.train("task(tab-bad2)", token_string="", train_data_dir="", learning_rate="fast",
                         resolution="63", max_train_steps=0)
    fields = re.findall(r'data-field="([^"]+)"', error)
    assert set(fields) >= {"token_string", "train_data_dir", "learning_rate", "resolution", "max_train_steps"}


def test_txt2img_preview_parameters_reach_the_job(host, images, monkeypatch):
    from lib_ti.webui import job

    seen = {}

    def fake_ui_train(id_task, values, preview):
        seen.update(values=values, preview=preview)
        raise job.ConfigError({"token_string": "stop here"})

    monkeypatch.setattr(job, "ui_train", fake_ui_train)
    t = Tab(txt2img=True)
    t.values[t.ui.parts["use_txt2img"]._id] = True
    t.set(prompt_source="style template", weights="None", optimizer_args="weight_decay=0.1")
    t.train("task(tab-t2i)", token_string=TOKEN, train_data_dir=str(images), resolution="64")
    assert seen["preview"] == {"prompt": f"a photo of {TOKEN}", "negative_prompt": "", "steps": 3,
                               "sampler_name": "Euler a", "cfg_scale": 7.0, "seed": 1, "width": 64, "height": 64}
    v = seen["values"]
    assert v["use_style_template"] and not v["use_object_template"] and v["template_file"] == ""
    assert v["weights"] == "" and v["optimizer_args"] == "weight_decay=0.1"
    assert v["clip_skip"] == 0  # job.make_config: follow the WebUI's Clip skip setting
    assert job.make_config(v).optimizer_kwargs() == {"weight_decay": 0.1}


def test_interrupt_before_the_run_starts_and_with_nothing_running(host):
    t = Tab()
    t.values[t.ui.parts["task_id"]._id] = "task(tab-early)"
    (msg,) = t.fire(t.ui.parts["interrupt"])
    assert "before the run started" in msg
    _st, error = t.train("task(tab-early)")
    assert "Interrupted before the run started" in error


def test_dataset_preview_shows_crops_prompts_and_token_ids(host, images):
    t = Tab()
    t.set(token_string=TOKEN, train_data_dir=str(images), resolution="64")
    t.values[t.ui.parts["preview_count"]._id] = 2
    gallery, info = t.fire(t.ui.parts["preview_dataset"])
    assert len(gallery) == 2 and gallery[0][0].size == (64, 64)
    assert info.count('class="ti-token"') >= 2 * 3  # mytok123 is several BPE pieces, in each prompt
    assert f"a photo of {TOKEN}" in info and "3 image(s)" in info

    t.set(train_data_dir=str(images / "missing"))
    _g, info = t.fire(t.ui.parts["preview_dataset"])
    assert 'data-field="train_data_dir"' in info


def test_fallback_tab_only_without_a_train_tab(host):
    from lib_ti.webui import tab

    tab._built["train_tab"] = False
    ((blocks, title, elem_id),) = tab.build_fallback_tab()
    assert (title, elem_id) == ("TI Trainer", "ti_trainer") and blocks is not None
    Tab()
    assert tab.build_fallback_tab() == []
