"""Pieces of deployments/common.py and deployments/driver.py that need no cluster."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from deployments.common import configure_replica, pack_bits, unpack_bits
from deployments.driver import SERVE_ENV, apply_serve_env


@pytest.mark.parametrize("shape", [(3, 17, 5), (1, 1), (240, 320), (2, 0, 4)])
def test_mask_bits_round_trip(shape):
    masks = np.random.default_rng(0).random(shape) > 0.5
    packed = pack_bits(masks)
    assert packed["bits"].dtype == np.uint8 and packed["bits"].size == -(-masks.size // 8)
    out = unpack_bits(packed)
    assert out.dtype == bool and out.shape == masks.shape
    np.testing.assert_array_equal(out, masks)


class _Batch:
    def __init__(self):
        self.calls = []

    def set_max_batch_size(self, n):
        self.calls.append(("size", n))

    def set_batch_wait_timeout_s(self, s):
        self.calls.append(("wait", s))


def test_configure_replica_sets_batching_and_torch_threads():
    before = torch.get_num_threads()
    batch = _Batch()
    try:
        configure_replica(batch, {"max_batch_size": 4, "batch_wait_timeout_s": 0.0,
                                  "torch_threads": 1})
        assert batch.calls == [("size", 4), ("wait", 0.0)]
        assert torch.get_num_threads() == 1
        configure_replica(batch, {"torch_threads": 0})  # 0: every core
        assert torch.get_num_threads() == (os.cpu_count() or 1)
        configure_replica(batch, None)
    finally:
        torch.set_num_threads(before)


def test_serve_env_defaults_do_not_override_the_user():
    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}
    applied = apply_serve_env(env)
    assert applied["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"
    assert int(env["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"]) >= 1 << 28
    assert set(applied) == set(SERVE_ENV)
    fresh: dict[str, str] = {}
    assert apply_serve_env(fresh)["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
