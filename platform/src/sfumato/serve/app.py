"""The Ray Serve application: a FastAPI ingress that validates, and a model deployment that
owns the accelerator, composed with `.bind()`.

    serve run serve/config.yaml                 # Serve's config file (replicas, limits, health checks)
    sfumato serve --model RUN_DIR/export        # the same app, settings from the command line

Requests are validated by pydantic against the model's limits (422 naming the field) before any
model work; no input reaches a 500: non-finite numbers (NaN, Infinity, 1e400) are 422s, and a 422
names the field without echoing the value (which may be huge or unencodable). Compatible concurrent requests (same sampler, steps, guidance, size) share one
denoising loop through `@serve.batch`. Every request has a deadline; the loop checks it and a
cancel flag before every step, so a timeout (408) or a client that goes away frees the replica.
Overload is refused, not queued without bound: `max_queued_requests` answers 503 (or 429) with
Retry-After. An optional bearer token guards everything but /healthz.
"""


import asyncio
import base64
import io
import json
import logging
import os
import secrets
import time
import uuid
from dataclasses import asdict
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, create_model, model_validator
from ray import serve

from sfumato.serve.backends import Cancelled, Job, load_backend

log = logging.getLogger(__name__)


class ServeSettings(BaseModel):
    """The app's arguments (`args:` in serve/config.yaml, flags of `sfumato serve`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    """An export folder (`sfumato export` output: diffusers/ and onnx/)."""
    backend: Literal["torch", "onnx"] = "torch"
    lora: str | None = None
    """A LoRA adapter folder (the lora/ of a LoRA fine-tune's export) loaded onto `model` and fused
    (torch backend): one base export serves the fine-tune without a merged copy."""
    device: str = "cpu"
    token_env: str | None = None
    """Name of an environment variable holding the bearer token; unset or empty: no auth."""
    max_batch_size: int = Field(8, ge=1, le=256)
    """Requests per denoising loop (1: batching off)."""
    batch_wait_timeout_s: float = Field(0.05, ge=0, le=5)
    request_timeout_s: float = Field(60.0, gt=0)
    max_steps: int = Field(100, ge=1, le=1000)
    max_images: int = Field(4, ge=1, le=64)
    max_prompt_chars: int = Field(500, ge=1, le=10_000)
    max_size_px: int | None = Field(None, ge=8)
    """Largest width/height; None: twice the model's training size."""
    retry_after_s: int = Field(2, ge=0)
    max_ongoing_requests: int = Field(16, ge=1)
    """Model deployment: requests a replica works on at once (at least max_batch_size to batch)."""
    max_queued_requests: int = Field(32, ge=-1)
    """Model deployment: requests waiting for a replica; beyond, 503 + Retry-After (-1: no bound)."""
    num_cpus: float = Field(1.0, ge=0)
    """Model deployment: CPUs Ray reserves per replica (Serve's own default, 1). 0 lets several
    models share a small machine; serve/config.yaml's ray_actor_options replace it."""


def request_model(info, settings: ServeSettings) -> type[BaseModel]:
    """The POST /v1/generate body, with this model's bounds in the schema (and so in OpenAPI)."""
    max_px = settings.max_size_px or 2 * info.default_size_px
    sampler_type = Literal[tuple(info.samplers)]  # type: ignore[valid-type]
    size = dict(default=info.default_size_px, ge=max(8, info.size_multiple_px or info.default_size_px),
                le=max_px if info.size_multiple_px else info.default_size_px)
    trained = {tuple(s) for s in info.trained_sizes_px}
    if trained:  # an aspect-bucketed model: its buckets, whatever max_size_px says
        sides = [side for s in trained for side in s]
        size.update(ge=min(sides), le=max(sides))

    def _check(self):
        for name in ("prompt", "negative_prompt", "class_label"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"{name} is not valid Unicode text (it holds a lone surrogate)") from None
        if trained and (self.width, self.height) not in trained:
            offered = ", ".join(f"{w}x{h}" for w, h in sorted(trained))
            raise ValueError(f"width x height {self.width}x{self.height} is not a size this model was trained at: {offered}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if info.size_multiple_px and value % info.size_multiple_px:
                raise ValueError(f"{name}={value} must be a multiple of {info.size_multiple_px}")
        if self.class_label is not None:
            if info.conditioning != "class":
                raise ValueError("class_label: this model is not class-conditional")
            if isinstance(self.class_label, str) and self.class_label not in info.class_names:
                raise ValueError(f"class_label {self.class_label[:64]!r} is not one of {info.class_names}")
            if isinstance(self.class_label, int) and not 0 <= self.class_label < len(info.class_names):
                raise ValueError(f"class_label {self.class_label} is outside 0..{len(info.class_names) - 1}")
        if (self.prompt or self.negative_prompt) and info.conditioning != "text":
            raise ValueError("prompt: this model is not text-conditional (use class_label)")
        return self

    return create_model(
        "GenerateRequest",
        __config__=ConfigDict(extra="forbid", allow_inf_nan=False),
        __validators__={"_check": model_validator(mode="after")(_check)},
        prompt=(str | None, Field(None, max_length=settings.max_prompt_chars)),
        negative_prompt=(str | None, Field(None, max_length=settings.max_prompt_chars)),
        class_label=(StrictInt | str | None, Field(None, description="class index or name (class-conditional models); true is neither")),
        seed=(int | None, Field(None, ge=0, le=2**31 - 1, description="None: a random seed, returned")),
        steps=(int, Field(min(30, settings.max_steps), ge=1, le=settings.max_steps)),
        guidance_scale=(float, Field(1.0, ge=0, le=30)),
        num_images=(int, Field(1, ge=1, le=settings.max_images)),
        sampler=(sampler_type, Field(info.default_sampler, description="one that fits the model's objective")),
        width=(int, Field(**size)),
        height=(int, Field(**size)),
        timeout_s=(float | None, Field(None, gt=0, le=settings.request_timeout_s,
                                       description="a shorter deadline than the server's (408 past it)")),
    )


def _png(image) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def default(name: str):
    """A ServeSettings field's default: the one place each is written."""
    return ServeSettings.model_fields[name].default


# build_app sets these from the settings (.options); the decorators hold the same defaults.
@serve.deployment(max_ongoing_requests=default("max_ongoing_requests"),
                  max_queued_requests=default("max_queued_requests"), health_check_period_s=10,
                  health_check_timeout_s=30,
                  backpressure_config={"status_code": 503, "retry_after_s": default("retry_after_s")})
class Generator:
    """Owns the model (and the accelerator: give it num_gpus in the Serve config)."""

    def __init__(self, settings: dict):
        from ray.serve.metrics import Counter

        self.settings = ServeSettings(**settings)
        self.backend = load_backend(self.settings.model, self.settings.backend, self.settings.device,
                                    self.settings.lora)
        self.cancelled: set[str] = set()
        self.stats = {"completed": 0, "cancelled": 0, "batches": 0}
        self.images_generated = Counter("sfumato_images_generated", description="images generated")
        self.generate_batch.set_max_batch_size(self.settings.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    def info(self) -> dict:
        return {**asdict(self.backend.info()), "stats": dict(self.stats)}

    async def generate(self, job: Job) -> list[bytes]:
        try:
            return await self.generate_batch(job)
        except asyncio.CancelledError:  # the caller timed out or its client went away
            self.cancelled.add(job.id)
            raise

    @serve.batch(max_batch_size=default("max_batch_size"), batch_wait_timeout_s=default("batch_wait_timeout_s"))
    async def generate_batch(self, jobs: list[Job]) -> list:
        results: list = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.group_key(), []).append(i)
        for indices in groups.values():
            group = [jobs[i] for i in indices]

            def should_stop(group=group) -> bool:
                now = time.time()
                return all(j.id in self.cancelled or now > j.deadline for j in group)

            try:
                images = await asyncio.to_thread(self.backend.generate, group, should_stop)
            except Cancelled as err:
                self.stats["cancelled"] += len(group)
                for i in indices:
                    results[i] = err
                continue
            self.stats["batches"] += 1
            for i, job_images in zip(indices, images):
                results[i] = [_png(image) for image in job_images]
                self.stats["completed"] += 1
                self.images_generated.inc(len(job_images))
        for job in jobs:
            self.cancelled.discard(job.id)
        return results


def build_ingress(settings: ServeSettings, info) -> type:
    """The FastAPI ingress class for this model's limits (they shape the request schema)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from ray.serve.exceptions import BackPressureError
    from ray.serve.metrics import Gauge, Histogram

    GenerateRequest = request_model(info, settings)
    app = FastAPI(title="sfumato", description="Image generation with a model trained by sfumato.")

    token = os.environ.get(settings.token_env, "") if settings.token_env else ""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        """422 naming each field; the value is not echoed (a 1e400, a NaN or a lone surrogate cannot
        be encoded, and a megabyte of prompt should not come back)."""
        detail = [{"loc": [str(part) for part in error.get("loc", ())], "msg": str(error.get("msg", "")),
                   "type": str(error.get("type", ""))} for error in exc.errors()]
        return Response(json.dumps({"detail": detail}, ensure_ascii=True), 422, media_type="application/json")

    @app.middleware("http")
    async def authorised(request: Request, call_next):
        """Before validation and any model work; /healthz stays open for probes."""
        if token and request.url.path != "/healthz":
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not given:
                return JSONResponse({"detail": "a bearer token is required"}, 401, headers={"WWW-Authenticate": "Bearer"})
            if not secrets.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"detail": "the bearer token is not valid"}, 403)
        return await call_next(request)

    @serve.deployment(max_ongoing_requests=64, max_queued_requests=64, ray_actor_options={"num_cpus": 0},
                      backpressure_config={"status_code": 503, "retry_after_s": settings.retry_after_s})
    @serve.ingress(app)
    class Ingress:
        def __init__(self, generator):
            self.generator = generator
            self.in_flight = 0
            self.latency = Histogram("sfumato_request_latency_s", description="POST /v1/generate latency",
                                     boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60])
            self.queue = Gauge("sfumato_requests_in_flight", description="generate requests being served or queued")

        @app.get("/healthz")
        async def healthz(self) -> dict:
            return {"status": "ok"}

        @app.get("/v1/model")
        async def model(self) -> dict:
            model_info = await self.generator.info.remote()
            return {**model_info, "limits": {"max_steps": settings.max_steps, "max_images": settings.max_images,
                                             "max_prompt_chars": settings.max_prompt_chars,
                                             "max_size_px": settings.max_size_px or 2 * model_info["default_size_px"],
                                             "request_timeout_s": settings.request_timeout_s}}

        @app.post("/v1/generate", responses={200: {"content": {"image/png": {}, "application/json": {}}}})
        async def generate(self, body: GenerateRequest, request: Request):  # type: ignore[valid-type]
            started = time.perf_counter()
            seed = body.seed if body.seed is not None else secrets.randbelow(2**31 - settings.max_images)
            timeout_s = body.timeout_s or settings.request_timeout_s
            job = Job(id=uuid.uuid4().hex, seed=seed, steps=body.steps, guidance_scale=body.guidance_scale,
                      num_images=body.num_images, sampler=body.sampler, width=body.width, height=body.height,
                      prompt=body.prompt, negative_prompt=body.negative_prompt, class_label=body.class_label,
                      deadline=time.time() + timeout_s)
            self.in_flight += 1
            self.queue.set(self.in_flight)
            response = self.generator.generate.remote(job)
            try:
                images = await asyncio.wait_for(response, timeout=timeout_s)
            except asyncio.TimeoutError:
                response.cancel()
                return JSONResponse({"detail": f"generation took longer than {timeout_s} s"}, 408)
            except BackPressureError:
                return JSONResponse({"detail": "the model is at capacity, retry later"}, 503,
                                    headers={"Retry-After": str(settings.retry_after_s)})
            finally:
                self.in_flight -= 1
                self.queue.set(self.in_flight)
            if isinstance(images, Cancelled):
                return JSONResponse({"detail": "generation was cancelled at its deadline"}, 408)
            self.latency.observe(time.perf_counter() - started)
            seeds = [seed + k for k in range(len(images))]
            if len(images) == 1 and "application/json" not in request.headers.get("accept", ""):
                return Response(images[0], media_type="image/png", headers={"X-Seed": str(seed)})
            return {"images": [base64.b64encode(png).decode() for png in images], "seeds": seeds,
                    "width": body.width, "height": body.height}

    return Ingress


def build_app(args: dict):
    """The application for `serve run` / `serve.run`: `args` are ServeSettings' fields."""
    settings = ServeSettings(**args)
    info = load_backend(settings.model, settings.backend, settings.device, settings.lora).info()  # limits shape the schema
    generator = Generator.options(max_ongoing_requests=settings.max_ongoing_requests,
                                  max_queued_requests=settings.max_queued_requests,
                                  backpressure_config={"status_code": 503, "retry_after_s": settings.retry_after_s},
                                  ray_actor_options={"num_cpus": settings.num_cpus}).bind(settings.model_dump())
    return build_ingress(settings, info).bind(generator)


def run_server(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, blocking: bool = True,
               name: str = "sfumato", route_prefix: str = "/"):
    """`sfumato serve`: start Serve's HTTP proxy on host:port (local Ray, or $RAY_ADDRESS) and run
    the app; blocking until interrupted unless told otherwise."""
    from sfumato.config import RayConfig
    from sfumato.runtime import init_ray

    init_ray(RayConfig())
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_app(settings.model_dump()), name=name, route_prefix=route_prefix, blocking=blocking)
