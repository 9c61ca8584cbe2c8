"""Every `catversion_*` metric, defined once: name, kind, meaning and labels.

Plain data, no Ray: `pipelines/` and `serve/` create Ray metrics from these specs with
`catversion.cluster.ray_metric(spec)`; dashboards and tests import the names from here. Ray's
Prometheus endpoint exports application metrics with a `ray_` prefix (as it does for its own
`ray_serve_*` series), and counters with a `_total` suffix: `catversion_concepts_done` is scraped as
`ray_catversion_concepts_done_total`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()

    @property
    def prometheus_name(self) -> str:
        """The series name as Prometheus scrapes it from Ray's metrics endpoint."""
        suffix = "_total" if self.kind == "counter" else ""
        return f"ray_{self.name}{suffix}"


SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# ---- batch training (pipelines/) ---------------------------------------------------------------
CONCEPTS_DONE = MetricSpec("catversion_concepts_done", "counter", "Concepts whose residual was trained and written", ("run_id",))
CONCEPTS_FAILED = MetricSpec("catversion_concepts_failed", "counter", "Concepts that failed to train", ("run_id",))
CONCEPTS_SKIPPED = MetricSpec(
    "catversion_concepts_skipped", "counter", "Concepts skipped because an identical residual already exists", ("run_id",)
)
TRAIN_STEPS = MetricSpec("catversion_train_steps", "counter", "Optimizer steps, summed over concepts", ("run_id",))
TRAIN_IMAGES_PER_SECOND = MetricSpec(
    "catversion_train_images_per_second", "gauge", "Training rows through the UNet per second, per worker", ("run_id", "worker")
)
CONCEPT_SECONDS = MetricSpec(
    "catversion_concept_train_seconds", "histogram", "Wall time to train one concept", ("run_id",), SECONDS_BUCKETS
)

# ---- serving (serve/) ----------------------------------------------------------------------------
# `status` is the HTTP status sent ("200", "429", …), or ABANDONED for a request whose client went away
# before its answer was complete (a closed connection, a stream read no further): neither a success nor an error.
ABANDONED = "abandoned"
REQUESTS = MetricSpec("catversion_requests", "counter",
                      f"HTTP generation requests by route and status (the HTTP status, or '{ABANDONED}': the client left "
                      "first)", ("route", "status"))
REQUEST_SECONDS = MetricSpec(
    "catversion_request_seconds", "histogram",
    f"Request latency by route and status (a stream: until its last event; '{ABANDONED}': until the client left)",
    ("route", "status"), SECONDS_BUCKETS
)
IMAGES = MetricSpec("catversion_images_generated", "counter", "Images generated (finished samples)")
QUEUE_WAIT_SECONDS = MetricSpec(
    "catversion_queue_wait_seconds", "histogram", "Wait of a sample from its arrival at the generator to its first UNet step",
    (), (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
)
UNET_STEP_SECONDS = MetricSpec(
    "catversion_unet_step_seconds", "histogram", "Time of one denoising step of the running batch (one UNet call)",
    (), (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
)
BATCH_SIZE = MetricSpec(
    "catversion_batch_size", "histogram", "Running-batch occupancy: samples in each UNet call of the generator", (),
    (1, 2, 4, 8, 16, 32, 64)
)
CACHE_HITS = MetricSpec("catversion_residual_cache_hits", "counter", "Residual cache hits")
CACHE_MISSES = MetricSpec("catversion_residual_cache_misses", "counter", "Residual cache misses (loads from storage)")
RESIDUAL_LOAD_SECONDS = MetricSpec(
    "catversion_residual_load_seconds", "histogram", "Time to fetch and verify a residual", (), SECONDS_BUCKETS
)
CACHE_SIZE = MetricSpec("catversion_residual_cache_size", "gauge", "Residuals held in a generator replica's cache", ("replica",))
CACHE_EVICTIONS = MetricSpec("catversion_residual_cache_evictions", "counter", "Residuals evicted from the cache (LRU)")
CACHE_REVALIDATIONS = MetricSpec(
    "catversion_residual_revalidations", "counter",
    "Checks of a cached residual against storage, by result: unchanged, changed, deleted, invalid, unreachable", ("result",)
)

ALL_METRICS = (
    CONCEPTS_DONE, CONCEPTS_FAILED, CONCEPTS_SKIPPED, TRAIN_STEPS, TRAIN_IMAGES_PER_SECOND, CONCEPT_SECONDS,
    REQUESTS, REQUEST_SECONDS, IMAGES, QUEUE_WAIT_SECONDS, UNET_STEP_SECONDS, BATCH_SIZE, CACHE_HITS, CACHE_MISSES,
    RESIDUAL_LOAD_SECONDS, CACHE_SIZE, CACHE_EVICTIONS, CACHE_REVALIDATIONS,
)
