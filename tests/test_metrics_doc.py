"""docs/metrics.md lists exactly the metrics cluster/metrics.py defines, with their types and labels."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

import cluster.metrics as metrics_module
from cluster.engine.protocol import EngineStats, ExpertLoad

DOC = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
SUFFIX = {"counter": "_total"}


def defined_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    found = {}
    for _, cls in inspect.getmembers(metrics_module, inspect.isclass):
        if cls.__module__ != metrics_module.__name__ or not cls.__name__.endswith("Metrics"):
            continue
        registry = CollectorRegistry()
        cls(registry)
        for collector in set(registry._collector_to_names):
            if isinstance(collector, metrics_module.ReplicaLoadCollector):
                found |= collected_families(collector)
                continue
            name = collector._name + SUFFIX.get(collector._type, "")
            found[name] = (collector._type, tuple(collector._labelnames))
    return found


def collected_families(collector) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The families a ReplicaLoadCollector exposes once an expert-parallel replica has reported."""
    load = ExpertLoad(tokens_per_expert_total=[[1, 2]], imbalance=[1.0], rebalances_total=0)
    collector.update([("replica-a", EngineStats(1, 1, 0, 0, 0, 10, kv_blocks_total=8, expert_load=load))])
    found = {}
    for family in collector.collect():
        assert family.samples, f"{family.name} has no sample for a replica that reported every statistic"
        labels = tuple(label for label in family.samples[0].labels)
        found[family.name + SUFFIX.get(family.type, "")] = (family.type, labels)
    return found


def documented_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\|\s*(gptoss_\w+)\s*\|\s*(\w+)\s*\|\s*([^|]*)\|\s*(.+?)\s*\|$", line)
        if m:
            labels = tuple(x.strip() for x in m.group(3).split(",") if x.strip())
            assert m.group(4), f"{m.group(1)} has no meaning in docs/metrics.md"
            rows[m.group(1)] = (m.group(2), labels)
    return rows


def test_metrics_doc_matches_module():
    defined = defined_metrics()
    assert len(defined) >= 14
    assert documented_metrics() == defined
