"""Shared fixtures: the real CLIP tokenizer files and tiny random-weight models of each family,
in memory (TrainableModel) and as saved diffusers folders. Session-scoped: tests that use the
models must not change their weights or leave flags changed (training() restores them)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

# One torch thread, here and in every subprocess the tests start (CLI, torchrun, the UI harness):
# the tiny models gain nothing from a second thread, and on a busy CI box OpenMP threads waiting on
# each other made training steps 4-20x slower. Set before torch is imported; an explicit value wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SEED = 0


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from lib_ti.diffusers_backend.vocab import tokenizer_dir as build

    return build(tmp_path_factory.mktemp("clip_tokenizer"))


def _model(family, tokenizer_dir):
    from tests.support.random_models import build_random_model

    return build_random_model("tiny", family, seed=SEED, tokenizer_dir=tokenizer_dir)


def _folder(family, tmp_path_factory, tokenizer_dir):
    from tests.support.random_models import save_random_model

    # same preset and seed as the in-memory fixture, so both hold the same weights
    return save_random_model("tiny", family, tmp_path_factory.mktemp(f"tiny_{family}") / "model", seed=SEED,
                             tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_sd1(tokenizer_dir):
    return _model("sd1", tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_sd2v(tokenizer_dir):
    return _model("sd2", tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_sdxl(tokenizer_dir):
    return _model("sdxl", tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory, tokenizer_dir):
    return _folder("sd1", tmp_path_factory, tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_sd2v_dir(tmp_path_factory, tokenizer_dir):
    return _folder("sd2", tmp_path_factory, tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory, tokenizer_dir):
    return _folder("sdxl", tmp_path_factory, tokenizer_dir)


FAKE_TOPS = ("modules", "fakehost", "ldm", "sgm", "launch")


@contextlib.contextmanager
def fake_host_modules():
    """Put tests/ on sys.path so the stand-in host (tests/fakehost) imports, and afterwards leave the
    module table and sys.path exactly as before: no fake `modules` leaks into other tests."""
    saved_modules, saved_path = dict(sys.modules), list(sys.path)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        import fakehost

        yield fakehost
    finally:
        for name in set(sys.modules) - set(saved_modules):
            if name.split(".")[0] in FAKE_TOPS:
                del sys.modules[name]
        sys.modules.update({k: v for k, v in saved_modules.items() if k.split(".")[0] in FAKE_TOPS})
        sys.path[:] = saved_path
