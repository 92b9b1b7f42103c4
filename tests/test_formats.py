"""Every embedding layout peers write, built here from their documented structure, read back;
every writer round-trips; writes are atomic and refuse to overwrite; pickles never run code."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lib_ti import files, formats
from lib_ti.embedding import Embedding
from lib_ti.formats import FormatError, OverwriteError


def vec(n: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


SD1, SD2, XL = {"emb": 768}, {"emb": 1024}, {"clip_l": 768, "clip_g": 1280}


def sdxl(n: int = 2, seed: int = 0, lw: int = 768, gw: int = 1280) -> Embedding:
    return Embedding({"clip_l": vec(n, lw, seed), "clip_g": vec(n, gw, seed + 1)}, step=12, name="xl",
                     sd_checkpoint="abcd1234", sd_checkpoint_name="sdxl_base", metadata={"trainer": "x"})


def sd1(n: int = 3, width: int = 768, seed: int = 0) -> Embedding:
    return Embedding({"emb": vec(n, width, seed)}, step=500, name="mytok", sd_checkpoint="c0ffee",
                     sd_checkpoint_name="v1-5", metadata={"lr": "0.005", "note2": "ü unicode"})


def assert_same(a: Embedding, b: Embedding) -> None:
    assert set(a.vectors) == set(b.vectors)
    for k in a.vectors:
        assert b.vectors[k].dtype == torch.float32 and torch.equal(a.vectors[k], b.vectors[k]), k
    assert (a.step, a.name, a.sd_checkpoint, a.sd_checkpoint_name) == \
        (b.step, b.name, b.sd_checkpoint, b.sd_checkpoint_name)
    assert a.metadata == b.metadata


# ------------------------------------------------------------------ peers' layouts


def a1111_dict(t, **kw):
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": t}, "name": "old", "step": 7,
            "sd_checkpoint": "abc123", "sd_checkpoint_name": "model", **kw}


def test_a1111_pt_plain_dict(tmp_path):
    t = vec(2, 768).requires_grad_()  # A1111 saves the training tensor as is
    torch.save(a1111_dict(t), tmp_path / "old.pt")
    emb = formats.read_embedding(tmp_path / "old.pt")
    assert emb.family == "sd1" and emb.num_vectors == 2 and not emb.vectors["emb"].requires_grad
    assert (emb.step, emb.name, emb.sd_checkpoint, emb.sd_checkpoint_name) == (7, "old", "abc123", "model")
    assert torch.equal(emb.vectors["emb"], t.detach())


@pytest.mark.parametrize("legacy", [False, True])
def test_a1111_pt_old_parameterdict_pickle(tmp_path, legacy):
    t = vec(3, 1024)
    pd = torch.nn.ParameterDict({"*": torch.nn.Parameter(t.clone())})
    torch.save({**a1111_dict(None), "string_to_param": pd}, tmp_path / "pd.bin", _use_new_zipfile_serialization=not legacy)
    info = formats.inspect_embedding(tmp_path / "pd.bin")
    assert (info["format"], info["family"], info["num_vectors"], info["width"]) == ("a1111-pt", "sd2", 3, 1024)
    assert torch.equal(formats.read_embedding(tmp_path / "pd.bin").vectors["emb"], t)


def test_a1111_pt_must_hold_one_entry(tmp_path):
    torch.save({"string_to_param": {"a": vec(1, 8), "b": vec(1, 8)}}, tmp_path / "two.pt")
    with pytest.raises(FormatError, match="exactly one entry"):
        formats.read_embedding(tmp_path / "two.pt")


def test_kohya_sd1_safetensors_and_pt(tmp_path):
    t = vec(4, 768)
    save_file({"emb_params": t}, tmp_path / "k.safetensors",
              {"modelspec.architecture": "stable-diffusion-v1/textual-inversion", "ss_steps": "100"})
    torch.save({"emb_params": t}, tmp_path / "k.pt")
    for name in ("k.safetensors", "k.pt"):
        info = formats.inspect_embedding(tmp_path / name)
        assert (info["format"], info["family"], info["num_vectors"], info["width"]) == ("kohya", "sd1", 4, 768)
        assert info["name"] == "k"  # kohya stores no token: the trigger is the file name
    assert formats.inspect_embedding(tmp_path / "k.safetensors")["metadata"]["ss_steps"] == "100"


def test_kohya_sdxl(tmp_path):
    save_file({"clip_l": vec(2, 768), "clip_g": vec(2, 1280, 1)}, tmp_path / "kxl.safetensors",
              {"modelspec.architecture": "stable-diffusion-xl-v1-base/textual-inversion"})
    info = formats.inspect_embedding(tmp_path / "kxl.safetensors")
    assert (info["format"], info["family"], info["num_vectors"]) == ("kohya", "sdxl", 2)
    assert info["width"] == XL and set(info["norms"]) == {"clip_l", "clip_g"}


def test_onetrainer_output_embeddings_ignored(tmp_path):
    t = vec(2, 768)
    save_file({"emp_params": t, "emp_params_out": vec(2, 768, 9)}, tmp_path / "ot.safetensors")
    emb = formats.read_embedding(tmp_path / "ot.safetensors")
    assert torch.equal(emb.vectors["emb"], t) and "emp_params_out" in emb.metadata["note"]
    assert formats.inspect_embedding(tmp_path / "ot.safetensors")["format"] == "onetrainer"
    save_file({"clip_l": vec(1, 768), "clip_g": vec(1, 1280), "clip_l_out": vec(1, 768), "clip_g_out": vec(1, 1280)},
              tmp_path / "otxl.safetensors")
    info = formats.inspect_embedding(tmp_path / "otxl.safetensors")
    assert (info["format"], info["family"]) == ("onetrainer", "sdxl") and "clip_g_out" in info["metadata"]["note"]


def test_sdxl_extra_keys_ignored_with_a_note(tmp_path):
    save_file({"clip_l": vec(1, 768), "clip_g": vec(1, 1280), "extra": vec(1, 4)}, tmp_path / "e.safetensors")
    emb = formats.read_embedding(tmp_path / "e.safetensors")
    assert set(emb.vectors) == {"clip_l", "clip_g"} and "extra" in emb.metadata["note"]


@pytest.mark.parametrize("shape", [(768,), (1, 768), (3, 768)])
def test_diffusers_one_and_two_dims(tmp_path, shape):
    t = torch.randn(*shape)
    save_file({"<cat-toy>": t}, tmp_path / "learned_embeds.safetensors", {"format": "pt"})
    torch.save({"<cat-toy>": t}, tmp_path / "learned_embeds.bin")  # older diffusers and InvokeAI
    for name in ("learned_embeds.safetensors", "learned_embeds.bin"):
        emb = formats.read_embedding(tmp_path / name)
        info = formats.inspect_embedding(tmp_path / name)
        assert (info["format"], info["family"], info["num_vectors"]) == ("diffusers", "sd1", t.reshape(-1, 768).shape[0])
        assert emb.name == "<cat-toy>" and emb.metadata == {}
        assert torch.equal(emb.vectors["emb"], t.reshape(-1, 768))


@pytest.mark.parametrize("entry", ["learned_embeds-steps-500.safetensors", "learned_embeds_2-steps-500.safetensors"])
def test_diffusers_sdxl_pair_found_from_either_file(tmp_path, entry):
    lv, gv = vec(2, 768), vec(2, 1280, 1)
    save_file({"<s>": lv}, tmp_path / "learned_embeds-steps-500.safetensors", {"format": "pt"})
    save_file({"<s>": gv}, tmp_path / "learned_embeds_2-steps-500.safetensors", {"format": "pt"})
    emb = formats.read_embedding(tmp_path / entry)
    assert torch.equal(emb.vectors["clip_l"], lv) and torch.equal(emb.vectors["clip_g"], gv)
    info = formats.inspect_embedding(tmp_path / entry)
    assert (info["format"], info["family"], info["width"]) == ("diffusers-sdxl-pair", "sdxl", XL)
    assert [Path(f).name for f in info["files"]] == ["learned_embeds-steps-500.safetensors",
                                                     "learned_embeds_2-steps-500.safetensors"]


def test_diffusers_second_half_alone_is_explained(tmp_path):
    save_file({"<s>": vec(1, 1280)}, tmp_path / "learned_embeds_2.safetensors")
    with pytest.raises(FormatError, match="learned_embeds.safetensors is not in the same folder"):
        formats.read_embedding(tmp_path / "learned_embeds_2.safetensors")


def test_separate_embeddings_named_x_and_x_2_are_not_paired(tmp_path):
    save_file({"<a>": vec(1, 768)}, tmp_path / "dog.safetensors")
    save_file({"<a>": vec(1, 768, 1)}, tmp_path / "dog_2.safetensors")
    assert formats.read_embedding(tmp_path / "dog.safetensors").family == "sd1"
    assert formats.read_embedding(tmp_path / "dog_2.safetensors").family == "sd1"


def lora_keys():
    return {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": vec(4, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": vec(8, 4)}


def test_lora_bundle_single_and_sdxl(tmp_path):
    t = vec(2, 768)
    save_file({**lora_keys(), "bundle_emb.my.tok.string_to_param.*": t}, tmp_path / "lora.safetensors",
              {"ss_network_module": "networks.lora"})
    emb = formats.read_embedding(tmp_path / "lora.safetensors")
    assert emb.name == "my.tok" and torch.equal(emb.vectors["emb"], t) and "ss_network_module" not in emb.metadata
    assert formats.inspect_embedding(tmp_path / "lora.safetensors")["format"] == "lora-bundle"
    save_file({**lora_keys(), "bundle_emb.a.clip_l": vec(1, 768), "bundle_emb.a.clip_g": vec(1, 1280),
               "bundle_emb.b.clip_l": vec(3, 768), "bundle_emb.b.clip_g": vec(3, 1280)}, tmp_path / "xl.safetensors")
    with pytest.raises(FormatError, match=r"several embeddings \(a, b\)"):
        formats.read_embedding(tmp_path / "xl.safetensors")
    emb = formats.read_embedding(tmp_path / "xl.safetensors", name="b")
    assert emb.family == "sdxl" and emb.num_vectors == 3 and emb.name == "b"
    with pytest.raises(FormatError, match="bundled: a, b"):
        formats.read_embedding(tmp_path / "xl.safetensors", name="c")


def test_invoke_training_layouts(tmp_path):
    save_file({"emb_params": vec(2, 1024)}, tmp_path / "inv.safetensors")
    save_file({"clip_l": vec(5, 768), "clip_g": vec(5, 1280)}, tmp_path / "invxl.safetensors")
    a, b = formats.inspect_embedding(tmp_path / "inv.safetensors"), formats.inspect_embedding(tmp_path / "invxl.safetensors")
    assert (a["family"], a["num_vectors"], a["width"]) == ("sd2", 2, 1024)
    assert (b["family"], b["num_vectors"], b["width"]) == ("sdxl", 5, XL)


@pytest.mark.parametrize("key, family", [("clip_l", "sd1"), ("clip_h", "sd2")])
def test_lone_encoder_key_is_a_single_embedding(tmp_path, key, family):
    save_file({key: vec(2, 768 if key == "clip_l" else 1024)}, tmp_path / "c.safetensors")
    emb = formats.read_embedding(tmp_path / "c.safetensors")
    assert emb.family == family and emb.name == "c"


def test_half_precision_is_read_as_float32(tmp_path):
    save_file({"emb_params": vec(2, 768).half()}, tmp_path / "h.safetensors")
    assert formats.read_embedding(tmp_path / "h.safetensors").vectors["emb"].dtype == torch.float32


def test_content_is_sniffed_not_the_extension(tmp_path):
    save_file({"emb_params": vec(1, 768)}, tmp_path / "really_safetensors.pt")
    torch.save(a1111_dict(vec(1, 768)), tmp_path / "really_pickle.safetensors")
    assert formats.inspect_embedding(tmp_path / "really_safetensors.pt")["family"] == "sd1"
    assert formats.inspect_embedding(tmp_path / "really_pickle.safetensors")["format"] == "a1111-pt"


@pytest.mark.parametrize("content, match", [
    (b"", "empty"), (b"\x89PNG\r\n\x1a\n0000", "PNG"), (b"hello world, not an embedding", "neither"),
])
def test_not_an_embedding(tmp_path, content, match):
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(FormatError, match=match):
        formats.read_embedding(tmp_path / "x.pt")


def test_unknown_layout_names_file_and_keys(tmp_path):
    save_file({f"IN{i:02d}": vec(1, 768) for i in range(3)}, tmp_path / "xti.safetensors")  # kohya XTI
    with pytest.raises(FormatError, match=r"xti\.safetensors.*IN00, IN01, IN02"):
        formats.read_embedding(tmp_path / "xti.safetensors")
    torch.save({"hash": "abcd", "optimizer_state_dict": {}}, tmp_path / "x.pt.optim")
    with pytest.raises(FormatError, match="tensor keys found: none"):
        formats.read_embedding(tmp_path / "x.pt.optim")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(FormatError, match="holds a list"):
        formats.read_embedding(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError):
        formats.read_embedding(tmp_path / "missing.pt")


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch-zip", "torch-legacy", "raw-pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, how):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    payload = a1111_dict(Evil(marker))
    if how == "raw-pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=how == "torch-zip")
    with pytest.raises(FormatError, match=r"refused to load (posix|nt|os)\.system"):
        formats.read_embedding(path)
    assert not marker.exists()


# ------------------------------------------------------------------ writers


def test_safetensors_layout_is_what_hosts_read(tmp_path):
    formats.write_safetensors(sdxl(), tmp_path / "xl.safetensors")
    data = load_file(tmp_path / "xl.safetensors")
    assert set(data) == {"clip_l", "clip_g"}  # A1111 crashes on any other key here
    with safe_open(tmp_path / "xl.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta == {"step": "12", "name": "xl", "sd_checkpoint": "abcd1234", "sd_checkpoint_name": "sdxl_base",
                    "trainer": "x"}
    formats.write_safetensors(sd1(), tmp_path / "one.safetensors")
    assert list(load_file(tmp_path / "one.safetensors")) == ["emb_params"]


def test_a1111_pt_layout_is_plain_and_weights_only_safe(tmp_path):
    formats.write_a1111_pt(sd1(), tmp_path / "e.pt")
    data = torch.load(tmp_path / "e.pt", weights_only=True)
    assert data["string_to_token"] == {"*": 265} and list(data["string_to_param"]) == ["*"]
    assert data["string_to_param"]["*"].shape == (3, 768) and data["string_to_param"]["*"].is_contiguous()
    assert (data["name"], data["step"], data["sd_checkpoint"], data["sd_checkpoint_name"]) == \
        ("mytok", 500, "c0ffee", "v1-5")


def test_sdxl_cannot_be_an_a1111_pt(tmp_path):
    with pytest.raises(FormatError, match="save it as safetensors"):
        formats.save_embedding(sdxl(), tmp_path / "xl.pt", "a1111-pt")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fmt, name, make", [
    ("safetensors", "e.safetensors", sd1), ("safetensors", "e.safetensors", sdxl), ("a1111-pt", "e.pt", sd1),
    ("diffusers", "learned_embeds.safetensors", sd1), ("diffusers", "learned_embeds.safetensors", sdxl),
])
def test_round_trip_every_writer(tmp_path, fmt, name, make):
    emb = make()
    written = formats.save_embedding(emb, tmp_path / name, fmt)
    back = formats.read_embedding(tmp_path / name)
    assert_same(emb, back)
    if fmt == "diffusers":
        assert len(written) == (2 if make is sdxl else 1)
        if make is sdxl:
            assert [Path(p).name for p in written] == ["learned_embeds.safetensors", "learned_embeds_2.safetensors"]
            assert_same(emb, formats.read_embedding(tmp_path / "learned_embeds_2.safetensors"))
            assert list(load_file(written[1])) == ["xl"]  # the token defaults to the name


def test_diffusers_pair_with_any_name_round_trips(tmp_path):
    emb = sdxl(lw=8, gw=12)
    written = formats.save_embedding(emb, tmp_path / "out.safetensors", "diffusers", token="<tok>")
    assert [Path(p).name for p in written] == ["out.safetensors", "out_2.safetensors"]
    assert_same(emb, formats.read_embedding(tmp_path / "out.safetensors"))
    assert formats.inspect_embedding(tmp_path / "out_2.safetensors")["format"] == "diffusers-sdxl-pair"


def test_no_overwrite_by_default(tmp_path):
    path = tmp_path / "e.safetensors"
    formats.save_embedding(sd1(seed=1), path, "safetensors")
    before = path.read_bytes()
    for fmt in formats.SAVE_FORMATS:
        with pytest.raises(OverwriteError, match="already exists") as err:
            formats.save_embedding(sd1(seed=2), path, fmt)
        assert isinstance(err.value, FileExistsError) and isinstance(err.value, FormatError)
    assert path.read_bytes() == before
    formats.save_embedding(sd1(seed=2), path, "safetensors", overwrite=True)
    assert torch.equal(formats.read_embedding(path).vectors["emb"], sd1(seed=2).vectors["emb"])
    # the SDXL pair refuses if either of its files exists
    (tmp_path / "p_2.safetensors").write_bytes(b"keep")
    with pytest.raises(OverwriteError, match="p_2"):
        formats.save_embedding(sdxl(), tmp_path / "p.safetensors", "diffusers")
    assert not (tmp_path / "p.safetensors").exists()


@pytest.mark.parametrize("fmt, target", [("a1111-pt", "torch.save"), ("safetensors", "os.fsync"),
                                         ("diffusers", "os.replace")])
@pytest.mark.parametrize("existing", [False, True])
def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch, fmt, target, existing):
    path = tmp_path / "e.pt"
    if existing:
        formats.save_embedding(sd1(seed=1), path, "a1111-pt")
    before = path.read_bytes() if existing else None

    def boom(*args, **kwargs):
        raise OSError("disk full")

    if target == "torch.save":
        def partial(obj, f, *a, **k):
            f.write(b"partial garbage")
            raise RuntimeError("disk full")
        monkeypatch.setattr(formats.torch, "save", partial)
    else:
        monkeypatch.setattr(formats.os, target.split(".")[1], boom)
    with pytest.raises((RuntimeError, OSError)):
        formats.save_embedding(sd1(seed=2), path, fmt, overwrite=True, token="t")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == (["e.pt"] if existing else [])  # temp files cleaned
    if existing:
        assert path.read_bytes() == before


def test_temp_file_sits_beside_the_target_and_hosts_skip_it(tmp_path, monkeypatch):
    seen = []
    real = os.replace
    monkeypatch.setattr(formats.os, "replace", lambda src, dst: seen.append((src, dst)) or real(src, dst))
    formats.write_safetensors(sd1(), tmp_path / "e.safetensors")
    (src, dst), = seen
    # same folder (so the rename is atomic) and not *.safetensors/*.pt (so a reload never reads half a file)
    assert Path(src).parent == tmp_path and Path(dst) == tmp_path / "e.safetensors"
    assert files.loadable_stem(Path(src).name) is None


def test_interrupt_mid_write_cleans_up(tmp_path, monkeypatch):
    def interrupted(obj, f, *a, **k):
        f.write(b"x")
        raise KeyboardInterrupt
    monkeypatch.setattr(formats.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        formats.write_a1111_pt(sd1(), tmp_path / "e.pt")
    assert not list(tmp_path.iterdir())


def test_unknown_save_format(tmp_path):
    with pytest.raises(FormatError, match="unknown format 'ckpt'"):
        formats.save_embedding(sd1(), tmp_path / "e.ckpt", "ckpt")


# ------------------------------------------------------------------ width checks


@pytest.mark.parametrize("emb, model, message", [
    (SD1, XL, "embedding is SD1 (768 wide) but the model is SDXL (clip_l 768 + clip_g 1280)"),
    (XL, SD1, "embedding is SDXL (clip_l 768 + clip_g 1280) but the model is SD1 (768 wide)"),
    (SD2, SD1, "embedding is SD2 (1024 wide) but the model is SD1 (768 wide)"),
    ({"emb": 32}, {"emb": 48}, "embedding is 32 wide but the model is 48 wide"),
    ({"clip_l": 8, "clip_g": 12}, {"clip_l": 8, "clip_g": 16},
     "embedding is clip_l 8 + clip_g 12 but the model is clip_l 8 + clip_g 16"),
])
def test_width_mismatch_names_both(emb, model, message):
    e = Embedding({k: torch.zeros(2, w) for k, w in emb.items()})
    with pytest.raises(FormatError) as err:
        formats.check_widths(e, model)
    assert str(err.value) == message


@pytest.mark.parametrize("emb, model", [(SD1, SD1), (XL, XL), ({"clip_l": 768}, SD1), ({"emb": 32}, {"emb": 32})])
def test_matching_widths_pass(emb, model):
    formats.check_widths(Embedding({k: torch.zeros(1, w) for k, w in emb.items()}), model)


# ------------------------------------------------------------------ properties

PROPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
widths = st.one_of(st.integers(1, 64), st.sampled_from([768, 1024, 1280]))
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


@PROPS
@given(n=st.integers(1, 75), width=widths, fmt=st.sampled_from(formats.SAVE_FORMATS),
       step=st.none() | st.integers(0, 10**9), name=st.text("abc-_<>", min_size=1, max_size=8),
       meta=st.dictionaries(st.text("xyz", min_size=1, max_size=5), texts, max_size=3), seed=st.integers(0, 99))
def test_property_single_slot_round_trip(n, width, fmt, step, name, meta, seed):
    emb = Embedding({"emb": vec(n, width, seed)}, step=step, name=name, metadata=meta)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "e.pt" if fmt == "a1111-pt" else "e.safetensors")
        formats.save_embedding(emb, path, fmt)
        assert_same(emb, formats.read_embedding(path))
        assert os.listdir(d) == [os.path.basename(path)]


@PROPS
@given(n=st.integers(1, 75), lw=st.integers(1, 48), gw=st.integers(49, 96),
       fmt=st.sampled_from(["safetensors", "diffusers"]), seed=st.integers(0, 99))
def test_property_sdxl_round_trip(n, lw, gw, fmt, seed):
    emb = sdxl(n, seed, lw, gw)
    with tempfile.TemporaryDirectory() as d:
        written = formats.save_embedding(emb, os.path.join(d, "e.safetensors"), fmt)
        for p in written:
            assert_same(emb, formats.read_embedding(p))


@PROPS
@given(n=st.integers(1, 75), width=widths, one_d=st.booleans(), seed=st.integers(0, 99))
def test_property_peer_single_tensor_files(n, width, one_d, seed):
    t = vec(n, width, seed)[0] if one_d else vec(n, width, seed)
    with tempfile.TemporaryDirectory() as d:
        for key in ("emb_params", "emp_params", "<tok>"):
            path = os.path.join(d, f"{key.strip('<>')}.safetensors")
            save_file({key: t}, path)
            emb = formats.read_embedding(path)
            assert torch.equal(emb.vectors["emb"], t.reshape(-1, width))
            assert formats.inspect_embedding(path)["num_vectors"] == (1 if one_d else n)
