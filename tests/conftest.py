"""Shared fixtures. Nothing here downloads: the hub is forced offline for every test."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import biprompt  # noqa: E402,F401  (registers torchvision/timm stand-ins before segment_anything)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("BIPROMPT_CACHE", str(tmp_path_factory.getbasetemp() / "weights-cache"))


@pytest.fixture(scope="session")
def tiny_pipeline():
    from biprompt.pipeline import BiPromptPipeline

    return BiPromptPipeline.from_config("configs/models/tiny.yaml")


@pytest.fixture
def rgb_image():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(240, 320, 3), dtype=np.uint8)
    img[60:140, 100:200] = (220, 50, 50)
    return img


@pytest.fixture
def redis_server():
    """A fresh redis-server on a free port, killed after the test."""
    from tests.support.redis_server import RedisServer

    with RedisServer() as server:
        yield server


CLUSTER_TIER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cluster")


def pytest_ignore_collect(collection_path, config):
    """tests/cluster runs only when named on the command line (`pytest tests/cluster`, as
    `make test` does after the rest): it starts a multi-node Ray cluster, and one process holds
    one Ray connection, the integration tier's single-node one included."""
    if str(collection_path) != CLUSTER_TIER:
        return None
    named = [os.path.abspath(str(a).split("::")[0]) for a in config.args]
    return not any(a == CLUSTER_TIER or a.startswith(CLUSTER_TIER + os.sep) for a in named)
