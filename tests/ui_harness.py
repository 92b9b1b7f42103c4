"""A standalone server for the browser tests: the TI Trainer tab, built by the extension's own
on_ui_train_tabs callback inside a Train-like gr.Tabs, on gradio 3.41 and the stand-in host
(tests/fakehost) with a tiny random SD1 model. Nothing is downloaded; it binds 127.0.0.1 only.

    python tests/ui_harness.py --port 7861 --workdir /tmp/ti-harness

What the real host adds to its page and this harness must stand in for (host-api.md §1.6, §3.3):
`gradioApp()`, `randomId()`, `requestProgress(...)` and `onUiLoaded()` in the browser, and the
`/internal/progress` route. These are written here from that description, not copied.
Prints "READY <url>" on stdout once the server answers.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "mytok123"

STANDIN_JS = r"""
// --- stand-ins for the host's script.js / progressbar.js (see tests/ui_harness.py) ---
function gradioApp() {
    var app = document.querySelector("gradio-app");
    return app && app.shadowRoot ? app.shadowRoot : document;
}
function randomId() {
    var chars = "abcdefghijklmnopqrstuvwxyz0123456789", s = "";
    for (var i = 0; i < 15; i++) { s += chars[Math.floor(Math.random() * chars.length)]; }
    return "task(" + s + ")";
}
var harnessUiLoaded = [];
function onUiLoaded(cb) { harnessUiLoaded.push(cb); }
(function waitForUi() {
    if (document.getElementById("ti_trainer_tab")) { harnessUiLoaded.forEach(function(cb) { cb(); }); return; }
    setTimeout(waitForUi, 100);
})();
// Polls ./internal/progress like the host: a bar before `container`, onProgress(res) each poll,
// atEnd() when the task completed, stopped being active, or was never seen for `timeout` s.
function requestProgress(id, container, gallery, atEnd, onProgress, timeout) {
    timeout = timeout || 40;
    var div = document.createElement("div");
    div.className = "progressDiv";
    var bar = document.createElement("div");
    bar.className = "progress";
    div.appendChild(bar);
    container.parentNode.insertBefore(div, container);
    var started = Date.now(), wasActive = false;
    function finish() { div.remove(); if (atEnd) { atEnd(); } }
    function poll() {
        fetch("./internal/progress", {method: "POST", headers: {"Content-Type": "application/json"},
            body: JSON.stringify({id_task: id, id_live_preview: -1, live_preview: false})})
            .then(function(r) { return r.json(); })
            .then(function(res) {
                if (onProgress) { onProgress(res); }
                if (res.completed || (wasActive && !res.active)) { finish(); return; }
                if (res.active || res.queued) { wasActive = wasActive || res.active; started = Date.now(); }
                else if (Date.now() - started > timeout * 1000) { finish(); return; }
                bar.style.width = Math.round((res.progress || 0) * 100) + "%";
                bar.textContent = (res.textinfo || "").indexOf("\n") < 0 ? res.textinfo || "" : "";
                setTimeout(poll, 500);
            })
            .catch(function() { setTimeout(poll, 1000); });
    }
    poll();
}
"""

STANDIN_CSS = """
.progressDiv { background: #eee; border-radius: 4px; margin: 4px 0; height: 1.6em; overflow: hidden; }
.progressDiv .progress { background: #f97316; color: #fff; height: 100%; white-space: nowrap; padding: 0 6px;
                         font-size: 0.85em; line-height: 1.6em; min-width: 2em; }
"""


def make_dataset(folder: Path, n: int = 4, size: int = 64) -> Path:
    """A red disc on a blue ground with captions naming the token (the e2e tests' concept)."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = Image.new("RGB", (size, size), (20, 40, 200))
        x, y = rng.integers(8, size // 2, 2)
        ImageDraw.Draw(img).ellipse([x, y, x + size // 3, y + size // 3], fill=(220, 30, 30))
        img.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of {TOKEN}, red disc")
    return folder


def install_host(workdir: Path) -> Any:
    """The stand-in host with a tiny SD1 model loaded; returns its `modules` package."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fakehost import install

    return install(data_dir=str(workdir), family="sd1")


def inject_assets() -> None:
    """What the host does in ui_gradio_extensions: our JS and CSS on every page gradio serves."""
    import gradio.routes

    scripts = STANDIN_JS + (ROOT / "javascript" / "ti_trainer.js").read_text(encoding="utf-8")
    styles = STANDIN_CSS + (ROOT / "style.css").read_text(encoding="utf-8")
    head = f"<script>{scripts}</script><style>{styles}</style>".encode()
    original = gradio.routes.templates.TemplateResponse

    def template_response(*args: Any, **kwargs: Any) -> Any:
        res = original(*args, **kwargs)
        # gradio's page also loads iframeResizer from a CDN; offline that is only a failed request
        body = re.sub(rb'<script[^>]*src="https?://[^"]*"[^>]*>\s*</script>', b"", res.body)
        res.body = body.replace(b"</head>", head + b"</head>")
        res.init_headers()
        return res

    gradio.routes.templates.TemplateResponse = template_response


def add_progress_route(app: Any) -> None:
    """/internal/progress from host-api.md §3.3, over the stand-in host's progress and state."""
    from fastapi import Body

    def progress(req: dict = Body(...)) -> dict:  # noqa: B008 (FastAPI's way to take a JSON body)
        from modules import progress as prog
        from modules import shared

        task = req.get("id_task")
        active = task is not None and task == getattr(prog, "current_task", None)
        queued = task in getattr(prog, "pending_tasks", {})
        completed = task in getattr(prog, "finished_tasks", [])
        st = shared.state
        if not active:
            text = "In queue..." if queued else "Waiting..."
            return dict(active=False, queued=queued, completed=completed, progress=None, eta=None,
                        live_preview=None, id_live_preview=-1, textinfo=text)
        frac = st.job_no / st.job_count if getattr(st, "job_count", 0) > 0 else 0.0
        elapsed = time.time() - getattr(st, "time_start", time.time())
        eta = elapsed / frac - elapsed if frac > 0 else None
        return dict(active=True, queued=False, completed=False, progress=min(frac, 1.0), eta=eta,
                    live_preview=None, id_live_preview=-1, textinfo=st.textinfo or "")

    app.add_api_route("/internal/progress", progress, methods=["POST"])


class Params:
    """UiTrainTabParams: the host hands the txt2img components to the train-tab callbacks."""

    def __init__(self, txt2img_preview_params: list):
        self.txt2img_preview_params = txt2img_preview_params


def build_demo() -> Any:
    import gradio as gr

    from lib_ti.webui import entry

    # system fonts: the default theme would ask Google Fonts, and the harness never goes online
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    with gr.Blocks(title="TI Trainer harness", analytics_enabled=False, theme=theme) as demo, \
            gr.Tabs(selected="train"):
        with gr.Tab("txt2img", id="txt2img"):
            t2i = [gr.Textbox(value=f"a photo of {TOKEN}", label="Prompt"),
                   gr.Textbox(label="Negative prompt"), gr.Slider(1, 150, 20, step=1, label="Steps"),
                   gr.Dropdown(["Euler a", "Euler"], value="Euler a", label="Sampler"),
                   gr.Slider(1, 30, 7, label="CFG"), gr.Number(-1, label="Seed"),
                   gr.Slider(64, 2048, 64, step=8, label="Width"),
                   gr.Slider(64, 2048, 64, step=8, label="Height")]
        with gr.Tab("Train", id="train"), gr.Tabs(elem_id="train_tabs"):
            entry.on_ui_train_tabs(Params(t2i))  # ours first, so the page opens on it
            with gr.Tab("Create embedding"):
                gr.HTML("<p>(the host's own train tabs would be here)</p>")
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    make_dataset(args.workdir / "data")
    install_host(args.workdir)
    inject_assets()
    demo = build_demo()
    demo.queue(concurrency_count=8)  # A1111 uses 64; refresh must run while Train holds a worker
    demo.launch(server_name="127.0.0.1", server_port=args.port, prevent_thread_lock=True, show_api=False,
                quiet=True)
    add_progress_route(demo.server_app)
    print(f"READY http://127.0.0.1:{args.port}/", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        demo.close()


if __name__ == "__main__":
    main()
