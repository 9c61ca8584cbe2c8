"""Ray metric objects (`ray.util.metrics`) built from the specs in `catversion.telemetry`."""

from __future__ import annotations

from catversion.telemetry import MetricSpec


def ray_metric(spec: MetricSpec):
    from ray.util import metrics

    if spec.kind == "counter":
        return metrics.Counter(spec.name, spec.description, tag_keys=spec.tag_keys)
    if spec.kind == "gauge":
        return metrics.Gauge(spec.name, spec.description, tag_keys=spec.tag_keys)
    if spec.kind == "histogram":
        return metrics.Histogram(spec.name, spec.description, boundaries=list(spec.boundaries), tag_keys=spec.tag_keys)
    raise ValueError(f"metric {spec.name}: unknown kind {spec.kind!r}")
