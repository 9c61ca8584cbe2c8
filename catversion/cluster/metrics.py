"""Ray metric objects for the `catversion_*` specs of catversion/telemetry.py (Ray imported on first use)."""

from __future__ import annotations

from ..telemetry import MetricSpec


def ray_metric(spec: MetricSpec):
    """The `ray.util.metrics` object for a spec (call it inside a Ray worker, replica or driver)."""
    from ray.util import metrics

    if spec.kind == "counter":
        return metrics.Counter(spec.name, spec.description, tag_keys=spec.tag_keys)
    if spec.kind == "gauge":
        return metrics.Gauge(spec.name, spec.description, tag_keys=spec.tag_keys)
    if spec.kind == "histogram":
        return metrics.Histogram(spec.name, spec.description, boundaries=list(spec.boundaries), tag_keys=spec.tag_keys)
    raise ValueError(f"metric {spec.name}: unknown kind {spec.kind!r}")
