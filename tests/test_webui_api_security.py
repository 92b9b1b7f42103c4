"""/ti-trainer/v1 as an attacker sees it, against the stand-in host (tests/fakehost) with a tiny SD1
model: the adversarial table of tests/api_cases.py (status, the field named, nothing written or
started, no secret or server path in the answer), the routes' presence rule (--api/--nowebui),
the host's CORS options, the body/queue/task limits and a fuzz test over every field's JSON value
asserting that no answer is a 500. The same table runs in a real host: tests/host/test_real_host_api_security.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import fake_host_modules
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import api_cases  # noqa: E402  (beside this file)
from api_cases import V1, Case, Ctx  # noqa: E402
from test_webui_api import _nonzero_final_norm, save_embedding  # noqa: E402  (helpers of the contract tests)

pytestmark = pytest.mark.slow
OWN = "http://testserver"  # TestClient's Host


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    with fake_host_modules() as fakehost:
        modules = fakehost.install(data_dir=str(tmp_path_factory.mktemp("webui")), family="sd1")
        _nonzero_final_norm(modules.shared.sd_model)
        modules.shared.cmd_opts.api = True
        try:
            yield modules
        finally:
            modules.shared.cmd_opts.api = False


def make_app(host, **flags):
    from fastapi import FastAPI

    from lib_ti.webui import entry

    saved = {k: getattr(host.shared.cmd_opts, k) for k in flags}
    vars(host.shared.cmd_opts).update(flags)
    try:
        app = FastAPI()
        entry.on_app_started(None, app)
        return app
    finally:
        vars(host.shared.cmd_opts).update(saved)


@pytest.fixture(scope="module")
def client(host):
    from fastapi.testclient import TestClient

    with TestClient(make_app(host)) as c:
        yield c


@pytest.fixture(scope="module")
def ctx(host, tmp_path_factory):
    from ui_harness import make_dataset

    from lib_ti.webui import host_model

    data = Path(host.paths_internal.data_path)
    c = Ctx(images=str(make_dataset(data / "datasets" / "sec", n=2)), inside=str(data / "scratch"),
            outside=str(tmp_path_factory.mktemp("outside")), emb_dir=host_model.embeddings_dir(), own_origin=OWN,
            allowed_origin="http://good.example")
    api_cases.prepare_files(c, width_ok=next(iter(host_model.borrow().slots().values())))
    return c


@pytest.fixture(autouse=True)
def flags(host):
    host.shared.cmd_opts.cors_allow_origins = "http://good.example"
    os.environ["TI_PWNED"] = str(Path(host.paths_internal.data_path) / "PWNED")
    yield
    host.shared.cmd_opts.cors_allow_origins = host.shared.cmd_opts.cors_allow_origins_regex = None


def send(client, req):
    r = client.request(req.method, req.path, content=req.body, headers=req.headers)
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, r.text


@pytest.mark.parametrize("case", api_cases.CASES, ids=lambda c: c.id)
def test_adversarial(client, ctx, host, case: Case):
    from lib_ti.webui.tasks import REGISTRY

    tasks = [t.id for t in REGISTRY.all()]
    before = api_cases.snapshot(ctx, host.paths_internal.data_path)
    status, body = send(client, case.make(ctx))
    api_cases.check_answer(case, status, body, server_paths=(ctx.emb_dir, host.paths_internal.data_path))
    assert [t.id for t in REGISTRY.all()] == tasks, case.id  # nothing started
    assert api_cases.snapshot(ctx, host.paths_internal.data_path) == before, case.id  # nothing written
    assert not before[1], "an unsafe pickle ran"


def test_outside_paths_are_no_existence_oracle(client, ctx):
    for key, existing, missing in api_cases.ORACLE_PAIRS:
        answers = []
        for path in (existing(ctx), missing(ctx)):
            body = api_cases.base(ctx, **{key: path, "use_object_template": key != "template_file"})
            r = client.post(f"{V1}/train", json=body)
            assert r.status_code == 422, r.text
            answers.append({tuple(d["loc"]): d["msg"] for d in r.json()["detail"]})
        assert answers[0] == answers[1], (key, answers)
        assert api_cases.OUTSIDE in answers[0][("body", key)]


def test_the_readable_folders_setting_widens_them(client, ctx, host):
    from lib_ti.webui import entry, settings

    body = api_cases.base(ctx, train_data_dir=ctx.outside, max_train_steps=-1)
    r = client.post(f"{V1}/train", json=body)
    assert ("body", "train_data_dir") in {tuple(d["loc"]) for d in r.json()["detail"]}
    entry.on_ui_settings()  # the option exists once the host built its settings
    assert host.shared.opts.data_labels[settings.API_READ_KEY].restrict_api  # /sdapi/v1/options cannot widen it
    host.shared.opts.set(settings.API_READ_KEY, f"{ctx.outside}\n{Path(ctx.images).parent}")
    try:
        r = client.post(f"{V1}/train", json=body)  # now only the steps are wrong (and the empty folder)
        locs = {tuple(d["loc"]) for d in r.json()["detail"]}
        assert ("body", "max_train_steps") in locs and ("body", "train_data_dir") not in locs, r.text
    finally:
        host.shared.opts.set(settings.API_READ_KEY, "")


# ---------------------------------------------------------------- when the routes exist, who may call


def test_routes_exist_only_with_api_or_nowebui(host):
    from fastapi.testclient import TestClient

    for flags, present in (({"api": False, "nowebui": False}, False), ({"api": True}, True),
                           ({"api": False, "nowebui": True}, True)):
        with TestClient(make_app(host, **flags)) as c:
            got = c.get(f"{V1}/tasks")
            assert (got.status_code == 200) is present, (flags, got.status_code)
            if not present:  # answered as the host answers its own absent /sdapi/v1 routes
                absent = c.get("/sdapi/v1/options")
                assert (got.status_code, got.json()) == (absent.status_code, absent.json()) == (404, {"detail": "Not Found"})
                assert c.post(f"{V1}/train", json={}).status_code == 404


def test_cors_options_as_the_host_matches_them(client, ctx, host):
    body = api_cases.base(ctx, max_train_steps=-1)  # reaching the checks means: allowed
    host.shared.cmd_opts.cors_allow_origins = None
    host.shared.cmd_opts.cors_allow_origins_regex = r"https://.*\.good\.example"
    for origin, code in (("https://a.good.example", 422), ("https://a.good.example.evil.com", 403),
                         ("http://a.good.example", 403), ("http://good.example", 403), (OWN, 422),
                         ("http://testserver:80", 422), ("https://testserver", 422), ("http://testserver:81", 403)):
        r = client.post(f"{V1}/train", json=body, headers={"Origin": origin})
        assert r.status_code == code, (origin, r.text)
    host.shared.cmd_opts.cors_allow_origins_regex = None
    host.shared.cmd_opts.cors_allow_origins = "http://x.example,*"
    assert client.post(f"{V1}/train", json=body, headers={"Origin": "http://any.example"}).status_code == 422


def test_chunked_body_over_the_limit_is_413(client):
    def chunks():
        yield b'{"sample_prompts": "'
        for _ in range(40):
            yield b"x" * 32768
        yield b'"}'

    r = client.post(f"{V1}/train", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_queue_limit_is_429(client, ctx):
    from lib_ti.webui.tasks import REGISTRY

    waiting = [REGISTRY.create(f"held{i}") for i in range(16)]  # as if 16 runs were queued
    try:
        r = client.post(f"{V1}/train", json=api_cases.base(ctx))
        assert r.status_code == 429 and "16" in r.json()["detail"], r.text
    finally:
        for t in waiting:
            REGISTRY.update(t.id, status="interrupted")


def test_finished_tasks_kept_are_bounded():
    from lib_ti.webui.tasks import TaskRegistry

    reg = TaskRegistry()
    first = [reg.create(f"t{i}") for i in range(130)]
    for t in first[:120]:
        reg.update(t.id, status="done")
    reg.create("last")
    ids = {t.id for t in reg.all()}
    assert len(ids) == 100 and all(t.id in ids for t in first[120:])  # queued/running ones are never dropped
    assert first[0].id not in ids  # oldest finished first


def test_inspect_summarises_norms_and_shows_relative_paths(client, ctx):
    from lib_ti.webui import host_model

    save_embedding(Path(ctx.emb_dir) / "summ-ti.safetensors", step=3)
    r = client.get(f"{V1}/inspect/summ-ti")
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["path"] == "summ-ti.safetensors" and info["files"] == ["summ-ti.safetensors"]
    assert info["norms"]["count"] == 2 and 0 < info["norms"]["min"] <= info["norms"]["mean"] <= info["norms"]["max"]
    assert host_model.embeddings_dir() not in r.text


# ---------------------------------------------------------------- fuzz: never a 500

JSON_SCALARS = (st.none() | st.booleans() | st.integers() | st.sampled_from([2**63, -(2**63) - 1, 10**400, 2**32])
                | st.floats(allow_nan=True, allow_infinity=True)
                | st.text(max_size=20) | st.sampled_from(["1e999", "-1", "/etc", "../x", "64,64", "NUL", "0.5:10, 1"]))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda kids: st.lists(kids, max_size=3)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=3), max_leaves=6)


def fields() -> list[str]:
    from lib_ti.config import TrainConfig

    return [*TrainConfig.field_names(), "preview", *(f"preview.{k}" for k in ("steps", "cfg_scale", "seed",
                                                                                 "width", "prompt"))]


_seen = {"n": 0}


@settings(max_examples=int(os.environ.get("TI_FUZZ_EXAMPLES", "250")), deadline=None, suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(sorted(set(fields()))), value=JSON_VALUES)
def test_fuzz_every_field_never_500(client, ctx, key, value):
    _seen["n"] += 1
    body = api_cases.base(ctx, token_string=f"xqzfz{_seen['n']}-ti")
    if key.startswith("preview."):
        body["preview"] = {key.split(".", 1)[1]: value}
    else:
        body[key] = value
    raw = json.dumps(body)  # NaN/Infinity included: Python's parser (FastAPI's too) accepts them
    r = client.post(f"{V1}/train", content=raw.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code in (202, 413, 422, 429), (key, value, r.status_code, r.text[:500])
    if r.status_code == 202:  # a valid run: stop it before it starts
        client.post(f"{V1}/tasks/{r.json()['task_id']}/interrupt")


def typed_value(name: str) -> st.SearchStrategy:
    """Values of the field's own type around its range: many of them valid, so runs do start."""
    import dataclasses

    from lib_ti.config import TrainConfig

    f = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    d = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    lo, hi, choices = f.metadata.get("lo"), f.metadata.get("hi"), f.metadata.get("choices")
    if choices:
        return st.sampled_from([*choices, "bogus"])
    if isinstance(d, bool):
        return st.booleans()
    if isinstance(d, int):  # small: a valid run must stay quick
        low = int(lo) - 1 if lo is not None else -2
        return st.integers(low, min(int(hi) + 1 if hi is not None else low + 18, low + 18))
    if isinstance(d, float):
        return st.floats(lo - 1 if lo is not None else -2, hi + 1 if hi is not None else 50, allow_nan=False)
    if isinstance(d, list):
        return st.lists(st.sampled_from(["weight_decay=0.1", "eps=1e-8", "betas=(0.8,0.9)", "betas=5", "foo=1",
                                         "amsgrad=True", "momentum=0.5"]), max_size=2)
    if name == "learning_rate":
        return st.sampled_from(["0.05", "0.01:1, 0.001", "1e-3", "-1", "0", "0.01:2, 0.01:1"])
    if name == "resolution":
        return st.sampled_from(["64", "64,128", "128x64", "72", "63", "64,64,64"])
    return st.text(max_size=4)


TYPED = ["init_word", "init_word_spread", "num_vectors_per_token", "clip_skip", "optimizer_type", "optimizer_args",
         "learning_rate", "lr_scheduler", "lr_warmup_steps", "lr_scheduler_num_cycles", "resolution",
         "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "flip_aug", "random_crop",
         "cache_latents", "shuffle_caption", "keep_tokens", "caption_extension", "mixed_precision",
         "gradient_accumulation_steps", "train_batch_size", "max_grad_norm", "min_snr_gamma", "noise_offset",
         "prior_loss_weight", "validation_every_n_steps", "validation_batch_size", "auto_stop", "seed",
         "use_style_template", "save_every_n_steps"]


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), keys=st.lists(st.sampled_from(TYPED), min_size=1, max_size=3, unique=True))
def test_fuzz_a_202_never_fails_later(client, ctx, data, keys):
    """What passes the submit checks trains to the end: every failure knowable at submit is a 422."""
    import time

    _seen["n"] += 1
    body = api_cases.base(ctx, token_string=f"xqzfd{_seen['n']}-ti")
    body.update({k: data.draw(typed_value(k), label=k) for k in keys})
    r = client.post(f"{V1}/train", content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    assert r.status_code in (202, 422), r.text
    if r.status_code == 202:
        end = time.time() + 120
        while (info := client.get(f"{V1}/tasks/{r.json()['task_id']}").json())["status"] in ("queued", "running"):
            assert time.time() < end
            time.sleep(0.05)
        assert info["status"] == "done", ({k: body[k] for k in keys}, info)


def test_clip_skip_beyond_the_text_encoder_is_422(client, ctx, host):
    layers = host.shared.sd_model.cond_stage_model.wrapped.transformer.config.num_hidden_layers
    r = client.post(f"{V1}/train", json=api_cases.base(ctx, clip_skip=layers + 1))
    assert r.status_code == 422 and "layers" in {d["loc"][1]: d["msg"] for d in r.json()["detail"]}["clip_skip"]

def test_fuzz_runs_have_ended(client):
    """The fuzz's valid runs were stopped; wait for them so nothing runs past this module."""
    import time

    from lib_ti.webui.tasks import REGISTRY

    end = time.time() + 120
    while any(t.status in ("queued", "running") for t in REGISTRY.all()):
        assert time.time() < end, [t.public() for t in REGISTRY.all() if t.status in ("queued", "running")]
        time.sleep(0.1)


def test_a_one_line_prompt_is_never_read_as_a_file_outside(host, ctx):
    """job.py reads a one-line sample_prompts that names a file; outside the readable folders a
    plain prompt becomes the preview prompt instead, and a path is refused (same answer either way)."""
    from lib_ti.webui import api_paths

    for text, moved in (("a photo of xqz", True), ("  a photo of xqz \n\n", True), ("a photo --w 512", False),
                        ("/etc/hostname", False), ("prompts.txt", False), ("one\ntwo", False)):
        values = {"sample_prompts": text}
        assert (api_paths.inline_prompt(values) is not None) is moved, text
        assert ("sample_prompts" not in values) is moved
    for text, refused in (("/etc/hostname", True), (os.path.join(ctx.outside, "x.txt"), True),
                          (os.path.join(ctx.inside, "p.txt"), False), ("one\n/etc/hostname", False),
                          ("a photo --w 512", False)):
        _, errors = api_paths.check_paths({"sample_prompts": text})
        assert (("sample_prompts",) in errors) is refused, (text, errors)
