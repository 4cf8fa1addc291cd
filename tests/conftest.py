"""Shared pytest fixtures.

- `tiny_backbone` (session): the tiny random Llama-style model (`TINY_MODEL_ID`) with its
  ChatML tokenizer, built in-process in about 0.1 s. Shared by all tests: do not modify its
  weights, or load your own with `load_backbone(TINY_MODEL_ID)`.
- `smoke_profile` (session): `get_profile("smoke")`.
- `one_thread` (module): torch on one thread while a module runs. Tiny models and heads run
  fastest so, and far faster when other processes share the cores (benchmarks/extraction.py
  measures threads against speed). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`.
- `isolated_cache` (function): points `SRLIB_CACHE_DIR` at a fresh temporary folder and
  returns it, so a test's caches (activations, SAEs, models) start empty and vanish after.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from srlib.backbone import Backbone, load_backbone
from srlib.profiles import TINY_MODEL_ID, Profile, get_profile


@pytest.fixture(scope="session")
def tiny_backbone() -> Backbone:
    return load_backbone(TINY_MODEL_ID, device="cpu")


@pytest.fixture(scope="session")
def smoke_profile() -> Profile:
    return get_profile("smoke")


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "srlib-cache"
    monkeypatch.setenv("SRLIB_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
