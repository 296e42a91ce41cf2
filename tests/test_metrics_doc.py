"""docs/metrics.md lists exactly the metrics cluster/metrics.py defines, with their types and labels."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

import cluster.metrics as metrics_module

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
                for name, _, kind, _ in metrics_module._REPLICA_FAMILIES:
                    found[name] = (kind, ("replica",))
                for name, _, kind, labels in metrics_module._EXPERT_FAMILIES:
                    found[name] = (kind, labels)
                continue
            name = collector._name + SUFFIX.get(collector._type, "")
            found[name] = (collector._type, tuple(collector._labelnames))
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
