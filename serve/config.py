"""Serving settings, with defaults, in one place: the app builder, the CLI and the Serve YAML use these."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from catversion.limits import DEFAULT_GUIDANCE, DEFAULT_MODEL, DEFAULT_PRECISION, DEFAULT_STEPS, PRECISION_CHOICES


SCHEDULERS = ("step", "static")
COMPILE_CHOICES = ("auto", "on", "off")
IMAGE_LINKS = ("auto", "endpoint", "presigned")
# The default bound on the work ahead of a request at a generator, in full batches of default requests: one,
# so that a request admitted at saturation waits about one batch's time before it joins
# (benchmarks/serve_overload.py: at twice the capacity, admitted p95 within 2x its p95 at 80 % load).
QUEUED_WORK_BATCHES = 1
REMOVED = {"batch_wait_timeout_s": "step-level batching needs no wait (a request joins the running batch at the next step)"}


@dataclass
class ServeSettings:
    """Application arguments (the `args:` of an application in a Serve config YAML)."""

    residuals: str  # the batch job's --output PREFIX (its residuals/ folder) or any folder of <concept>.safetensors
    model: str = DEFAULT_MODEL  # the default base model: "base" in requests, and the first generator deployment
    # More base models served from the same endpoint (any family), each with its own autoscaled generator deployment
    # ("Generator-<name>"); a concept's request goes to the generator of the base model its residual was trained on
    models: list | None = None
    device: str = "auto"  # auto: the GPU Ray gave the replica, else CPU
    precision: str = DEFAULT_PRECISION  # UNet/VAE: auto (bf16 on a GPU, fp32 on the CPU), fp32, bf16, fp16; the text encoder is always fp32
    compile: str = "auto"  # UNet compiled with a CUDA graph per batch bucket, warmed up before the replica serves; auto: on for CUDA
    gpus_per_replica: float = 0.0  # GPUs Ray reserves for each generator replica
    cache_capacity: int = 1024  # residuals kept per replica (~18 KB each for SD1.x)
    max_batch_size: int = 16  # samples per UNet call (the running batch of one image size); UNet buckets go up to 2x this many rows
    scheduler: str = "step"  # step: samples join and leave the running batch at every denoising step; static: whole batches
    max_queued_requests: int = 256  # images waiting for the generator, per ingress replica; beyond this: 429
    # The most UNet work a generator replica may hold ahead of a new request, in row-steps (each sample's
    # remaining denoising steps, twice for a guided sample's two rows): a request that finds more is refused at
    # once with 429 and Retry-After, so queue wait stays bounded whatever the request's own size. None:
    # QUEUED_WORK_BATCHES full batches of default_steps guided samples.
    max_queued_work: int | None = None
    replica_wait_s: float = 10.0  # longest wait for a warm generator replica to take a request (else 503)
    api_key_file: str | None = None  # one key per line; unset = no auth
    max_body_bytes: int = 64 * 1024
    max_n: int = 8
    max_steps: int = 150
    default_steps: int = DEFAULT_STEPS
    default_guidance: float = DEFAULT_GUIDANCE
    max_size: int | None = None  # largest image side in px (default: twice the model's native size)
    models_ttl_s: float = 10.0  # how long GET /v1/models caches the residual listing
    residual_ttl_s: float = 5.0  # a cached residual is checked against storage (ETag / size+mtime) at most this often
    # A cached residual is served while the check runs in the background; when the store cannot be reached
    # it is served for at most this long since storage last confirmed it, then refused with 503 until it can.
    residual_max_stale_s: float = 300.0
    # Every storage call on a request path (a residual's load or check, the models listing) returns or fails
    # within this many seconds, connect, reads and retries included, whatever the store does; then 503.
    storage_deadline_s: float = 2.0
    images_prefix: str | None = None  # where response_format=url images go: s3://… on a cluster (default: a local temp folder)
    image_links: str = "auto"  # endpoint: this server's signed URLs; presigned: S3 presigned URLs; auto: presigned for s3://
    image_url_ttl_s: float = 3600.0  # how long an image URL works
    url_secret: str | None = None  # signs endpoint image URLs; every ingress replica must share it (build_app draws one)
    public_url: str | None = None  # base of image URLs, e.g. https://images.example.com (default: the request's own host)

    def __post_init__(self) -> None:
        if isinstance(self.compile, bool):  # YAML 1.1 reads a bare on/off as a boolean
            self.compile = "on" if self.compile else "off"
        problems = []
        if not self.residuals:
            problems.append("residuals (the prefix holding the residuals) is required")
        for name in ("cache_capacity", "max_batch_size", "max_queued_requests", "max_body_bytes", "max_n", "max_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queued_work is not None and not self.max_queued_work >= 1:
            problems.append(f"max_queued_work must be >= 1 row-step (or null for the default), got {self.max_queued_work}")
        if not 1 <= self.default_steps <= self.max_steps:
            problems.append(f"default_steps must be in 1..max_steps ({self.max_steps}), got {self.default_steps}")
        if self.scheduler not in SCHEDULERS:
            problems.append(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.precision not in PRECISION_CHOICES:
            problems.append(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {self.precision!r}")
        if self.compile not in COMPILE_CHOICES:
            problems.append(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {self.compile!r}")
        if self.image_links not in IMAGE_LINKS:
            problems.append(f"image_links must be one of {', '.join(IMAGE_LINKS)}, got {self.image_links!r}")
        for name in ("residual_ttl_s", "image_url_ttl_s", "replica_wait_s"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.storage_deadline_s > 0:
            problems.append(f"storage_deadline_s must be > 0, got {self.storage_deadline_s}")
        if not self.residual_max_stale_s >= self.residual_ttl_s:
            problems.append(f"residual_max_stale_s must be >= residual_ttl_s ({self.residual_ttl_s}), "
                            f"got {self.residual_max_stale_s}")
        if self.models is not None:
            if isinstance(self.models, str) or not all(isinstance(m, str) and m for m in self.models):
                problems.append(f"models must be a list of base model names, got {self.models!r}")
            elif len(set(self.base_models)) != len(self.base_models):
                problems.append(f"models must not repeat a base model (nor `model`, {self.model!r}), got {self.models!r}")
        if problems:
            raise ValueError("invalid serve settings: " + "; ".join(problems))

    @property
    def base_models(self) -> list[str]:
        """Every base model served, the default (``model``) first."""
        return [self.model, *(self.models or [])]

    @classmethod
    def from_dict(cls, values: dict) -> "ServeSettings":
        for name, why in REMOVED.items():
            if name in values:
                raise ValueError(f"serve setting {name} was removed: {why}; delete it from the config")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown serve settings {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def queued_work_bound(self) -> int:
        """``max_queued_work``, or its default: QUEUED_WORK_BATCHES full batches of default requests."""
        if self.max_queued_work is not None:
            return self.max_queued_work
        return QUEUED_WORK_BATCHES * self.max_batch_size * 2 * self.default_steps
