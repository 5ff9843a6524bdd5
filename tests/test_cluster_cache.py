"""The API's parsed-cluster cache is bounded in bytes, not only in entries."""

from __future__ import annotations

from pathlib import Path

import yaml

from service.placement.cluster import parse_cluster
from service.placement_service import ClusterCache

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cluster.yaml"


def test_the_cache_evicts_the_oldest_past_its_byte_bound() -> None:
    cluster = parse_cluster(yaml.safe_load(EXAMPLE.read_text()))
    size = len(cluster.model_dump_json())
    cache = ClusterCache(max_entries=64, max_document_bytes=2 * size + size // 2)
    for name in ("a", "b", "c"):
        cache.remember(name, 1, cluster)
    # Two fit in two and a half documents' worth: the first was evicted for the third.
    assert cache.cached_document_bytes() == 2 * size
    assert set(cache._entries) == {"b", "c"}
    cache.remember("b", 2, cluster)  # a rewrite replaces, it does not add
    assert cache.cached_document_bytes() == 2 * size
    tiny = ClusterCache(max_document_bytes=size - 1)
    tiny.remember("a", 1, cluster)
    assert tiny.cached_document_bytes() == 0
