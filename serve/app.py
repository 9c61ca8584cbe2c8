"""The Ray Serve application: an OpenAI-Images-compatible HTTP ingress and a batching generator.

`Generator` loads the frozen base model once per replica and answers one image per call; calls are
gathered by `@serve.batch` into one UNet batch across requests *and* concepts (only different
step counts, guidance scales or sizes are run apart). `Ingress` (FastAPI) validates requests,
enforces auth and limits, fans a request's n images out to the generator and speaks OpenAI's
request, response and error formats. `build_app(args)` is the Serve config YAML entry point.
"""


import asyncio
import base64
import hmac
import io
import secrets
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from catversion import __version__, layout, limits, telemetry
from catversion.telemetry import ray_metric

from .cache import ResidualCache
from .config import ServeSettings
from .errors import InvalidParameterError, RequestError, request_error

BASE_MODEL_ID = "base"
MAX_SEED = 2**32 - 1  # OpenAI-style clients send 32-bit seeds; image i of a request uses seed + i


# ---- the OpenAI wire format -------------------------------------------------------------------


class ImageGenerationRequest(BaseModel):
    """`POST /v1/images/generations`: OpenAI's fields plus catversion's extensions."""

    model_config = ConfigDict(extra="ignore")  # OpenAI fields we do not use (quality, style, user) are accepted

    model: str = Field(BASE_MODEL_ID, description='a concept id from GET /v1/models, or "base" for the plain model')
    prompt: str = Field(..., min_length=1, max_length=4000, description="use the concept's class word, e.g. 'a teapot on a beach'")
    n: int = Field(1, ge=1, description="number of images")
    size: str | None = Field(None, description="'WxH' with W == H, e.g. '512x512' (default: the model's native size)")
    response_format: str = Field("b64_json", description="only 'b64_json' is supported")
    negative_prompt: str = Field("", max_length=4000, description="encoded without the residual")
    num_inference_steps: int | None = Field(None, ge=1, description=f"DDIM steps (default {limits.DEFAULT_STEPS})")
    guidance_scale: float | None = Field(None, ge=0.0, le=limits.MAX_GUIDANCE,
                                         description=f"classifier-free guidance (default {limits.DEFAULT_GUIDANCE:g})")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="seed of the first image; image i uses seed + i")
    residual_scale: float = Field(1.0, ge=0.0, le=limits.MAX_RESIDUAL_SCALE,
                                  description="strength of the concept's residual; 0 = off")


def error_response(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status)


def request_error_response(error: RequestError) -> JSONResponse:
    """The one mapping from a request's error to OpenAI's error body and HTTP status."""
    return error_response(error.status, error.message, type_=error.type, code=error.code, param=error.param)


def _png_b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # fast: encoding must not hold up the next UNet batch
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ---- the generator -----------------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=64, autoscaling_config={"min_replicas": 1, "max_replicas": 1,
                                                               "target_ongoing_requests": 16})
class Generator:
    """One frozen base model per replica; residuals from the cache; one UNet batch for many concepts."""

    def __init__(self, settings: dict):
        from catversion.generation import ImageGenerator
        from catversion.models import load_base_model, resolve_device

        self.settings = ServeSettings.from_dict(settings)
        self.base = load_base_model(self.settings.model, device=resolve_device(self.settings.device))
        self.images = ImageGenerator(self.base)
        hits, misses, load = (ray_metric(s) for s in (telemetry.CACHE_HITS, telemetry.CACHE_MISSES,
                                                       telemetry.RESIDUAL_LOAD_SECONDS))
        self.cache = ResidualCache(
            self.settings.residuals, self.settings.cache_capacity,
            check=lambda r: r.check_compatible(self.base.text_encoder, fingerprint=self.base.fingerprint),
            on_hit=lambda: hits.inc(), on_miss=lambda seconds: (misses.inc(), load.observe(seconds)),
        )
        self.batch_size = ray_metric(telemetry.BATCH_SIZE)
        self._batched.set_max_batch_size(self.settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    def info(self) -> dict:
        return {"model": self.base.model_id, "resolution": self.base.resolution, "size_multiple": self.images.size_multiple,
                "device": str(self.base.device)}

    def describe(self, concept_id: str) -> dict:
        """Metadata of a concept's residual; raises a RequestError (unknown or unusable concept)."""
        residual = self.cache.get(concept_id)
        keys = ("class_word", "caption", "base_model", "steps", "final_loss", "sha256")
        return {k: residual.meta.get(k) for k in keys}

    async def generate(self, item: dict) -> dict:
        """One image as {"b64_json", "seed"}; raises a RequestError for this request's own problem."""
        residual = None
        if item["model"] != BASE_MODEL_ID:
            residual = await asyncio.to_thread(self.cache.get, item["model"])
        result = await self._batched({**item, "residual": residual})
        if isinstance(result, RequestError):
            raise result
        return result

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def _batched(self, items: list[dict]) -> list[dict | RequestError]:
        from catversion.generation import GenerationRequest

        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            groups[(item["steps"], item["guidance"], item["size"])].append(index)
        results: list[dict | RequestError] = [{}] * len(items)
        for (steps, guidance, size), indexes in groups.items():
            requests = [GenerationRequest(items[i]["prompt"], items[i]["residual"], items[i]["seed"],
                                          items[i]["residual_scale"], items[i]["negative_prompt"]) for i in indexes]
            self.batch_size.observe(len(requests))
            try:
                encoded = await asyncio.to_thread(self._render, requests, steps, guidance, size)
            except ValueError as exc:  # validated at the ingress; kept as a per-item error, never a crash
                for i in indexes:
                    results[i] = InvalidParameterError(str(exc))
                continue
            for i, b64 in zip(indexes, encoded):
                results[i] = {"b64_json": b64, "seed": items[i]["seed"]}
        return results

    def _render(self, requests, steps: int, guidance: float, size: int) -> list[str]:
        """Generate and PNG-encode off the event loop, so requests keep queueing meanwhile."""
        return [_png_b64(image) for image in self.images.generate(requests, steps, guidance, size)]


# ---- the HTTP ingress --------------------------------------------------------------------------

api = FastAPI(
    title="catversion",
    version=__version__,
    description="OpenAI-Images-compatible generation with CatVersion residuals: `model` is a concept id or \"base\".",
)


class _BodyLimit:
    """ASGI middleware: refuse bodies over the limit with 413 before reading them.

    Serve freezes a copy of the FastAPI app at import, so the middleware is registered here and the
    limit is a class attribute that each Ingress replica sets from its settings.
    """

    max_bytes = ServeSettings.__dataclass_fields__["max_body_bytes"].default

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope.get("headers", [])).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_bytes:
                response = error_response(413, f"request body is {int(length)} bytes; the limit is {self.max_bytes}",
                                          code="request_too_large")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


api.add_middleware(_BodyLimit)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", []) if p != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request body")
    return error_response(400, message, param=param, code="invalid_value")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = "not_found" if exc.status_code == 404 else None
    return error_response(exc.status_code, str(exc.detail), code=code)


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    def __init__(self, generator, settings: dict):
        self.generator = generator
        self.settings = ServeSettings.from_dict(settings)
        self.keys = self._read_keys(self.settings.api_key_file)
        _BodyLimit.max_bytes = self.settings.max_body_bytes
        self._info: dict | None = None
        self._info_lock = asyncio.Lock()
        self._models: tuple[float, list[str]] = (0.0, [])
        self.requests = ray_metric(telemetry.REQUESTS)
        self.latency = ray_metric(telemetry.REQUEST_SECONDS)

    @staticmethod
    def _read_keys(path: str | None) -> list[str]:
        if not path:
            return []
        keys = [line.strip() for line in Path(path).read_text().splitlines() if line.strip() and not line.startswith("#")]
        if not keys:
            raise ValueError(f"api key file {path} has no keys (one per line)")
        return keys

    def _authorized(self, request: Request) -> bool:
        if not self.keys:
            return True
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        return any(hmac.compare_digest(token, key) for key in self.keys)

    async def _model_info(self) -> dict:
        async with self._info_lock:  # one call in flight, not one per request of the first burst
            if self._info is None:
                self._info = await self.generator.info.remote()
        return self._info

    async def _concepts(self) -> list[str]:
        fetched, names = self._models
        if time.monotonic() - fetched > self.settings.models_ttl_s:
            names = await asyncio.to_thread(layout.list_concepts, self.settings.residuals)
            self._models = (time.monotonic(), names)
        return names

    def _done(self, route: str, started: float, response: JSONResponse) -> JSONResponse:
        self.requests.inc(1, {"route": route, "status": str(response.status_code)})
        self.latency.observe(time.perf_counter() - started, {"route": route})
        return response

    @api.get("/healthz")
    async def healthz(self) -> dict:
        info = await self._model_info()
        return {"status": "ok", "model": info["model"], "device": info["device"], "version": __version__}

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> JSONResponse:
        if not self._authorized(request):
            return error_response(401, "missing or invalid API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")
        created = int(time.time())
        ids = [BASE_MODEL_ID] + await self._concepts()
        return JSONResponse({"object": "list", "data": [{"id": i, "object": "model", "created": created,
                                                         "owned_by": "catversion"} for i in ids]})

    @api.get("/v1/models/{model_id}")
    async def get_model(self, model_id: str, request: Request) -> JSONResponse:
        if not self._authorized(request):
            return error_response(401, "missing or invalid API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")
        body = {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "catversion"}
        if model_id == BASE_MODEL_ID:
            return JSONResponse({**body, "base_model": (await self._model_info())["model"]})
        try:
            described = await self.generator.describe.remote(model_id)
        except Exception as exc:
            error = request_error(exc)
            if error is None:
                raise
            return request_error_response(error)
        return JSONResponse({**body, **described})

    @api.post("/v1/images/generations", responses={400: {}, 401: {}, 404: {}, 413: {}, 422: {}, 429: {}, 503: {}})
    async def generations(self, body: ImageGenerationRequest, request: Request) -> JSONResponse:
        started = time.perf_counter()
        route = "/v1/images/generations"
        if not self._authorized(request):
            return self._done(route, started, error_response(
                401, "missing or invalid API key (send 'Authorization: Bearer KEY')", code="invalid_api_key"))
        try:
            response = await self._generate(body)
        except BackPressureError:
            response = error_response(429, "the server is at capacity; retry shortly", type_="rate_limit_error",
                                      code="overloaded")
        except Exception as exc:  # the generator's errors arrive wrapped by Ray
            error = request_error(exc)
            if error is None:
                raise
            response = request_error_response(error)
        return self._done(route, started, response)

    async def _generate(self, body: ImageGenerationRequest) -> JSONResponse:
        size = await self._check(body)
        first_seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED - body.n)
        items = [{"model": body.model, "prompt": body.prompt, "negative_prompt": body.negative_prompt,
                  "seed": first_seed + i, "residual_scale": body.residual_scale, "size": size,
                  "steps": body.num_inference_steps or self.settings.default_steps,
                  "guidance": self.settings.default_guidance if body.guidance_scale is None else body.guidance_scale}
                 for i in range(body.n)]
        results = await asyncio.gather(*[self.generator.generate.remote(item) for item in items])
        data = [{"b64_json": r["b64_json"], "revised_prompt": None, "seed": r["seed"]} for r in results]
        return JSONResponse({"created": int(time.time()), "data": data})

    async def _check(self, body: ImageGenerationRequest) -> int:
        """Limits that depend on settings or on the loaded model (pydantic checks the rest); returns the size."""
        s = self.settings
        if body.response_format != "b64_json":
            raise InvalidParameterError(f"response_format {body.response_format!r} is not supported; use 'b64_json'",
                                        param="response_format")
        if body.n > s.max_n:
            raise InvalidParameterError(f"n must be between 1 and {s.max_n}, got {body.n}", param="n")
        if body.num_inference_steps is not None and body.num_inference_steps > s.max_steps:
            raise InvalidParameterError(
                f"num_inference_steps must be between 1 and {s.max_steps}, got {body.num_inference_steps}",
                param="num_inference_steps")
        info = await self._model_info()
        if body.size is None:
            return info["resolution"]
        largest = s.max_size or 2 * info["resolution"]
        multiple = info["size_multiple"]
        parts = body.size.lower().split("x")
        valid = len(parts) == 2 and all(p.isascii() and p.isdigit() for p in parts) and parts[0] == parts[1]
        if not valid or int(parts[0]) % multiple or not multiple <= int(parts[0]) <= largest:
            raise InvalidParameterError(
                f"size {body.size!r} is not supported: use 'NxN' with N a multiple of {multiple} up to {largest} "
                f"(native {info['resolution']}x{info['resolution']})", param="size")
        return int(parts[0])


def build_app(args: dict[str, Any]):
    """Serve config entry point (`import_path: serve.app:build_app`); `args` are ServeSettings fields.

    `args` may also carry `deployment_options: {Generator: {...}, Ingress: {...}}` (the same keys as a
    Serve config's `deployments:` entries), which is how `catversion serve --config` applies them locally.
    """
    args = dict(args)
    options = args.pop("deployment_options", None) or {}
    settings = ServeSettings.from_dict(args)
    # Backpressure sits on the generator: the ingress's handle raises BackPressureError → 429.
    generator_options: dict[str, Any] = {"max_queued_requests": settings.max_queued_requests}
    if settings.gpus_per_replica:
        generator_options["ray_actor_options"] = {"num_gpus": settings.gpus_per_replica}
    generator_options.update(options.get("Generator", {}))
    generator = Generator.options(**generator_options).bind(settings.to_dict())
    return Ingress.options(**options.get("Ingress", {})).bind(generator, settings.to_dict())
