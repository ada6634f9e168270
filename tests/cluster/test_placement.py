"""Replicas spread over nodes, and one embedding cache for all of them."""

from __future__ import annotations

import pytest
from biprompt_client import BiPromptClient

from tests.cluster.conftest import all_stats, replica_actors, wait_until
from tests.support.scenes import png_bytes, scene

pytestmark = pytest.mark.cluster


def test_replicas_land_where_placed(app_url, cluster):
    head = cluster.head_node.node_id
    workers = {n.node_id for n in cluster.worker_nodes}
    # after the fault tests a replaced node's replicas may still be starting
    wait_until(lambda: len(replica_actors("TextMask")) == 2, 120, "two TextMask replicas")
    text = replica_actors("TextMask")
    assert len(text) == 2 and {a.node_id for a in text} == workers  # one on each worker
    assert {a.node_id for a in replica_actors("Ingress")} == {head}
    for name in ("ImageEncoder", "PointDecoder", "Selector"):
        assert {a.node_id for a in replica_actors(name)} <= workers, name
    # stats() reports the same node as Ray's state API: the tests below rely on it
    by_id = all_stats("TextMask", 2)
    assert {s["node_id"] for s in by_id.values()} == workers
    assert {s["process"]["pid"] for s in by_id.values()} == {a.pid for a in text}


def test_an_embedding_from_one_node_is_a_cache_hit_on_another(app_url, cluster):
    png = png_bytes(scene(4242))
    before = all_stats("Ingress", 2)
    with BiPromptClient(app_url) as client:
        first = client.segment(png, points=[[60, 50]], text="the box")
        again = [client.segment(png, points=[[20 + 25 * i, 40 + 15 * i]]) for i in range(8)]
    assert not first.cache_hit and all(r.cache_hit for r in again)
    (encoder,) = all_stats("ImageEncoder", 1).values()  # min_replicas 1: idle, one replica
    after = all_stats("Ingress", 2)
    hits = {rid: after[rid]["embedding_lookups"]["hit"] - before[rid]["embedding_lookups"]["hit"]
            for rid in after}
    assert sum(hits.values()) == 8, hits
    # The Ingress replicas answering those hits run on the head; the encoder that wrote the
    # embedding on a worker: each hit was read from Redis across nodes.
    ingress_nodes = {after[rid]["node_id"] for rid, n in hits.items() if n}
    assert encoder["node_id"] != cluster.head_node.node_id
    assert encoder["node_id"] not in ingress_nodes
