"""kohya's weighted_captions in the CLI: A1111's emphasis syntax in captions and preview prompts,
weighted as A1111's "Original" emphasis (each position times its weight, then the chunk rescaled
to its unweighted mean), per text encoder for SDXL, with the pooled output unweighted."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from single_file_fixture import images

from lib_ti import cli, formats
from lib_ti.config import ConfigError, TrainConfig
from lib_ti.model import SDXL_SLOTS
from lib_ti.prompt_weights import ROUND, SQUARE, parse

T = "mytok123"
FAMILIES = ["tiny_sd1", "tiny_sd2v", "tiny_sdxl"]


@pytest.mark.parametrize("text, pieces", [
    ("a cat", [("a cat", 1.0)]),
    ("a (cat) [dog]", [("a ", 1.0), ("cat", ROUND), (" ", 1.0), ("dog", SQUARE)]),
    ("((a)) [[b]]", [("a", ROUND * ROUND), (" ", 1.0), ("b", SQUARE * SQUARE)]),
    ("(a (b:1.5) c:0.5)", [("a ", 0.5), ("b", 1.5 * 0.5), (" c", 0.5)]),
    ("(a: 1.25 ) (b:+.5) (c:-1)", [("a", 1.25), (" ", 1.0), ("b", 0.5), (" ", 1.0), ("c", -1.0)]),
    # escapes are the characters; a backslash before anything else is dropped
    ("\\(a\\) \\[b\\] \\\\ c\\d", [("(a) [b] \\ cd", 1.0)]),
    # a bracket that never opens is text; one never closed weighs the rest
    ("a) b] c:2)", [("a) b] c:2)", 1.0)]),
    ("x (a [b", [("x ", 1.0), ("a ", ROUND), ("b", ROUND * SQUARE)]),
    # not a number: the text stays as written, the ')' still closes the group
    ("(a:1.2.3)", [("a:1.2.3", ROUND)]),
    ("(a:b)", [("a:b", ROUND)]),
    # BREAK: upper case, a whole word, swallowing the spaces around it
    ("a BREAK b", [("a", 1.0), None, ("b", 1.0)]),
    ("BREAK", [None]),
    ("a BREAK BREAK b, break, BREAKS, x-BREAK", [("a", 1.0), None, None, ("b, break, BREAKS, x-", 1.0), None]),
    ("(a BREAK b)", [("a", ROUND), None, ("b", ROUND)]),
    ("", [("", 1.0)]),
])
def test_parser(text, pieces):
    assert parse(text) == pieces


def test_chunks_and_weights_as_a1111(tokenizer_dir):
    """The layouts the real A1111 gives (tests/host/test_real_host_weighted.py compares more live)."""
    from test_chunks_a1111 import SYNTAX
    from transformers import CLIPTokenizer

    from lib_ti.diffusers_backend.inject import PromptTokenizer

    prompts = PromptTokenizer(CLIPTokenizer.from_pretrained(str(tokenizer_dir)))
    prompts.weighted = True
    row = prompts.row(SYNTAX["BREAK_text"], T, 1)
    assert [(len(c.ids) - 2, c.slot.index(0) if 0 in c.slot else None, c.weight) for c in row.chunks] == [
        (4, 4, ()), (3, None, ())]
    (chunk,) = prompts.row(SYNTAX["parens"], T, 1).chunks  # a (photo) of [T] (x)
    assert chunk.weight == (1.0, 1.0, ROUND, 1.0, SQUARE, 1.0, 1.0, 1.0, 1.0) and chunk.slot[4] == 0


@pytest.fixture()
def weighted(request):
    """The model with weighted captions on for this test only (the fixtures are shared)."""
    model = request.getfixturevalue(request.param)
    model.prompts.weighted = True
    yield model
    model.prompts.weighted = False


def encode(model, texts, vectors, weighted):
    before, model.prompts.weighted = model.prompts.weighted, weighted
    try:
        return model.encode_prompts(texts, T, vectors)
    finally:
        model.prompts.weighted = before


def vectors_for(model, n=2):
    g = torch.Generator().manual_seed(3)
    return {k: torch.randn(n, w, generator=g) for k, w in model.slots().items()}


def states(cond):
    return cond.crossattn if hasattr(cond, "crossattn") else cond


def widths(model):
    return [model.slots()[s] for s in SDXL_SLOTS] if model.family == "sdxl" else list(model.slots().values())


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_weights_of_one_change_nothing(family, request):
    model = request.getfixturevalue(family)
    vec = vectors_for(model)
    plain = encode(model, [f"a photo of {T}, dog on grass", "a (b) c"], vec, weighted=False)
    ones = encode(model, [f"a photo of ({T}:1.0), (dog:1) on grass", "a (b) c"], vec, weighted=False)
    assert not torch.equal(states(plain), states(ones))  # off: the syntax is text, as before
    ones = encode(model, [f"a photo of ({T}:1.0), (dog:1) on grass", "a \\(b\\) c"], vec, weighted=True)
    assert torch.equal(states(plain), states(ones))
    if model.family == "sdxl":
        assert torch.equal(plain.pooled, ones.pooled)


@pytest.fixture(scope="module")
def sd1_clip_skip_2(tiny_sd1):
    from lib_ti.diffusers_backend.diffusers_sd import DiffusersSD

    m = tiny_sd1
    return DiffusersSD("sd1", m.unet, m.vae, m.text_encoder, m.tokenizer, m.scheduler, clip_skip=2)


@pytest.mark.parametrize("family", [*FAMILIES, "sd1_clip_skip_2"])
@torch.no_grad()
def test_emphasis_is_the_weight_then_the_mean_rescale(family, request):
    """(x:1.5) and [x] against a direct computation from the unweighted hidden states (after clip
    skip's final norm); SDXL rescales clip_l's and clip_g's states each to its own mean, and keeps
    the pooled output."""
    model = request.getfixturevalue(family)
    vec = vectors_for(model)
    plain = encode(model, [f"a photo of {T}, red disc on grass"], vec, weighted=False)
    got = encode(model, [f"a photo of ({T}:1.5), [red disc] on grass"], vec, weighted=True)
    row = model.prompts.row(f"a photo of {T}, red disc on grass", T, 2)
    w = torch.ones(77)
    w[4:6] = 1.5  # BOS a photo of [vec vec] , red disc
    w[7:9] = SQUARE
    assert [model.decode_tokens([i])[0] for i in row.ids[7:9]] == ["red</w>", "disc</w>"]
    want = []
    for part in states(plain)[0].split(widths(model), dim=-1):
        z = part * w[:, None]
        want.append(z * (part.mean() / z.mean()))
    torch.testing.assert_close(states(got)[0], torch.cat(want, dim=-1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(states(got), states(plain), atol=1e-3)
    if model.family == "sdxl":
        assert torch.equal(got.pooled, plain.pooled)


@pytest.mark.parametrize("weighted", ["tiny_sd1", "tiny_sdxl"], indirect=True)
@torch.no_grad()
def test_break_starts_a_new_chunk(weighted):
    model = weighted
    vec = vectors_for(model)
    both = states(model.encode_prompts([f"a photo of {T} BREAK on grass"], T, vec))
    assert both.shape[1] == 2 * 77
    first = states(model.encode_prompts([f"a photo of {T}"], T, vec))
    second = states(model.encode_prompts(["on grass"], T, vec))
    torch.testing.assert_close(both[:, :77], first)
    torch.testing.assert_close(both[:, 77:], second)
    # a BREAK inside a group still breaks; the pieces keep their weight
    row = model.prompts.row(f"({T} BREAK grass)", T, 2)
    assert [c.weight[1:-1] for c in row.chunks] == [(ROUND, ROUND), (ROUND,)]


@pytest.mark.parametrize("weighted", FAMILIES, indirect=True)
def test_the_token_in_a_group_gets_gradient(weighted):
    model = weighted
    vec = {k: v.requires_grad_(True) for k, v in vectors_for(model).items()}
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with model.training():  # the shared model's weights take no gradient
        cond = model.encode_prompts([f"a photo of ({T}:1.2) on grass"], T, vec)
        model.predict(latents, torch.tensor([300]), cond).square().mean().backward()
    assert model.prompts.row(f"({T}:1.2)", T, 2).chunks[0].weight == (1.0, 1.2, 1.2, 1.0)
    for v in vec.values():
        assert v.grad is not None and bool(torch.isfinite(v.grad).all()) and v.grad.abs().sum() > 0


def test_config_accepts_it_and_refuses_a_token_with_break(tmp_path):
    f = tmp_path / "kohya.toml"
    f.write_text(f'train_data_dir = "x"\ntoken_string = "{T}"\nweighted_captions = true\n', encoding="utf-8")
    assert TrainConfig.from_toml(f).weighted_captions is True
    assert TrainConfig.from_dict(dict(train_data_dir="x", token_string=T)).weighted_captions is False
    assert "weighted_captions" in TrainConfig.host_decided()  # the WebUI's parser always applies
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(dict(train_data_dir="x", token_string="my-BREAK", weighted_captions=True))
    assert "BREAK" in e.value.errors["token_string"]
    TrainConfig.from_dict(dict(train_data_dir="x", token_string="my-BREAK"))  # plain text: a fine name
    with pytest.raises(ConfigError) as e:  # emphasis characters are never part of a name
        TrainConfig.from_dict(dict(train_data_dir="x", token_string="my(tok)", weighted_captions=True))
    assert "only letters" in e.value.errors["token_string"]


def cli_run(model_dir, tmp_path, capsys, weighted: bool) -> tuple[list[float], torch.Tensor]:
    out_dir = tmp_path / f"out-{weighted}"
    data = images(tmp_path / "data", f"a photo of ({T}:1.2), [red] disc BREAK on (blue:0.8)")
    sets = {"pretrained_model_name_or_path": model_dir, "train_data_dir": data, "output_dir": out_dir,
            "token_string": T, "init_word": "ball", "resolution": 64, "max_train_steps": 2, "learning_rate": 0.05,
            "seed": 5, "weighted_captions": str(weighted).lower(), "validation_every_n_steps": 0,
            "sample_every_n_steps": 2, "sample_prompts": f"(({T})) BREAK on a table --w 64 --h 64 --s 2 --n [blurry]"}
    code = cli.main(["train"] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")])
    out = capsys.readouterr()
    assert code == 0, out.err + out.out
    assert list((out_dir / "sample").glob("*.png"))
    with open(out_dir / f"{T}.loss.csv", newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    return losses, formats.read_embedding(str(out_dir / f"{T}.safetensors")).vectors["emb"]


def test_cli_run_with_weighted_captions(tiny_sd1_dir, tmp_path, capsys):
    losses, learned = cli_run(tiny_sd1_dir, tmp_path, capsys, weighted=True)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses) and learned.isfinite().all()
    _, plain = cli_run(tiny_sd1_dir, tmp_path, capsys, weighted=False)  # same seed, the syntax read as text
    assert (learned - plain).abs().max() > 1e-2  # ~0.2: the weighting reached the training
