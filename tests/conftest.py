"""Shared fixtures. Tests never download: tiny random models are built from configs and the
bundled models/data ship in the repository."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core (pytest-xdist): one torch thread each, so
    # the workers don't oversubscribe the cores
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
BUNDLED = ["tiny-mixtral", "tiny-qwen3moe"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT
