"""The adversarial table for /ti-trainer/v1, shared by the stand-in host suite
(tests/test_webui_api_security.py) and the real-host one (tests/host/test_real_host_api_security.py).

Each case is one request as a hostile page, a careless script or a curious LAN user would send it,
with the status it must get, the field its 422 must name, and text the answer must never contain.
The runner in each suite also checks that nothing was written and no task was started.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

V1 = "/ti-trainer/v1"
SECRET = "hunter2-password"
TOKEN = "xqzsec-ti"  # several BPE tokens in any CLIP vocabulary: a valid new token


@dataclass
class Ctx:
    images: str  # a usable dataset inside the folders the API may read
    inside: str  # a scratch folder inside them
    outside: str  # a scratch folder outside them
    emb_dir: str
    own_origin: str  # the server's own origin, as a browser on its page would send it
    allowed_origin: str | None = None  # one the host's --cors-allow-origins lists (None: not set)


@dataclass
class Req:
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Case:
    id: str
    make: Callable[[Ctx], Req]
    status: int | tuple[int, ...]
    loc: tuple[str, ...] | None = None  # a 422 names this field
    says: str = ""  # in the message of that field (or in the answer)
    never: tuple[str, ...] = (SECRET,)  # never anywhere in the answer
    needs: str = ""  # "allowed_origin": only where the host was started with one


def base(ctx: Ctx, **kw: Any) -> dict[str, Any]:
    """A body that would start a run; every case breaks one thing."""
    body = dict(token_string=TOKEN, init_word="ball", num_vectors_per_token=2, train_data_dir=ctx.images,
                resolution="64", max_train_steps=2, learning_rate="0.05", validation_every_n_steps=0,
                seed=3, use_object_template=True)
    body.update(kw)
    return body


def train(**kw: Any) -> Callable[[Ctx], Req]:
    """POST /train with the base body changed by kw (callables get the context)."""
    def make(ctx: Ctx) -> Req:
        body = base(ctx, **{k: v(ctx) if callable(v) else v for k, v in kw.items()})
        return Req("POST", f"{V1}/train", json.dumps(body).encode(), {"Content-Type": "application/json"})
    return make


def raw(text: str | Callable[[Ctx], str], ctype: str | None = "application/json",
        **headers: str) -> Callable[[Ctx], Req]:
    """POST /train with this exact body text and content type (None: no Content-Type header)."""
    def make(ctx: Ctx) -> Req:
        h = {"Content-Type": ctype} if ctype else {}
        h.update({k.replace("_", "-"): v(ctx) if callable(v) else v for k, v in headers.items()})
        body = text(ctx) if callable(text) else text
        return Req("POST", f"{V1}/train", body.encode("utf-8", "surrogatepass"), h)
    return make


def valid_json(ctx: Ctx) -> str:
    return json.dumps(base(ctx))


def with_origin(origin: Callable[[Ctx], str], **kw: Any) -> Callable[[Ctx], Req]:
    def make(ctx: Ctx) -> Req:
        req = train(**kw)(ctx)
        req.headers["Origin"] = origin(ctx)
        return req
    return make


def get(path: str, **headers: str) -> Callable[[Ctx], Req]:
    return lambda ctx: Req("GET", V1 + path, None, dict(headers))


def p(*parts: str, where: str = "inside") -> Callable[[Ctx], str]:
    return lambda ctx: os.path.join(getattr(ctx, where), *parts)


OUTSIDE = "may read"
NAMES = ["a\nb", "tab\there", "\x07bell", ".hidden", "CON", "nul.txt", "COM1", "lpt9", "name.", "name ", "a" * 201,
         "é" * 101, "a<b", "a|b", "a?b", "a*b", 'a"b', "a:b", "a/b", "a\\b", ".."]

CASES: list[Case] = [
    # ---- cross-site: only JSON bodies, only our own or allowed origins
    Case("no-content-type", raw(valid_json, None), 415),
    Case("text-plain", raw(valid_json, "text/plain"), 415),
    Case("form-urlencoded", raw("token_string=x", "application/x-www-form-urlencoded"), 415),
    Case("multipart", raw("--x--", "multipart/form-data; boundary=x"), 415),
    Case("foreign-origin-post", with_origin(lambda c: "http://evil.example"), 403, says="cors-allow-origins"),
    Case("null-origin-post", with_origin(lambda c: "null"), 403),
    Case("foreign-origin-get", lambda c: Req("GET", f"{V1}/tasks", None, {"Origin": "http://evil.example"}), 403),
    Case("lookalike-origin", with_origin(lambda c: c.own_origin + ".evil.example"), 403),
    Case("own-origin-reaches-checks", with_origin(lambda c: c.own_origin, max_train_steps=-1), 422,
         ("max_train_steps",)),
    Case("allowed-origin-reaches-checks", with_origin(lambda c: c.allowed_origin, max_train_steps=-1), 422,
         ("max_train_steps",), needs="allowed_origin"),
    # ---- the body itself
    Case("not-json", raw("{nope"), 422),
    Case("json-array", raw("[1, 2]"), 422),
    Case("int-5000-digits-body", raw("{\"max_train_steps\": " + "9" * 5000 + "}"), 422),
    Case("too-large", raw(lambda c: json.dumps(base(c, sample_prompts="x" * (2**20 + 10)))), 413),
    Case("lone-surrogate", raw(lambda c: valid_json(c).replace(TOKEN, "\\ud800")), 422, ("token_string",)),
    # ---- numbers of any size: 422, never 500
    Case("resolution-1e999", train(resolution="1e999"), 422, ("resolution",)),
    Case("resolution-null-list", train(resolution=[None]), 422, ("resolution",)),
    Case("resolution-object", train(resolution={"a": 1}), 422, ("resolution",)),
    Case("steps-400-zeros", raw(lambda c: valid_json(c).replace('"max_train_steps": 2',
                                                                 '"max_train_steps": 1' + "0" * 400)),
         422, ("max_train_steps",)),
    Case("steps-string-1e999", train(max_train_steps="1e999"), 422, ("max_train_steps",)),
    Case("steps-bool", train(max_train_steps=True), 422, ("max_train_steps",)),
    Case("lr-inf", raw(lambda c: valid_json(c).replace('"learning_rate": "0.05"', '"learning_rate": 1e999')),
         422, ("learning_rate",)),
    Case("vectors-1e308", train(num_vectors_per_token=1e308), 422, ("num_vectors_per_token",)),
    Case("batch-list", train(train_batch_size=[]), 422, ("train_batch_size",)),
    Case("seed-2^63", train(seed=2**63), 422, ("seed",)),
    Case("seed-2^32", train(seed=2**32), 422, ("seed",)),
    Case("seed-minus-2", train(seed=-2), 422, ("seed",)),
    Case("validation-seed-2^40", train(validation_seed=2**40), 422, ("validation_seed",)),
    Case("preview-steps-huge", train(preview={"steps": 10**30}), 422, ("preview", "steps")),
    Case("preview-cfg-inf", raw(lambda c: valid_json(c)[:-1] + ', "preview": {"cfg_scale": 1e999}}'), 422,
         ("preview", "cfg_scale")),
    Case("preview-width-text", train(preview={"width": "wide"}), 422, ("preview", "width")),
    Case("preview-not-object", train(preview=[1]), 422, ("preview",)),
    Case("sample-prompt-options-huge", train(sample_every_n_steps=1,
                                             sample_prompts="a photo --w 99999 --s 100000000\nok"),
         422, ("sample_prompts",), says="line 1"),
    Case("sample-prompt-file-options", train(sample_every_n_steps=1, sample_prompts=p("prompts.txt")), 422,
         ("sample_prompts",), says="line 2", never=(SECRET, "77777")),
    # ---- names: a valid file name on Linux, macOS and Windows
    Case("token-300-chars", train(token_string="ab" * 150), 422, ("token_string",), says="bytes"),
    *[Case(f"output-name-{i}", train(output_name=name), 422, ("output_name",)) for i, name in enumerate(NAMES)],
    Case("caption-extension-path", train(caption_extension="/../../x"), 422, ("caption_extension",)),
    # ---- what the run would find only after it started
    Case("init-word-multi-token", train(init_word="a castle on a hill"), 422, ("init_word",)),
    Case("optimizer-args-unknown", train(optimizer_args=["nonsense=1"]), 422, ("optimizer_args",)),
    Case("optimizer-args-bad-type", train(optimizer_args=["betas=5"]), 422, ("optimizer_args",)),
    Case("optimizer-args-object", train(optimizer_args={"lr": 1}), 422, ("optimizer_args",)),
    Case("weights-unsafe-pickle", train(weights="evil-ti.pt"), 422, ("weights",)),
    Case("weights-wrong-width", train(weights="narrow-ti.safetensors"), 422, ("weights",)),
    Case("weights-zip-bomb", train(weights="bomb-ti.pt"), 422, ("weights",), says="MB"),
    Case("weights-outside", train(weights="/etc/passwd"), 422, ("weights",)),
    Case("weights-traversal", train(weights="../x.safetensors"), 422, ("weights",)),
    # InvokeAI's names are translated inside TrainConfig, past the path rules: refused in the API
    Case("invokeai-resume-outside", train(resume_from_checkpoint="/etc/passwd"), 422, ("resume_from_checkpoint",),
         says="InvokeAI"),
    Case("invokeai-model", train(model="/etc"), 422, ("model",), says="pretrained_model_name_or_path"),
    Case("invokeai-only-name", train(dataloader_num_workers=2), 422, ("dataloader_num_workers",)),
    Case("no-usable-image", train(train_data_dir=p("noimg")), 422, ("train_data_dir",)),
    Case("host-decides-output-dir", train(output_dir=p(where="outside")), 422, ("output_dir",)),
    # ---- server-side read folders; never an existence oracle, never a file's content
    Case("template-etc-with-reg-etc", train(template_file="/etc/hostname", reg_data_dir="/etc",
                                            use_object_template=False), 422, ("template_file",), says=OUTSIDE),
    Case("reg-etc", train(reg_data_dir="/etc"), 422, ("reg_data_dir",), says=OUTSIDE),
    Case("template-outside-secret", train(template_file=p("secret.txt", where="outside"), use_object_template=False),
         422, ("template_file",), says=OUTSIDE),
    Case("prompts-outside", train(sample_prompts=p("secret.txt", where="outside")), 422, ("sample_prompts",),
         says=OUTSIDE),
    Case("dataset-dir-outside", train(train_data_dir=p(where="outside")), 422, ("train_data_dir",), says=OUTSIDE),
    Case("toml-outside", train(dataset_config=p("secret.toml", where="outside")), 422, ("dataset_config",),
         says=OUTSIDE),
    Case("toml-unknown-secret-key", train(dataset_config=p("secret.toml")), 422, ("dataset_config",)),
    Case("toml-secret-value", train(dataset_config=p("secret2.toml")), 422, ("dataset_config",),
         says="shuffle_caption"),
    Case("toml-image-dir-outside", train(dataset_config=p("escape.toml")), 422, ("dataset_config",), says=OUTSIDE),
    Case("template-name-unknown", train(template_file="no_such_template", use_object_template=False), 422,
         ("template_file",)),
    # ---- inspect: bounded, never a 500
    Case("inspect-zip-bomb", get("/inspect/bomb-ti"), 422, says="MB"),
    Case("inspect-huge-header", get("/inspect/huge-ti"), 422),
    Case("inspect-5000-digit-step", get("/inspect/longstep-ti"), (200, 422)),
    Case("inspect-traversal", get("/inspect/..%2F..%2Fetc%2Fpasswd"), (404, 422)),
    Case("inspect-unsafe-pickle", get("/inspect/evil-ti"), 422),
]

# the same answer whether the path outside the readable folders exists or not
ORACLE_PAIRS = [("train_data_dir", p(where="outside"), p("missing-dir", where="outside")),
                ("dataset_config", p("secret.toml", where="outside"), p("missing.toml", where="outside")),
                ("sample_prompts", p("secret.txt", where="outside"), p("missing.txt", where="outside")),
                ("template_file", p("secret.txt", where="outside"), p("missing.txt", where="outside"))]


class _Evil:
    def __reduce__(self):  # runs `touch PWNED` if anything ever unpickles it unsafely
        return (os.system, (f"touch {os.environ.get('TI_PWNED', '/tmp/ti-trainer-pwned')}",))


def prepare_files(ctx: Ctx, width_ok: int) -> None:
    """Write the files the cases name. `width_ok` is the loaded model's text width."""
    import torch
    from safetensors.torch import save_file

    inside, outside, emb = Path(ctx.inside), Path(ctx.outside), Path(ctx.emb_dir)
    for d in (inside, outside, emb, inside / "noimg"):
        d.mkdir(parents=True, exist_ok=True)
    (outside / "secret.txt").write_text(SECRET + "\n")
    (outside / "secret.toml").write_text(f'HF_TOKEN = "{SECRET}"\n')
    (inside / "secret.toml").write_text(f'HF_TOKEN = "{SECRET}"\n')
    (inside / "secret2.toml").write_text(f'[general]\nshuffle_caption = "{SECRET}"\n'
                                         '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\n')
    (inside / "escape.toml").write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{outside.as_posix()}"\n')
    (inside / "noimg" / "readme.txt").write_text("no images here\n")
    (inside / "prompts.txt").write_text("a photo\na photo --h 77777\n")
    (inside / "noimg" / "broken.png").write_bytes(b"not a png at all")
    torch.save({"string_to_param": {"*": _Evil()}, "name": "evil"}, emb / "evil-ti.pt")
    save_file({"emb_params": torch.zeros(2, width_ok + 8)}, str(emb / "narrow-ti.safetensors"))
    save_file({"emb_params": torch.zeros(2, 8)}, str(emb / "longstep-ti.safetensors"), metadata={"step": "9" * 5000})
    (emb / "bomb-ti.pt").write_bytes(zip_bomb(5_000_000))
    header = json.dumps({"emb_params": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 8]}}).encode()
    (emb / "huge-ti.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))


def zip_bomb(numel: int) -> bytes:
    """A real torch file of `numel` zeros whose entries are deflated: ~20 KB on disk per 20 MB."""
    import torch

    buf = io.BytesIO()
    torch.save({"string_to_param": {"*": torch.zeros(numel)}}, buf)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    return out.getvalue()


def snapshot(ctx: Ctx, data_dir: str) -> tuple:
    """Files in the embeddings folder and the log folder, and the pickle tripwire: the runner
    compares it before and after each case (the task list is compared by the runner itself)."""
    logs = Path(data_dir) / "textual_inversion"
    files = sorted(str(f) for d in (Path(ctx.emb_dir), logs) if d.is_dir() for f in d.rglob("*"))
    return files, os.path.exists(os.environ.get("TI_PWNED", "/tmp/ti-trainer-pwned"))


def check_answer(case: Case, status: int, body: Any, server_paths: tuple[str, ...] = ()) -> None:
    """Status, the field a 422 names, what it says, what it never says (secrets, and the server's
    own absolute folders: answers show paths relative to the folders the user knows)."""
    want = case.status if isinstance(case.status, tuple) else (case.status,)
    text = json.dumps(body) if not isinstance(body, str) else body
    assert status in want, (case.id, status, text[:2000])
    for bad in (*case.never, *server_paths):
        assert bad not in text, (case.id, bad, text[:2000])
    if status == 422 and case.loc is not None:
        msgs = {tuple(d["loc"][1:]): d["msg"] for d in body["detail"]}
        assert case.loc in msgs, (case.id, msgs)
        assert case.says in msgs[case.loc], (case.id, msgs[case.loc])
    elif case.says:
        assert case.says in text, (case.id, text[:2000])
