"""The Ray Serve application: an OpenAI-Images-compatible HTTP ingress and a step-batching generator per base model.

`Generator` loads the frozen base model once per replica (UNet/VAE in the `precision` setting) and runs
a `StepBatcher` (catversion/stepbatch.py) on a thread of its own: every sample of any concept, step count
or guidance joins the running UNet batch at the next denoising step and leaves when it is done (only
image sizes run apart). That thread first warms up (with `compile`, the UNet is compiled and a CUDA
graph recorded per batch bucket) and the replica's health check waits for it, so a replica gets
requests only once it is warm. Residuals come from a `ResidualCache` that revalidates them against
storage. `Ingress` (FastAPI) checks the API key and the body size before anything else, validates
requests, fans a request's n images out to the generator and speaks OpenAI's request, response,
streaming (SSE) and error formats. `build_app(args)` is the Serve config YAML entry point.

Several base models (any family: SD 1.x, 2.x, XL) can be served from one endpoint: the settings' ``model`` and
``models`` each get a generator deployment of their own (autoscaled on its own), and the ingress sends a concept's
request to the generator of the base model its residual was trained on (`match_base`: the text encoders'
fingerprint, else the base model's name, else the residual's shape); "base" is the default base model,
"base:<model>" another one. docs/families.md, "Serving several base models".
"""


import asyncio
import base64
import contextvars
import hmac
import json
import logging
import math
import os
import re
import secrets
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.exceptions import ReplicaUnavailableError as RayReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from catversion import __version__, layout, limits, storage, telemetry
from catversion.cluster import ray_metric

from .cache import LISTING_DEADLINE_S, CacheEvents, ListingUnavailableError, ModelListing, ResidualCache
from .autoscaling import DEMAND_POLICY, SHED_DEMAND, ShedDemand
from .config import ServeSettings
from .errors import (GenerationFailedError, GeneratorUnavailableError, InvalidParameterError, OverloadedError,
                     RequestError, ServiceUnavailableError, UnknownConceptError, UnusableResidualError, openai_error,
                     request_error)
from .images import MEDIA_TYPES, ImageNotFoundError, ImageStore, encode_image

logger = logging.getLogger("catversion.serve")
replica_logger = logging.getLogger("ray.serve")  # Serve writes it (at INFO) to each replica's log file

BASE_MODEL_ID = "base"
MAX_SEED = 2**32 - 1  # OpenAI-style clients send 32-bit seeds; image i of a request uses seed + i
GENERATIONS = "/v1/images/generations"
# OpenAI fields that do not change a Stable Diffusion image: accepted and ignored.
IGNORED_FIELDS = ("quality", "style", "user", "moderation", "safety_identifier", "complexity")
# OpenAI fields that would change the result and that this server cannot honour: 400 when set.
UNSUPPORTED_FIELDS = {"svg": "SVG output is not supported", "frame_count": "GIF output is not supported",
                      "frame_duration_ms": "GIF output is not supported"}
GENERATOR_DEPLOYMENT = "Generator"  # the default base model's deployment: its class's name (others: "Generator-<model>")
GENERATOR_MAX_ONGOING = 4096  # requests a generator replica takes at once: its own work bound refuses sooner
# A denoising step that has not finished after this long fails the generator's health check: a UNet call
# that hangs. Far above any real step (SD1.5 on a CPU with a full batch takes tens of seconds).
STALL_LIMIT_S = 300.0
READINESS_TTL_S = 1.0  # readiness asks Serve's controller at most this often (probes are open to anyone)
# Ray's errors for a call whose generator replica is gone (killed, crashed, its node lost) or cannot be
# reached: the call may go again, to another replica.
REPLICA_GONE = (RayActorError, RayReplicaUnavailableError)
# The request id of the request being answered: Serve's proxy puts it in the x-request-id header and sends
# it back as X-Request-ID; a 500's message and the log line with its traceback both carry it.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("catversion_request_id", default="-")


def current_request_id() -> str:
    """The id of the request being answered ("-" outside one). Serve pickles the Ingress class by value,
    and a ContextVar cannot be pickled: its methods read the id through this function."""
    return request_id.get()


# ---- the OpenAI wire format -------------------------------------------------------------------


class ImageGenerationRequest(BaseModel):
    """`POST /v1/images/generations`: OpenAI's fields plus catversion's extensions."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, never silently ignored

    model: str = Field(BASE_MODEL_ID, max_length=256,
                       description='a concept id from GET /v1/models, "<concept id>@<sha256 prefix>" to pin a version, '
                                   'or "base" for the plain (default) base model, "base:<model>" for another served one')
    prompt: str = Field(..., min_length=1, max_length=4000, description="use the concept's class word, e.g. 'a teapot on a beach'")
    n: int | None = Field(1, ge=1, description="number of images (up to the server's max_n)")
    size: str | None = Field("auto", max_length=32,
                             description="'WIDTHxHEIGHT' (each a multiple of the model's size step) or 'auto' (native size)")
    response_format: Literal["b64_json", "url"] | None = Field(
        "b64_json", description="'url' links to the stored image for image_url_ttl_s")
    output_format: Literal["png", "jpeg", "webp"] | None = Field("png", description="gif and svg are not supported")
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp compression in percent (png: ignored)")
    background: Literal["auto", "opaque"] | None = Field(
        "auto", description="images are always opaque: 'transparent' is not supported")
    stream: bool | None = Field(False, description="server-sent events: partial images, then image_generation.completed (n = 1)")
    partial_images: int | None = Field(0, ge=0, le=3, description="previews sent while streaming")
    quality: str | None = Field(None, max_length=64, description="accepted and ignored")
    style: str | None = Field(None, max_length=64, description="accepted and ignored")
    user: str | None = Field(None, max_length=256, description="accepted and ignored")
    moderation: str | None = Field(None, max_length=64, description="accepted and ignored")
    safety_identifier: str | None = Field(None, max_length=256, description="accepted and ignored")
    complexity: str | None = Field(None, max_length=64, description="accepted and ignored")
    svg: dict | None = Field(None, description="not supported: 400 when set")
    frame_count: int | None = Field(None, description="not supported (GIF): 400 when set")
    frame_duration_ms: int | None = Field(None, description="not supported (GIF): 400 when set")
    negative_prompt: str | None = Field("", max_length=4000, description="encoded without the residual")
    num_inference_steps: int | None = Field(None, ge=1, description=f"DDIM steps (default {limits.DEFAULT_STEPS})")
    guidance_scale: float | None = Field(None, ge=0.0, le=limits.MAX_GUIDANCE,
                                         description=f"classifier-free guidance (default {limits.DEFAULT_GUIDANCE:g})")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="seed of the first image; image i uses seed + i")
    residual_scale: float | None = Field(1.0, ge=0.0, le=limits.MAX_RESIDUAL_SCALE,
                                         description="strength of the concept's residual; 0 = off")


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: Literal["opaque"]
    output_format: Literal["png", "jpeg", "webp"]
    size: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ModelObject(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelObject]


def _errors(*statuses: int) -> dict:
    return {status: {"model": ErrorBody, "description": ERROR_MEANINGS[status]} for status in statuses}


ERROR_MEANINGS = {400: "invalid request", 401: "missing or invalid API key", 404: "unknown model, route or image",
                  413: "request body too large", 422: "the concept's residual cannot be used", 429: "at capacity",
                  503: "residual store unreachable, or no warm generator replica"}


def error_response(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None) -> JSONResponse:
    """An error the HTTP layer itself decides (auth, body size, schema, routes), in OpenAI's body; one log line."""
    replica_logger.info("request %s: %d %s: %s", current_request_id(), status, code, message)
    return JSONResponse(openai_error(message, type_=type_, code=code, param=param), status_code=status)


def request_error_response(error: RequestError) -> JSONResponse:
    """A request's error as a JSON response: its status, `RequestError.body()` (the body a stream's error
    event carries too) and Retry-After when the error has one. One log line: INFO for a client's error,
    WARNING for a 5xx (a 500's traceback was logged where it was caught, by `unexpected`)."""
    if error.status != 500:
        log = replica_logger.info if error.status < 500 else replica_logger.warning
        log("request %s: %d %s: %s", current_request_id(), error.status, error.code, error.message)
    headers = None if error.retry_after_s is None else {"Retry-After": str(max(1, math.ceil(error.retry_after_s)))}
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def unexpected(exc: BaseException, doing: str) -> GenerationFailedError:
    """A 500 for a failure that is no request's own: logged once, with its traceback and the request id,
    which the client's message names too, so that a report leads to the log line."""
    replica_logger.error("request %s: unexpected failure %s", current_request_id(), doing, exc_info=exc)
    return GenerationFailedError(f"the server failed {doing}; retry, or report request id {current_request_id()}")


def as_request_error(exc: BaseException, doing: str) -> RequestError:
    """What a failure is answered with: a request's own error as it is (also when Ray wrapped it); Ray's
    backpressure 429; no generator replica (none running, its replica gone, none in replica_wait_s) 503; the
    store unreachable 503; anything else a logged 500 (`unexpected`)."""
    if isinstance(exc, BackPressureError):
        return OverloadedError("the server is at capacity; retry shortly", retry_after_s=exc.retry_after_s)
    if isinstance(exc, (*REPLICA_GONE, DeploymentUnavailableError, TimeoutError)):
        replica_logger.warning("request %s: no generator replica %s: %r", current_request_id(), doing, exc)
        return GeneratorUnavailableError("no generator replica is available (one is starting or being replaced); "
                                         "retry after the Retry-After seconds")
    if isinstance(exc, storage.StorageError):
        replica_logger.warning("request %s: storage unreachable %s: %s", current_request_id(), doing, exc)
        return ServiceUnavailableError("the storage is unreachable; retry shortly")
    return request_error(exc) or unexpected(exc, doing)


def read_keys(path: str | None) -> list[bytes]:
    """API keys from a key file: one per line; blank lines and `#` comments (after any indent) are skipped."""
    if not path:
        return []
    keys = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if not key.isascii() or any(c.isspace() for c in key):
            raise ValueError(f"api key file {path}, line {number}: a key is one word of ASCII characters "
                             "(put comments on lines of their own, starting with #)")
        keys.append(key.encode("ascii"))
    if not keys:
        raise ValueError(f"api key file {path} has no keys (one per line)")
    return keys


# ---- the generator -----------------------------------------------------------------------------


class _CacheMetrics(CacheEvents):
    def __init__(self, replica: str):
        self.replica = replica
        self._hits, self._misses, self._load, self._size, self._evictions, self._revalidations = (
            ray_metric(spec) for spec in (telemetry.CACHE_HITS, telemetry.CACHE_MISSES, telemetry.RESIDUAL_LOAD_SECONDS,
                                          telemetry.CACHE_SIZE, telemetry.CACHE_EVICTIONS, telemetry.CACHE_REVALIDATIONS))

    def hit(self) -> None:
        self._hits.inc()

    def miss(self, seconds: float) -> None:
        self._misses.inc()
        self._load.observe(seconds)

    def eviction(self) -> None:
        self._evictions.inc()

    def revalidation(self, result: str) -> None:
        self._revalidations.inc(1, {"result": result})

    def size(self, entries: int) -> None:
        self._size.set(entries, {"replica": self.replica})


# max_ongoing_requests is high because the generator bounds its own queue, by work (max_queued_work): a
# request waiting in Serve's router instead would be neither admitted nor refused. health_check_period_s
# is short so that Serve (and readiness, which asks Serve) learns of a dead or stalled replica within seconds.
@serve.deployment(max_ongoing_requests=GENERATOR_MAX_ONGOING, health_check_period_s=2.0,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 16,
                                      "policy": {"policy_function": DEMAND_POLICY}})
class Generator:
    """One frozen base model per replica, one step-level running batch, residuals from a fresh cache.

    ``model``: the base model this deployment serves (default: the settings' ``model``)."""

    def __init__(self, settings: dict, model: str | None = None):
        from catversion.generation import ImageGenerator
        from catversion.models import load_base_model, resolve_device
        from catversion.stepbatch import StepBatcher
        from catversion.unetrun import buckets_for

        self.settings = ServeSettings.from_dict(settings)
        device = resolve_device(self.settings.device)
        self.base = load_base_model(model or self.settings.model, device=device, precision=self.settings.precision)
        compile_unet = self.settings.compile == "on" or (self.settings.compile == "auto" and device.type == "cuda")
        self.images = ImageGenerator(self.base, compile=compile_unet, buckets=buckets_for(self.settings.max_batch_size))
        step_seconds, occupancy, wait = (ray_metric(s) for s in (telemetry.UNET_STEP_SECONDS, telemetry.BATCH_SIZE,
                                                                 telemetry.QUEUE_WAIT_SECONDS))
        self.generated = ray_metric(telemetry.IMAGES)

        def on_unet_step(seconds: float, samples: int, size: tuple[int, int]) -> None:
            step_seconds.observe(seconds)
            occupancy.observe(samples)

        self.batcher = StepBatcher(self.images, self.settings.max_batch_size, mode=self.settings.scheduler,
                                   on_unet_step=on_unet_step, on_start=wait.observe)
        self._stop = threading.Event()
        self._ready = threading.Event()  # set when the warm-up has ended, well or not
        self._warm_up_error: BaseException | None = None
        self.warm_up_seconds: float | None = None
        self._shed = ShedDemand()
        self._stepper = threading.Thread(target=self._steps, name="catversion-steps", daemon=True)
        self._stepper.start()
        encoder = self.images.encoder
        try:
            replica = serve.get_replica_context().replica_tag
        except Exception:  # outside a Serve replica (direct construction)
            replica = "local"
        self.cache = ResidualCache(
            self.settings.residuals, self.settings.cache_capacity, ttl_s=self.settings.residual_ttl_s,
            max_stale_s=self.settings.residual_max_stale_s, budget=storage.deadline(self.settings.storage_deadline_s),
            check=lambda r: r.check_compatible(self.base.text_encoders, fingerprint=self.base.fingerprint,
                                               layers=encoder.layer_sets, tokens=encoder.tokens,
                                               base_model=self.base.model_id, family=self.base.family.name),
            events=_CacheMetrics(replica),
        )

    def __del__(self):
        self._stop.set()

    def _steps(self) -> None:
        """The stepping thread: warm up here (CUDA graphs belong to the thread that recorded them), then
        step. Jobs submitted meanwhile wait in the batcher's queue."""
        runner = self.images.unet_runner
        try:
            seconds = self.batcher.warm_up()
        except BaseException as exc:
            logger.exception("generator warm-up failed")
            self._warm_up_error = exc
            self._ready.set()
            return
        self.warm_up_seconds = seconds
        unet = f"compiled for row buckets {list(runner.buckets)}" if runner.compiled else "eager"
        replica_logger.info("generator warmed up in %.1f s (UNet %s, %s, on %s)", seconds, unet, self.base.precision,
                            self.base.device)
        self._ready.set()
        self.batcher.run(self._stop)

    async def check_health(self) -> None:
        """Ray Serve's probe (liveness, every health_check_period_s). A new replica counts as started (and
        gets requests) only once its first check passes, so this waits for the warm-up; a failed warm-up, a
        stepping thread that has ended or a denoising step that hangs fails it, and Serve replaces the replica."""
        while not self._ready.is_set():
            await asyncio.sleep(0.1)
        if self._warm_up_error is not None:
            raise RuntimeError(f"the generator's warm-up failed: {self._warm_up_error!r}")
        if not self._stepper.is_alive():
            raise RuntimeError("the generator's stepping thread has ended")
        stalled = self.batcher.stalled_s()
        if stalled > STALL_LIMIT_S:
            raise RuntimeError(f"no denoising step has finished for {stalled:.0f} s although samples wait (a UNet call hangs)")

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics, read by serve/autoscaling.py: the demand this replica shed."""
        return {SHED_DEMAND: self._shed.demand()}

    def info(self) -> dict:
        runner = self.images.unet_runner
        patch = [[name, list(layers), tokens, width] for name, layers, tokens, width in self.images.encoder.patch]
        return {"model": self.base.model_id, "family": self.base.family.name, "fingerprint": self.base.fingerprint,
                "patch": patch, "resolution": self.base.resolution, "size_multiple": self.images.size_multiple,
                "device": str(self.base.device), "precision": self.base.precision, "compiled": runner.compiled,
                "unet_buckets": list(runner.buckets), "warm_up_seconds": self.warm_up_seconds, "pid": os.getpid()}

    async def model(self, model: str) -> dict:
        """``describe`` for the ingress: {"model": its metadata} or {"error": RequestError}. The error is a value,
        not raised: Serve logs a raised one as a failed request with its traceback, and a 404 is no failure."""
        try:
            return {"model": await self.describe(model)}
        except RequestError as exc:
            return {"error": exc}

    async def describe(self, model: str) -> dict:
        """Metadata of a concept's residual, checked against storage now (within storage_deadline_s; a cached
        copy when the store cannot answer); raises a RequestError."""
        residual = await asyncio.to_thread(self.cache.revalidate, model)
        keys = ("class_word", "caption", "base_model", "steps", "final_loss")
        return {**{k: residual.meta.get(k) for k in keys}, "base_model": self.base.model_id,
                "base_family": self.base.family.name, "trained_on": residual.meta.get("base_model"),
                "sha256": residual.sha256}

    async def generate_stream(self, item: dict):
        """{"kind": "accepted"}, then {"kind": "partial", "index", "image"} previews, then {"kind": "done", …};
        this request's own problem ends it with {"kind": "error", "error": RequestError} (a value: see ``model``)."""
        try:
            async for event in self._events(item):
                yield event
        except RequestError as exc:
            yield {"kind": "error", "error": exc}

    async def _events(self, item: dict):
        from catversion.images import to_pil
        from catversion.residual import IncompatibleResidualError
        from catversion.stepbatch import Job, QueueFull

        residual = None
        if not is_base(item["model"]):
            residual = await asyncio.to_thread(self.cache.get, item["model"])
        job = Job(prompt=item["prompt"], residual=residual, seed=item["seed"], residual_scale=item["residual_scale"],
                  negative_prompt=item["negative_prompt"], steps=item["steps"], guidance=item["guidance"],
                  height=item["height"], width=item["width"], partial_images=item["partial_images"])
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(*event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        if self._warm_up_error is not None:
            raise RuntimeError(f"the generator's warm-up failed: {self._warm_up_error!r}")
        # The bound is on the work ahead of an image; a request's earlier images do not count against its later
        # ones, so that a request of n images is admitted (or refused) as one would be.
        siblings_ahead = item.get("index", 0) * item["steps"] * (1 if item["guidance"] == 1.0 else 2)
        try:
            ticket = self.batcher.submit(job, on_done=lambda image: put("done", image),
                                         on_partial=lambda index, image: put("partial", index, image),
                                         on_error=lambda exc: put("error", exc),
                                         max_work=self.settings.queued_work_bound + siblings_ahead)
        except IncompatibleResidualError as exc:
            raise UnusableResidualError(f"model {item['model']!r} cannot be used: {exc}") from None
        except ValueError as exc:  # validated at the ingress; kept as this request's error, never a crash
            raise InvalidParameterError(str(exc)) from None
        except QueueFull as exc:
            self._shed.shed()
            raise OverloadedError("the server has more work queued than it can start soon; retry after the Retry-After "
                                  "seconds", retry_after_s=exc.retry_after_s) from None
        yield {"kind": "accepted"}
        try:
            while True:
                kind, *rest = await events.get()
                if kind == "error":
                    raise rest[0]
                image = await asyncio.to_thread(encode_image, to_pil(rest[-1].unsqueeze(0))[0], item["output_format"],
                                                item["output_compression"])
                if kind == "partial":
                    yield {"kind": "partial", "index": rest[0], "image": image}
                else:
                    self.generated.inc()
                    self._shed.served(time.monotonic() - ticket.submitted_at)
                    yield {"kind": "done", "image": image, "seed": item["seed"]}
                    return
        finally:
            if not ticket.done:
                ticket.cancel()  # the client went away: the sample leaves the running batch at the next step


# ---- base models: naming their generators, and routing a residual to one -----------------------


def is_base(model: str) -> bool:
    """Whether a request's model is a plain base model: "base" (the default) or "base:<model>"."""
    return model == BASE_MODEL_ID or model.startswith(BASE_MODEL_ID + ":")


def generator_names(settings: ServeSettings) -> list[str]:
    """The generator deployment of each base model served (settings.base_models' order): "Generator" for the
    default one, "Generator-<model>" for the others (a folder's last part; unique)."""
    names = [GENERATOR_DEPLOYMENT]
    for model in settings.base_models[1:]:
        slug = re.sub(r"[^a-z0-9]+", "-", os.path.basename(model.rstrip("/\\")).lower()).strip("-")[:40] or "model"
        name, n = f"{GENERATOR_DEPLOYMENT}-{slug}", 2
        while name in names:
            name, n = f"{GENERATOR_DEPLOYMENT}-{slug}-{n}", n + 1
        names.append(name)
    return names


def match_base(meta: dict, patch: list, infos: list[dict]) -> int | None:
    """Which served base model (its generator's ``info()``) a residual with this metadata and ``patch`` belongs
    to: the one whose text encoders' fingerprint it records, else (no fingerprint recorded) the one it names, else
    (neither: imported from the reference code, say) the first of its family whose patched encoders take its
    shape; None when none does."""
    recorded = meta.get("base_fingerprint")
    if recorded:
        return next((i for i, info in enumerate(infos) if info["fingerprint"] == recorded), None)
    named = meta.get("base_model")
    if named:
        return next((i for i, info in enumerate(infos) if info["model"] == named), None)
    family = meta.get("base_family")
    shape = [[name, list(layers), tokens, width] for name, layers, tokens, width in patch]
    return next((i for i, info in enumerate(infos)
                 if info["patch"] == shape and family in (None, info["family"])), None)


# ---- the HTTP ingress --------------------------------------------------------------------------


async def _result(response) -> Any:
    """A Serve DeploymentResponse awaited in a coroutine (what asyncio.wait_for takes)."""
    return await response


api = FastAPI(
    title="catversion",
    version=__version__,
    description="OpenAI-Images-compatible generation with CatVersion residuals: `model` is a concept id or \"base\". "
                "Send `Authorization: Bearer KEY` when the server has API keys.",
)
bearer = HTTPBearer(auto_error=False, description="an API key from the server's api_key_file (when it has one)")


class _Guard:
    """ASGI middleware: the API key, then the body size, both before the app sees the request; and the
    last word on errors, so that no route answers in plain text.

    The body is read here as it arrives, counted chunk by chunk (Content-Length or chunked), and
    refused with 413 as soon as it passes the limit; the app then reads the buffered copy. An exception
    that leaves the app before its response began is answered here in OpenAI's body (`as_request_error`:
    a 500 carries the request id its log line carries). Serve freezes a copy of the FastAPI app at
    import, so the middleware is registered here and its settings are class attributes that each
    Ingress replica sets.
    """

    max_bytes = ServeSettings.__dataclass_fields__["max_body_bytes"].default
    keys: list[bytes] = []
    OPEN = ("/healthz", "/livez", "/readyz", "/docs", "/redoc", "/openapi.json", "/v1/images/files/")

    def __init__(self, app):
        self.app = app

    def _authorized(self, scope) -> bool:
        if not self.keys or scope["path"].startswith(self.OPEN) or not scope["path"].startswith("/v1/"):
            return True
        header = next((value for name, value in scope.get("headers", []) if name == b"authorization"), b"")
        if header[:7].lower() != b"bearer ":
            return False
        token = header[7:].strip()
        return any(hmac.compare_digest(token, key) for key in self.keys)

    def _too_large(self) -> JSONResponse:
        return error_response(413, f"request body is larger than the limit of {self.max_bytes} bytes",
                              code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = next((value for name, value in scope.get("headers", []) if name == b"x-request-id"), None)
        request_id.set(header.decode("latin-1") if header else uuid.uuid4().hex)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._checked(scope, receive, tracked)
        except Exception as exc:
            error = as_request_error(exc, f"answering {scope['method']} {scope['path']}")
            if not started:  # after the status line nothing can be said any more: the log line is all
                await request_error_response(error)(scope, receive, send)

    async def _checked(self, scope, receive, send):
        if not self._authorized(scope):
            response = error_response(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                                      code="invalid_api_key")
            return await response(scope, receive, send)
        length = next((value for name, value in scope.get("headers", []) if name == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await (self._too_large() if length.isdigit() else error_response(
                400, "Content-Length is not a number", code="invalid_value"))(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                return await self._too_large()(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the disconnect, as the app expects
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


api.add_middleware(_Guard)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", []) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        message = f"unknown field {param!r}; the supported fields are listed in the OpenAPI schema (/docs)"
    else:
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request body")
    return error_response(400, message, param=param, code="invalid_value")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = "not_found" if exc.status_code == 404 else None
    return error_response(exc.status_code, str(exc.detail), code=code)


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    def __init__(self, generator, settings: dict, *more_generators):
        self.generator = generator  # the default base model's
        self.generators = [generator, *more_generators]  # one per base model, settings.base_models' order
        self.settings = s = ServeSettings.from_dict(settings)
        self._names = generator_names(s)
        _Guard.keys = read_keys(s.api_key_file)
        _Guard.max_bytes = s.max_body_bytes
        prefix = s.images_prefix or str(Path(tempfile.gettempdir()) / "catversion-images")
        secret = (s.url_secret or secrets.token_hex(32)).encode()
        self.stored = ImageStore(prefix, ttl_s=s.image_url_ttl_s, secret=secret, links=s.image_links)
        self._info: list[dict | None] = [None] * len(self.generators)
        self._info_lock = asyncio.Lock()
        # With several base models, the ingress reads a concept's residual (cached, revalidated like a generator's)
        # to know which generator it goes to.
        self._residuals = (ResidualCache(s.residuals, s.cache_capacity, lambda r: None, ttl_s=s.residual_ttl_s,
                                         max_stale_s=s.residual_max_stale_s, budget=storage.deadline(s.storage_deadline_s))
                           if len(self.generators) > 1 else None)
        self._models = ModelListing(lambda: layout.list_concepts(s.residuals, budget=storage.deadline(LISTING_DEADLINE_S)),
                                    ttl_s=s.models_ttl_s, wait_s=s.storage_deadline_s)
        self.requests = ray_metric(telemetry.REQUESTS)
        self.latency = ray_metric(telemetry.REQUEST_SECONDS)
        self._app = serve.get_replica_context().app_name
        self._readiness: tuple[float, int] = (-math.inf, 0)  # (when asked, warm generator replicas then)
        self._readiness_lock = asyncio.Lock()

    async def _model_info(self, generator: int = 0) -> dict:
        async with self._info_lock:  # one call in flight, not one per request of the first burst
            if self._info[generator] is None:
                self._info[generator] = await self._call("info", generator=generator)
        return self._info[generator]

    async def _route(self, model: str) -> int:
        """The generator (index) that serves ``model``: "base" the default base model, "base:<model>" that one, a
        concept the base model its residual was trained on. A RequestError when there is none."""
        served = self.settings.base_models
        if model == BASE_MODEL_ID:
            return 0
        if model.startswith(BASE_MODEL_ID + ":"):
            name = model[len(BASE_MODEL_ID) + 1:]
            for index in range(len(served)):
                if name in (served[index], (await self._model_info(index))["model"]):
                    return index
            raise UnknownConceptError(f"base model {name!r} is not served here; served: {', '.join(served)}")
        if self._residuals is None:
            return 0
        residual = await asyncio.to_thread(self._residuals.get, model)
        infos = [await self._model_info(index) for index in range(len(served))]
        index = match_base(residual.meta, residual.patch, infos)
        if index is None:
            trained = residual.meta.get("base_model") or "an unrecorded base model"
            family = residual.meta.get("base_family")
            offered = ", ".join(f"{info['model']} ({info['family']})" for info in infos)
            raise UnusableResidualError(
                f"model {model!r} was trained on {trained}{f' ({family})' if family else ''}, which this server does "
                f"not serve (it serves {offered}): serve that base model too, or retrain the concept on one of these")
        return index

    async def _call(self, method: str, *args, generator: int = 0) -> Any:
        """A generator method's result within replica_wait_s (TimeoutError after it), called again once
        when its replica is gone (Serve routes the second call to a live replica)."""
        for attempt in (1, 2):
            response = getattr(self.generators[generator], method).remote(*args)
            try:
                return await asyncio.wait_for(_result(response), self.settings.replica_wait_s)
            except REPLICA_GONE as exc:
                if attempt == 2:
                    raise
                replica_logger.warning("request %s: the generator replica of %s() is gone (%r); calling another",
                                       current_request_id(), method, exc)
            except TimeoutError:
                response.cancel()
                raise

    async def _image_events(self, item: dict):
        """One image's events from a generator replica: accepted, its previews, done; a request's own
        problem is raised as its RequestError.

        The first event must come within replica_wait_s (TimeoutError: no replica took the request). A
        replica that dies before a preview or the image has been passed on is replaced once: the call goes
        again, to a live replica, and makes the same image (its seed is fixed in ``item``). Closing this
        generator (the client went away) cancels the call, and the sample leaves the running batch."""
        passed_on = accepted = False
        for attempt in (1, 2):
            stream = self.generators[item.get("generator", 0)].options(stream=True).generate_stream.remote(item)
            done = False
            try:
                event = await asyncio.wait_for(anext(stream), self.settings.replica_wait_s)
                while not done:
                    if event["kind"] == "error":
                        raise event["error"]
                    done = event["kind"] == "done"
                    if event["kind"] != "accepted" or not accepted:
                        passed_on, accepted = passed_on or event["kind"] != "accepted", True
                        yield event
                    if not done:
                        event = await anext(stream)
                return
            except REPLICA_GONE as exc:
                if passed_on or attempt == 2:
                    raise
                replica_logger.warning("request %s: its generator replica is gone (%r); sending it to another",
                                       current_request_id(), exc)
            finally:
                if not done:
                    stream.cancel()

    async def _images(self, items: list[dict]) -> list[dict]:
        """Every item's finished image ({"image", "seed"}); when one fails, the others are cancelled."""
        async def image(item: dict) -> dict:
            return [event async for event in self._image_events(item)][-1]  # it ends with "done" or raises

        tasks = [asyncio.ensure_future(image(item)) for item in items]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # after a failure (one image refused, say) or a cancellation; done ones ignore it
                task.cancel()

    async def _not_ready(self) -> str | None:
        """Why the service cannot make images now, or None: readiness is a warm generator replica. Serve's
        controller counts a generator replica RUNNING only once its health check has passed (after its
        warm-up) and stops counting it when a check fails or its process dies (health_check_period_s)."""
        async with self._readiness_lock:
            asked, running = self._readiness
            if time.monotonic() - asked > READINESS_TTL_S:
                running = await asyncio.to_thread(self._warm_generators)
                self._readiness = (time.monotonic(), running)
        return None if running else ("no generator replica is warm (one is starting, warming up or being replaced); "
                                     "retry after the Retry-After seconds")

    def _warm_generators(self) -> int:
        """Warm replicas of the least-warm generator deployment (ready = every base model can be served)."""
        application = serve.status().applications.get(self._app)
        counts = []
        for name in self._names:
            deployment = application.deployments.get(name) if application else None
            counts.append(deployment.replica_states.get("RUNNING", 0) if deployment else 0)
        return min(counts)

    async def _concepts(self) -> list[str]:
        """The concept ids: the last good listing at once; ListingUnavailableError (503) only before the first."""
        return await self._models.get()

    def _record(self, started: float, status: int | str) -> None:
        """Count a generation request: its HTTP status, or telemetry.ABANDONED when its client left first."""
        labels = {"route": GENERATIONS, "status": str(status)}
        self.requests.inc(1, labels)
        self.latency.observe(time.perf_counter() - started, labels)

    @api.get("/livez")
    async def livez(self) -> dict:
        """Liveness: this ingress replica answers. Serve replaces a replica whose health check fails."""
        return {"status": "ok", "version": __version__}

    @api.get("/readyz", responses=_errors(503))
    async def readyz(self) -> JSONResponse:
        """Readiness: 200 while a generator replica is warm, else 503 (OpenAI's body, Retry-After)."""
        why = await self._not_ready()
        if why is not None:
            return request_error_response(GeneratorUnavailableError(why))
        info = await self._model_info()
        return JSONResponse({"status": "ok", "model": info["model"], "device": info["device"],
                             "precision": info["precision"], "compiled": info["compiled"],
                             "warm_up_seconds": info["warm_up_seconds"], "version": __version__})

    @api.get("/healthz", responses=_errors(503))
    async def healthz(self) -> JSONResponse:
        """/readyz under its older name."""
        return await self.readyz()

    @api.get("/v1/models", dependencies=[Depends(bearer)], response_model=ModelList, responses=_errors(401, 503))
    async def list_models(self) -> JSONResponse:
        """"base" (and "base:<model>" for each further base model), then every concept, each with the base model
        that serves it ("base_model"; null while a concept's residual could not be read in time)."""
        created = int(time.time())
        try:
            concepts = await self._concepts()
        except ListingUnavailableError as exc:  # never listed yet and the store does not answer
            return request_error_response(exc)
        served = [(await self._model_info(i))["model"] for i in range(len(self.generators))]
        entries = [(BASE_MODEL_ID, served[0])] + [(f"{BASE_MODEL_ID}:{m}", m) for m in served[1:]]
        bases = await self._bases_of(concepts, served)
        entries += [(concept, bases.get(concept)) for concept in concepts]
        return JSONResponse({"object": "list", "data": [{"id": i, "object": "model", "created": created,
                                                         "owned_by": "catversion", "base_model": base}
                                                        for i, base in entries]})

    async def _bases_of(self, concepts: list[str], served: list[str]) -> dict[str, str]:
        """{concept: the base model serving it}: the one base model, or with several each concept's route, found
        for as many concepts as the residual cache holds within storage_deadline_s (the rest are left out)."""
        if len(served) == 1:
            return {concept: served[0] for concept in concepts}
        found: dict[str, str] = {}
        gate = asyncio.Semaphore(16)

        async def route(concept: str) -> None:
            async with gate:
                try:
                    found[concept] = served[await self._route(concept)]
                except RequestError:
                    pass  # unreadable, or of no served base model: no base model to show

        tasks = [asyncio.ensure_future(route(c)) for c in concepts[: self.settings.cache_capacity]]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.settings.storage_deadline_s)
            for task in pending:
                task.cancel()
        return found

    @api.get("/v1/models/{model_id}", dependencies=[Depends(bearer)], response_model=ModelObject,
             responses=_errors(400, 401, 404, 422, 503))
    async def get_model(self, model_id: str) -> JSONResponse:
        body = {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "catversion"}
        try:
            generator = await self._route(model_id)
            if is_base(model_id):
                info = await self._model_info(generator)
                return JSONResponse({**body, "base_model": info["model"], "base_family": info["family"]})
            described = await self._call("model", model_id, generator=generator)
        except Exception as exc:
            return request_error_response(as_request_error(exc, "describing a model"))
        if "error" in described:
            return request_error_response(described["error"])
        return JSONResponse({**body, **described["model"]})

    @api.post(GENERATIONS, dependencies=[Depends(bearer)], response_model=ImagesResponse,
              responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                               "description": "the images, or with stream=true OpenAI's image_generation.* events"},
                         **_errors(400, 401, 404, 413, 422, 429, 503)})
    async def generations(self, body: ImageGenerationRequest, request: Request) -> Response:
        started = time.perf_counter()
        try:
            items, shape = await self._items(body)
            if body.stream:
                return await self._stream(items[0], body, shape, started)
            results = await self._images(items)
            data = await asyncio.gather(*[self._image_data(r, body, request) for r in results])
            response = JSONResponse({"created": int(time.time()), "data": data, "background": "opaque",
                                     "output_format": body.output_format or "png", "size": shape})
        except asyncio.CancelledError:  # the client went away (Serve cancels the request): no status was sent
            self._record(started, telemetry.ABANDONED)
            raise
        except Exception as exc:
            response = request_error_response(as_request_error(exc, "while generating"))
        self._record(started, response.status_code)
        return response

    async def _image_data(self, result: dict, body: ImageGenerationRequest, request: Request) -> dict:
        entry: dict[str, Any] = {"revised_prompt": None, "seed": result["seed"]}
        if body.response_format == "url":
            name = await asyncio.to_thread(self.stored.put, result["image"], body.output_format or "png")
            entry["url"] = self.stored.url(name, self.settings.public_url or str(request.base_url))
        else:
            entry["b64_json"] = base64.b64encode(result["image"]).decode("ascii")
        return entry

    async def _stream(self, item: dict, body: ImageGenerationRequest, shape: str, started: float) -> StreamingResponse:
        events = self._image_events(item)
        await anext(events)  # "accepted": errors before the first byte (unknown model, overload, …) keep their status
        common = {"background": "opaque", "output_format": body.output_format or "png", "quality": "auto", "size": shape}

        async def sse():
            status: int | str = telemetry.ABANDONED  # until the last event is out, the client may leave
            try:
                async for event in events:
                    payload = {**common, "created_at": int(time.time()),
                               "b64_json": base64.b64encode(event["image"]).decode("ascii")}
                    if event["kind"] == "partial":
                        payload.update(type="image_generation.partial_image", partial_image_index=event["index"])
                    else:
                        payload.update(type="image_generation.completed", usage={
                            "input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                            "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}})
                    yield f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n"
                status = 200
            except Exception as exc:
                error = as_request_error(exc, "while streaming")
                status = error.status
                # Once the stream has begun its status is 200: the error travels as an event instead.
                yield f"event: error\ndata: {json.dumps({'type': 'error', **error.body()})}\n\n"
            finally:
                await events.aclose()  # a client gone: the generator call is cancelled and its sample leaves
                self._record(started, status)

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _items(self, body: ImageGenerationRequest) -> tuple[list[dict], str]:
        """The generator's work items for a request, after every check that needs settings or the model."""
        s = self.settings
        for field, why in UNSUPPORTED_FIELDS.items():
            if getattr(body, field) is not None:
                raise InvalidParameterError(f"{field}: {why} by this server; remove the field", param=field)
        n = 1 if body.n is None else body.n
        if n > s.max_n:
            raise InvalidParameterError(f"n must be between 1 and {s.max_n}, got {n}", param="n")
        if body.stream and n != 1:
            raise InvalidParameterError("stream=true sends one image: use n=1 (or several requests)", param="n")
        if body.stream and body.response_format == "url":
            raise InvalidParameterError("stream=true sends images inline as b64_json; drop response_format=url",
                                        param="response_format")
        steps = body.num_inference_steps or s.default_steps
        if steps > s.max_steps:
            raise InvalidParameterError(f"num_inference_steps must be between 1 and {s.max_steps}, got {steps}",
                                        param="num_inference_steps")
        generator = await self._route(body.model)
        width, height = await self._size(body.size, generator)
        first_seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED - n)
        if first_seed + n - 1 > MAX_SEED:
            raise InvalidParameterError(f"seed + n - 1 must be at most {MAX_SEED}", param="seed")
        item = {"model": body.model, "prompt": body.prompt, "negative_prompt": body.negative_prompt or "",
                "residual_scale": 1.0 if body.residual_scale is None else body.residual_scale,
                "steps": steps, "height": height, "width": width,
                "guidance": s.default_guidance if body.guidance_scale is None else body.guidance_scale,
                "partial_images": (body.partial_images or 0) if body.stream else 0,
                "output_format": body.output_format or "png", "output_compression": body.output_compression,
                "generator": generator}
        return [{**item, "seed": first_seed + i, "index": i} for i in range(n)], f"{width}x{height}"

    async def _size(self, size: str | None, generator: int = 0) -> tuple[int, int]:
        info = await self._model_info(generator)
        native = info["resolution"]
        if size is None or size == "auto":
            return native, native
        largest = self.settings.max_size or 2 * native
        multiple = info["size_multiple"]
        parts = size.lower().split("x")
        if len(parts) == 2 and all(p.isascii() and p.isdigit() and len(p) <= 5 for p in parts):
            width, height = int(parts[0]), int(parts[1])
            if all(multiple <= v <= largest and v % multiple == 0 for v in (width, height)):
                return width, height
        raise InvalidParameterError(
            f"size {size!r} is not supported: use 'auto' or 'WIDTHxHEIGHT' with each side a multiple of {multiple} "
            f"from {multiple} to {largest} (native {native}x{native})", param="size")

    @api.get("/v1/images/files/{name}", responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()},
                                                         "description": "the image"}, **_errors(404, 503)})
    async def image_file(self, name: str, expires: str = Query(""), signature: str = Query("")) -> Response:
        """An image stored for response_format=url; the link is signed and works until it expires."""
        try:
            data, media_type = await asyncio.to_thread(self.stored.open, name, expires, signature)
        except ImageNotFoundError as exc:
            return error_response(404, str(exc), code="not_found")
        except storage.StorageError as exc:
            logger.warning("cannot read stored image %s: %s", name, exc)
            return error_response(503, "the image store is unreachable; retry shortly", type_="server_error",
                                  code="storage_unavailable")
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    @api.post("/v1/images/edits", dependencies=[Depends(bearer)], responses=_errors(401, 404))
    async def edits(self) -> JSONResponse:
        return error_response(404, "POST /v1/images/edits is not supported: catversion makes images from text "
                                   "(POST /v1/images/generations)", code="not_supported")

    @api.post("/v1/images/variations", dependencies=[Depends(bearer)], responses=_errors(401, 404))
    async def variations(self) -> JSONResponse:
        return error_response(404, "POST /v1/images/variations is not supported: catversion makes images from text "
                                   "(POST /v1/images/generations)", code="not_supported")


def build_app(args: dict[str, Any]):
    """Serve config entry point (`import_path: serve.app:build_app`); `args` are ServeSettings fields.

    `args` may also carry `deployment_options: {Generator: {...}, Ingress: {...}}` (the same keys as a
    Serve config's `deployments:` entries), which is how `catversion serve --config` applies them locally.
    """
    args = dict(args)
    options = args.pop("deployment_options", None) or {}
    settings = ServeSettings.from_dict(args)
    if settings.url_secret is None:  # drawn once here, so every ingress replica signs and checks the same links
        settings.url_secret = secrets.token_hex(32)
    # Backpressure sits on the generator: the ingress's handle raises BackPressureError → 429.
    generator_options: dict[str, Any] = {"max_queued_requests": settings.max_queued_requests}
    generator_options.update(options.get("Generator", {}))
    autoscaling = generator_options.get("autoscaling_config")
    if isinstance(autoscaling, dict) and "policy" not in autoscaling:  # a config's own replaces the decorator's
        generator_options["autoscaling_config"] = {**autoscaling, "policy": {"policy_function": DEMAND_POLICY}}
    if settings.gpus_per_replica:  # on top of the deployment's own ray_actor_options (num_cpus, say)
        generator_options["ray_actor_options"] = {**(generator_options.get("ray_actor_options") or {}),
                                                  "num_gpus": settings.gpus_per_replica}
    generators = []
    for name, model in zip(generator_names(settings), settings.base_models):
        # Each base model's generator: the default one's options, with its own deployment entry on top.
        own = {**generator_options, **options.get(name, {}), "name": name} if name != GENERATOR_DEPLOYMENT else generator_options
        generators.append(Generator.options(**own).bind(settings.to_dict(), model))
    return Ingress.options(**options.get("Ingress", {})).bind(generators[0], settings.to_dict(), *generators[1:])
