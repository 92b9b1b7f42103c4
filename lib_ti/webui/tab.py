"""The TI Trainer tab: a sub-tab of Train on A1111 and reForge (on_ui_train_tabs), and a short
notice as a top-level tab on hosts that never build a Train tab (Forge).

Form values reach Python as one list that is zipped with the list of names (`TabUI.names`), so
no handler has thirty positional parameters; ui_form maps them to config fields and job.py does
the rest. Gradio code sticks to what 3.41 and 4.x share: gr.update, no .style(); the one JS hook
is passed as `_js` (gradio 3) or `js` (gradio 4, where only Forge shims `_js`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from lib_ti.webui import host, ui_dataset, ui_handlers
from lib_ti.webui.job import PREVIEW_KEYS
from lib_ti.webui.ui_form import (
    NEW_EMBEDDING,
    PREVIEW_LABELS,
    TEMPLATE_FILE_SOURCE,
    TEMPLATE_NAMES,
    component,
    elem_id,
    prompt_source_component,
)

_built = {"train_tab": False}
_GRADIO4 = int(gr.__version__.split(".")[0]) >= 4
_JS_KW = "js" if _GRADIO4 else "_js"
# Forge (gradio 4) queues each event one at a time by default: a second Train click would wait,
# silent, for the whole first run. Unlimited, it gets its answer at once (the name is held; the
# host's queue lock still runs one training at a time), as under A1111's gradio 3 queue.
_TRAIN_KW = {_JS_KW: "ti_trainer_start", **({"concurrency_limit": None} if _GRADIO4 else {})}
# Our own preview settings when the txt2img tab is not used; the prompt comes from sample_prompts.
OWN_PREVIEW = {"negative_prompt": "", "steps": 20, "sampler_name": "Euler a", "cfg_scale": 7.0, "seed": -1,
               "width": 512, "height": 512}
LIVE_REFRESH_S = 1.5  # mirrored in javascript/ti_trainer.js


@dataclass
class TabUI:
    """Handles on what build_contents made, for wiring and for the tests."""

    form: dict[str, Any] = field(default_factory=dict)  # name -> component, in input order
    preview: dict[str, Any] = field(default_factory=dict)
    txt2img: list = field(default_factory=list)
    parts: dict[str, Any] = field(default_factory=dict)  # buttons and outputs by short name

    @property
    def names(self) -> list[str]:
        return list(self.form)


def build_train_tab(params: Any) -> TabUI:
    """on_ui_train_tabs: we are inside the host's gr.Tabs, so this Tab is a sibling of 'Train'."""
    _built["train_tab"] = True
    txt2img = list(getattr(params, "txt2img_preview_params", None) or [])
    with gr.Tab("TI Trainer", elem_id="ti_trainer_tab"):
        return build_contents(txt2img)


def build_fallback_tab() -> list:
    """on_ui_tabs: only for hosts where the train-tab callback never ran (it always runs first)."""
    if _built["train_tab"]:
        return []
    with gr.Blocks(analytics_enabled=False) as blocks:
        gr.HTML(
            '<div class="ti-trainer-notice"><h3>TI Trainer</h3>'
            "<p>This WebUI has no Train tab and no embedding database to train through (Forge). "
            "Training in the WebUI needs <b>AUTOMATIC1111 1.10</b> or <b>reForge</b>; Forge is not "
            "supported for training yet.</p>"
            "<p>What works here: embeddings trained by this extension elsewhere (the "
            "<code>.safetensors</code> files, SD1, SD2 and SDXL) load from the embeddings folder like any "
            "other, and the command line <code>python -m lib_ti train --config_file args.toml</code> "
            "trains on a diffusers model folder without the WebUI.</p></div>",
            elem_id="ti_trainer_fallback",
        )
    return [(blocks, "TI Trainer", "ti_trainer")]


def _row(*names: str, ui: TabUI, **overrides: Any) -> None:
    with gr.Row():
        for n in names:
            ui.form[n] = component(n, **overrides.get(n, {}))


def build_contents(txt2img: list) -> TabUI:
    ui = TabUI(txt2img=txt2img)
    p = ui.parts
    with gr.Column(elem_id="ti_trainer_form"):
        with gr.Accordion("Token", open=True, elem_id="ti_trainer_group_token"):
            _row("token_string", "init_word", "num_vectors_per_token", ui=ui)
            with gr.Row():
                ui.form["weights"] = gr.Dropdown(
                    choices=ui_handlers.embedding_choices(), value=NEW_EMBEDDING, allow_custom_value=True,
                    label="Resume from embedding", elem_id=elem_id("weights"),
                    info="continue training this file from its saved step; None starts fresh [weights]")
                p["refresh_embeddings"] = gr.Button("\U0001f504", elem_id="ti_trainer_refresh_embeddings",
                                                    elem_classes=["tool", "ti-trainer-tool"])
                ui.form["overwrite"] = component("overwrite")
            with gr.Accordion("More token options", open=False):
                _row("output_name", "init_word_spread", "save_model_as", ui=ui)

        with gr.Accordion("Data", open=True, elem_id="ti_trainer_group_data"):
            _row("train_data_dir", "caption_extension", ui=ui)
            with gr.Row():
                ui.form["prompt_source"] = prompt_source_component()
                ui.form["template_file"] = gr.Dropdown(
                    choices=list(TEMPLATE_NAMES), value="subject_filewords", allow_custom_value=True,
                    label="A1111 template", elem_id=elem_id("template_file"), visible=False,
                    info="used with 'A1111 template file': a built-in name or a template file path [template_file]")
            _row("shuffle_caption", "keep_tokens", "caption_separator", ui=ui)
            with gr.Accordion("More caption options (kohya)", open=False):
                _row("caption_prefix", "caption_suffix", "keep_tokens_separator", "secondary_separator", ui=ui)
                _row("caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", ui=ui)
                _row("enable_wildcard", "token_warmup_min", "token_warmup_step", ui=ui)
            _row("resolution", "flip_aug", "center_crop", ui=ui)
            with gr.Accordion("Buckets", open=False):
                _row("enable_bucket", "bucket_no_upscale", ui=ui)
                _row("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", ui=ui)
            with gr.Accordion("Regularization and dataset TOML", open=False):
                _row("reg_data_dir", "prior_loss_weight", ui=ui)
                _row("dataset_config", ui=ui)
            with gr.Accordion("Latent cache", open=False):
                _row("cache_latents", "cache_latents_to_disk", "random_crop", "vae_batch_size", ui=ui)
                _row("color_aug", "face_crop_aug_range", ui=ui)  # kohya's augmentations: need the cache off
            with gr.Accordion("Dataset preview", open=False, elem_id="ti_trainer_group_dataset_preview"):
                with gr.Row():
                    p["preview_count"] = gr.Number(value=8, precision=0, label="Images to preview",
                                                   elem_id="ti_trainer_preview_count")
                    p["preview_dataset"] = gr.Button("Preview dataset", elem_id="ti_trainer_preview_dataset")
                p["dataset_gallery"] = gr.Gallery(label="As the model sees them", columns=4,
                                                  elem_id="ti_trainer_dataset_gallery")
                p["dataset_info"] = gr.HTML(elem_id="ti_trainer_dataset_info")

        with gr.Accordion("Training", open=True, elem_id="ti_trainer_group_training"):
            _row("learning_rate", "max_train_steps", "max_train_epochs", ui=ui)
            _row("train_batch_size", "gradient_accumulation_steps", "scale_lr", ui=ui)
            _row("lr_scheduler", "lr_warmup_steps", "optimizer_type", ui=ui)
            _row("mixed_precision", "gradient_checkpointing", ui=ui)
            with gr.Accordion("Advanced", open=False, elem_id="ti_trainer_group_advanced"):
                _row("lr_scheduler_num_cycles", "lr_scheduler_power", "optimizer_args", ui=ui)
                _row("min_snr_gamma", "noise_offset", "max_grad_norm", ui=ui)
                _row("clip_skip", "seed", "v_parameterization", ui=ui)

        with gr.Accordion("Saving and previews", open=True, elem_id="ti_trainer_group_saving"):
            _row("save_every_n_steps", "sample_every_n_steps", ui=ui)
            ui.form["sample_prompts"] = component("sample_prompts", lines=2)
            p["use_txt2img"] = gr.Checkbox(
                value=False, label="Read preview parameters from txt2img tab", visible=bool(txt2img),
                elem_id="ti_trainer_use_txt2img",
                info="prompt, negative prompt, steps, sampler, CFG, seed and size as set in txt2img")
            with gr.Accordion("Preview settings", open=False, elem_id="ti_trainer_group_preview"):
                _preview_fields(ui)

        with gr.Accordion("Validation", open=True, elem_id="ti_trainer_group_validation"):
            _row("validation_every_n_steps", "validation_batch_size", "validation_seed", ui=ui)
            _row("auto_stop", "auto_stop_window", "auto_stop_threshold", ui=ui)

    _run_section(ui)
    _wire(ui)
    return ui


def _preview_fields(ui: TabUI) -> None:
    samplers = host.sampler_names()

    def kw(key: str) -> dict[str, Any]:
        return {"label": PREVIEW_LABELS[f"preview_{key}"], "elem_id": elem_id(f"preview_{key}")}

    with gr.Row():
        ui.preview["negative_prompt"] = gr.Textbox(**kw("negative_prompt"))
    with gr.Row():
        ui.preview["steps"] = gr.Number(value=20, precision=0, **kw("steps"))
        if samplers:
            ui.preview["sampler_name"] = gr.Dropdown(
                choices=samplers, value=OWN_PREVIEW["sampler_name"] if OWN_PREVIEW["sampler_name"] in samplers
                else samplers[0], **kw("sampler_name"))
        else:
            ui.preview["sampler_name"] = gr.Textbox(value=OWN_PREVIEW["sampler_name"], **kw("sampler_name"))
        ui.preview["cfg_scale"] = gr.Number(value=7.0, **kw("cfg_scale"))
    with gr.Row():
        ui.preview["seed"] = gr.Number(value=-1, precision=0, **kw("seed"))
        ui.preview["width"] = gr.Number(value=512, precision=0, **kw("width"))
        ui.preview["height"] = gr.Number(value=512, precision=0, **kw("height"))


def _run_section(ui: TabUI) -> None:
    p = ui.parts
    with gr.Column(elem_id="ti_trainer_run"):
        with gr.Row():
            p["train"] = gr.Button("Train", variant="primary", elem_id="ti_trainer_train")
            p["interrupt"] = gr.Button("Interrupt", elem_id="ti_trainer_interrupt")
        # Hidden by style.css, not visible=False: gradio 4 does not render invisible components,
        # and the JS must be able to write the task id and click the refresh button.
        p["task_id"] = gr.Textbox(value="", label="TI Trainer task id", elem_id="ti_trainer_task_id",
                                  elem_classes=["ti-trainer-hidden"])
        p["refresh"] = gr.Button("Refresh", elem_id="ti_trainer_refresh", elem_classes=["ti-trainer-hidden"])
        p["progress"] = gr.HTML(elem_id="ti_trainer_progress")
        p["notice"] = gr.HTML(elem_id="ti_trainer_notice")
        p["error"] = gr.HTML(elem_id="ti_trainer_error")
        p["status"] = gr.HTML(ui_handlers.status_html(None), elem_id="ti_trainer_status")
        with gr.Row():
            with gr.Column(scale=3):
                p["plot"] = gr.HTML(elem_id="ti_trainer_plot")
            with gr.Column(scale=2):
                p["norms"] = gr.HTML(elem_id="ti_trainer_norms")
                p["load_check"] = gr.HTML(elem_id="ti_trainer_load_check")
        p["gallery"] = gr.Gallery(label="Previews", columns=6, height=220, elem_id="ti_trainer_gallery")
        with gr.Row():
            p["checkpoints"] = gr.Dropdown(choices=[], label="Checkpoints of this run",
                                           elem_id="ti_trainer_checkpoints")
            p["publish_overwrite"] = gr.Checkbox(value=False, label="Replace a published file",
                                                 elem_id="ti_trainer_publish_overwrite")
            p["publish"] = gr.Button("Publish to embeddings", elem_id="ti_trainer_publish")
        p["publish_result"] = gr.HTML(elem_id="ti_trainer_publish_result")
        p["seen"] = gr.State({})


def _wire(ui: TabUI) -> None:
    from modules.call_queue import wrap_gradio_gpu_call

    p = ui.parts
    names, own_keys = ui.names, list(ui.preview)
    n_form, n_own = len(names), len(own_keys)

    locked = wrap_gradio_gpu_call(ui_handlers.train, extra_outputs=[gr.update()])

    def start(id_task: str, *args: Any) -> tuple[str, str]:
        form = dict(zip(names, args[:n_form]))
        use_txt2img = bool(args[n_form])
        own = dict(zip(own_keys, args[n_form + 1:n_form + 1 + n_own]))
        t2i = args[n_form + 1 + n_own:]
        from_txt2img = use_txt2img and len(t2i) == len(PREVIEW_KEYS)
        if from_txt2img:
            preview = dict(zip(PREVIEW_KEYS, t2i))
        else:  # no prompt: the run renders sample_prompts (or 'a photo of <token>')
            preview = {**OWN_PREVIEW, **own, "prompt": ""}
        return ui_handlers.start(id_task, form, preview, locked, own_preview=not from_txt2img)  # checks, then queue

    inputs = [p["task_id"], *ui.form.values(), p["use_txt2img"], *ui.preview.values(), *ui.txt2img]
    live = [p["status"], p["plot"], p["norms"], p["load_check"], p["gallery"], p["checkpoints"], p["seen"]]
    p["train"].click(
        fn=start,
        inputs=inputs, outputs=[p["status"], p["error"]], **_TRAIN_KW,
    ).then(fn=ui_handlers.refresh, inputs=[p["task_id"], p["seen"]], outputs=live)
    p["refresh"].click(fn=ui_handlers.refresh, inputs=[p["task_id"], p["seen"]], outputs=live, queue=False)
    p["interrupt"].click(fn=ui_handlers.interrupt, inputs=[p["task_id"]], outputs=[p["notice"]],
                         queue=False)
    p["publish"].click(fn=ui_handlers.publish, inputs=[p["checkpoints"], p["publish_overwrite"]],
                       outputs=[p["publish_result"]])
    p["refresh_embeddings"].click(fn=lambda: gr.update(choices=ui_handlers.embedding_choices()),
                                  inputs=[], outputs=[ui.form["weights"]], queue=False)
    ui.form["prompt_source"].change(fn=lambda s: gr.update(visible=s == TEMPLATE_FILE_SOURCE),
                                    inputs=[ui.form["prompt_source"]], outputs=[ui.form["template_file"]],
                                    queue=False)
    p["preview_dataset"].click(
        fn=lambda n, *args: ui_dataset.preview(dict(zip(names, args)), n),
        inputs=[p["preview_count"], *ui.form.values()], outputs=[p["dataset_gallery"], p["dataset_info"]],
    )
