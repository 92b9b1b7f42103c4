// TI Trainer tab (lib_ti/webui/tab.py): the Train button's progress wiring and the live view.
// Classic script sharing one global scope with the host and every extension, so everything
// here is either `ti_trainer_*` (called by name from Python `_js=`) or inside `tiTrainer`.

var tiTrainer = {
    taskId: "",
    active: false,
    sawActive: false,
    timer: null,
    refreshMs: 1500, // mirrored by LIVE_REFRESH_S in tab.py
    // config fields that the form shows as one control
    fieldAlias: {use_object_template: "prompt_source", use_style_template: "prompt_source"},

    el: function(id) {
        return gradioApp().getElementById(id);
    },

    setTaskId: function(id) {
        // a hidden gradio Textbox: the refresh and interrupt handlers read the id from it
        var box = gradioApp().querySelector("#ti_trainer_task_id textarea, #ti_trainer_task_id input");
        if (!box) {
            return;
        }
        box.value = id;
        box.dispatchEvent(new Event("input", {bubbles: true}));
    },

    clickRefresh: function() {
        var el = tiTrainer.el("ti_trainer_refresh");
        var btn = el && (el.tagName === "BUTTON" ? el : el.querySelector("button"));
        if (btn) {
            btn.click();
        }
    },

    runningOnServer: function() {
        var st = gradioApp().querySelector("#ti_trainer_status [data-status]");
        var s = st ? st.getAttribute("data-status") : "";
        return s === "running" || s === "queued";
    },

    // Poll while our run is active, or while the server says a run is going (after a page reload).
    startPolling: function() {
        if (tiTrainer.timer) {
            return;
        }
        tiTrainer.timer = setInterval(function() {
            if (!tiTrainer.active && !tiTrainer.runningOnServer()) {
                tiTrainer.stopPolling();
                return;
            }
            tiTrainer.clickRefresh();
        }, tiTrainer.refreshMs);
    },

    stopPolling: function() {
        if (tiTrainer.timer) {
            clearInterval(tiTrainer.timer);
            tiTrainer.timer = null;
        }
    },

    clearMarks: function() {
        gradioApp().querySelectorAll(".ti-trainer-bad").forEach(function(e) {
            e.classList.remove("ti-trainer-bad");
        });
    },

    // The error HTML lists each bad option as <li data-field="...">: outline those inputs too.
    markFields: function() {
        tiTrainer.clearMarks();
        gradioApp().querySelectorAll("#ti_trainer_error li[data-field]").forEach(function(li) {
            var f = li.getAttribute("data-field");
            var target = tiTrainer.el("ti_trainer_" + (tiTrainer.fieldAlias[f] || f));
            if (target) {
                target.classList.add("ti-trainer-bad");
            }
        });
    },

    // The last run's error stays in the DOM until gradio replaces it; hide it meanwhile. (Never
    // clear a gradio component's innerHTML: that removes the node gradio renders into.)
    hideOldError: function(hide) {
        var err = tiTrainer.el("ti_trainer_error");
        if (err) {
            err.classList.toggle("ti-trainer-stale", hide);
        }
    },

    // The notice (e.g. "Stopping ...") belongs to one run: hidden when the next starts, shown
    // again only when it gets new content.
    watchNotice: function() {
        var box = tiTrainer.el("ti_trainer_notice");
        if (!box) {
            return;
        }
        box.classList.add("ti-trainer-stale");
        if (!box.dataset.tiWatched) {
            box.dataset.tiWatched = "1";
            new MutationObserver(function() {
                box.classList.remove("ti-trainer-stale");
            }).observe(box, {childList: true, subtree: true, characterData: true});
        }
    },

    watchErrors: function() {
        var err = tiTrainer.el("ti_trainer_error");
        if (!err || err.dataset.tiWatched) {
            return;
        }
        err.dataset.tiWatched = "1";
        new MutationObserver(function() {
            tiTrainer.hideOldError(false);
            tiTrainer.markFields();
        }).observe(err, {childList: true, subtree: true, characterData: true});
    },

    showProgress: function(res) {
        if (tiTrainer.sawActive && !res.active) {
            return; // the run ended: keep its last line rather than "Waiting..."
        }
        tiTrainer.sawActive = tiTrainer.sawActive || !!res.active;
        var box = gradioApp().querySelector("#ti_trainer_progress .ti-trainer-progress-text");
        if (!box) {
            var host = tiTrainer.el("ti_trainer_progress");
            if (!host) {
                return;
            }
            box = document.createElement("div");
            box.className = "ti-trainer-progress-text";
            host.appendChild(box);
        }
        box.textContent = res.textinfo || "";
    },

    atEnd: function() {
        tiTrainer.active = false;
        tiTrainer.hideOldError(false);
        tiTrainer.markFields();
        tiTrainer.showProgress({textinfo: "", active: true}); // the status line below has the outcome
        tiTrainer.stopPolling();
        tiTrainer.clickRefresh();
        // if the progress poll gave up early (a long preparation), keep following the server
        setTimeout(function() {
            if (tiTrainer.runningOnServer()) {
                tiTrainer.startPolling();
            }
        }, 2 * tiTrainer.refreshMs);
    },
};

// `_js` of the Train button: returns the inputs with a fresh task id first, as the host's own
// submit functions do; wrap_gradio_gpu_call reads it to report through /internal/progress.
function ti_trainer_start() {
    var args = Array.prototype.slice.call(arguments);
    var id = randomId();
    tiTrainer.taskId = id;
    tiTrainer.active = true;
    tiTrainer.sawActive = false;
    tiTrainer.setTaskId(id);
    tiTrainer.clearMarks();
    tiTrainer.watchErrors();
    tiTrainer.hideOldError(true);
    tiTrainer.watchNotice();
    tiTrainer.showProgress({textinfo: "Waiting..."});
    requestProgress(id, tiTrainer.el("ti_trainer_progress"), tiTrainer.el("ti_trainer_gallery"),
        tiTrainer.atEnd, tiTrainer.showProgress);
    tiTrainer.startPolling();
    args[0] = id;
    return args;
}

// After a page reload mid-run: show the newest run once and keep polling while it runs.
if (typeof onUiLoaded === "function") {
    onUiLoaded(function() {
        if (!tiTrainer.el("ti_trainer_refresh")) {
            return; // fallback tab (Forge): nothing to refresh
        }
        tiTrainer.watchErrors();
        tiTrainer.clickRefresh();
        setTimeout(function() {
            if (tiTrainer.runningOnServer()) {
                tiTrainer.startPolling();
            }
        }, 2 * tiTrainer.refreshMs);
    });
}
