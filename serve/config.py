"""Serving settings, with defaults, in one place: the app builder, the CLI and the Serve YAML use these."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from catversion.limits import DEFAULT_GUIDANCE, DEFAULT_MODEL, DEFAULT_STEPS


@dataclass
class ServeSettings:
    """Application arguments (the `args:` of an application in a Serve config YAML)."""

    residuals: str  # the batch job's --output PREFIX (its residuals/ folder) or any folder of <concept>.safetensors
    model: str = DEFAULT_MODEL
    device: str = "auto"  # auto: the GPU Ray gave the replica, else CPU
    gpus_per_replica: float = 0.0  # GPUs Ray reserves for each generator replica
    cache_capacity: int = 1024  # residuals kept per replica (~18 KB each for SD1.x)
    max_batch_size: int = 16  # images per UNet batch
    batch_wait_timeout_s: float = 0.05  # how long a batch waits to fill up
    max_queued_requests: int = 256  # images waiting for the generator, per ingress replica; beyond this: 429
    api_key_file: str | None = None  # one key per line; unset = no auth
    max_body_bytes: int = 64 * 1024
    max_n: int = 8
    max_steps: int = 150
    default_steps: int = DEFAULT_STEPS
    default_guidance: float = DEFAULT_GUIDANCE
    max_size: int | None = None  # largest image side in px (default: twice the model's native size)
    models_ttl_s: float = 10.0  # how long GET /v1/models caches the residual listing

    def __post_init__(self) -> None:
        problems = []
        if not self.residuals:
            problems.append("residuals (the prefix holding the residuals) is required")
        for name in ("cache_capacity", "max_batch_size", "max_queued_requests", "max_body_bytes", "max_n", "max_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.default_steps <= self.max_steps:
            problems.append(f"default_steps must be in 1..max_steps ({self.max_steps}), got {self.default_steps}")
        if self.batch_wait_timeout_s < 0:
            problems.append(f"batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s}")
        if problems:
            raise ValueError("invalid serve settings: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict) -> "ServeSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown serve settings {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)
