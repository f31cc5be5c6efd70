"""The Ray Serve application: a FastAPI ingress that validates, and a model deployment that
owns the accelerator, composed with `.bind()`.

    serve run serve/config.yaml                 # Serve's config file (replicas, limits, health checks)
    sfumato serve --model RUN_DIR/export        # the same app, settings from the command line

Requests are validated by pydantic against the model's limits (422 naming the field) before any
model work; no input reaches a 500: non-finite numbers (NaN, Infinity, 1e400) are 422s, and a 422
names the field without echoing the value (which may be huge or unencodable). Compatible
concurrent requests (same sampler, steps, guidance and its interval, size) share one denoising
loop through `@serve.batch`. Every request has a deadline; the loop checks it and a cancel flag
before every step, so a timeout (408) or a client that goes away frees the replica.
Overload is refused, not queued without bound: `max_queued_requests` answers 503 (or 429) with
Retry-After. An optional bearer token guards everything but /healthz.

With `safety_model` set, every generated image is scored by the output safety filter
(sfumato.serve.safety) before it leaves: a flagged image is withheld (HTTP 451 for a single PNG;
a null image and its verdict in a JSON answer) or sent blurred (`safety_action: blur`). With none
set the filter is off, and the startup log, /v1/model and every response say so.
"""

import asyncio
import base64
import io
import logging
import os
import re
import secrets
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, create_model, field_validator, model_validator
from ray import serve

from sfumato.config import GuidanceInterval, SafetyConfig
from sfumato.serve.backends import Cancelled, Job, load_backend
from sfumato.serve.metrics import IngressMetrics, ModelMetrics
from sfumato.serve.prompts import MAX_PROMPT_CHARS, PromptTokens, prompt_problem
from sfumato.serve.safety import UNCHECKED, WITHHELD, OutputFilter, Verdict

log = logging.getLogger(__name__)


NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class ServeSettings(BaseModel):
    """The app's arguments (`args:` in serve/config.yaml, flags of `sfumato serve`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    """An export folder (`sfumato export` output: diffusers/ and onnx/)."""
    backend: Literal["torch", "onnx"] = "torch"
    lora: str | None = None
    """A LoRA adapter folder (the lora/ of a LoRA fine-tune's export) loaded onto `model` and fused
    (torch backend): one base export serves the fine-tune without a merged copy."""
    model_name: str = Field("base", pattern=NAME)
    """The name a request's `model` field gives `model` (its default)."""
    models: dict[str, str] = {}
    """More exports the replica holds, by name: a request picks one with `model`. Each must be
    compatible with `model` (same conditioning, classes, sizes and samplers; checked at startup)."""
    adapters: dict[str, str] = {}
    """LoRA adapters over `model` (lora/ folders of LoRA runs' exports), by name, loaded beside each
    other and not fused (torch backend): a request naming one runs with it alone, others with none."""
    device: str = "cpu"
    token_env: str | None = None
    """Name of an environment variable holding the bearer token; unset or empty: no auth."""
    max_batch_size: int = Field(8, ge=1, le=256)
    """Requests per denoising loop (1: batching off)."""
    batch_wait_timeout_s: float = Field(0.05, ge=0, le=5)
    request_timeout_s: float = Field(60.0, gt=0)
    max_steps: int = Field(100, ge=1, le=1000)
    max_images: int = Field(4, ge=1, le=64)
    max_prompt_chars: int = Field(MAX_PROMPT_CHARS, ge=1, le=10_000)
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
    safety_model: str | None = None
    """The output safety filter's CLIP model (hub id or local folder, transformers format: the
    curation stage's data.curate.clip.model); None: no filter, said loudly at startup."""
    safety_threshold: float = Field(SafetyConfig.model_fields["nsfw_threshold"].default, ge=0, le=1)
    """A generated image scoring at or above it is flagged (the curation stage's nsfw_threshold)."""
    safety_action: Literal["withhold", "blur"] = "withhold"
    """What happens to a flagged image: withheld (no pixels leave) or blurred beyond recognition."""
    safety_unsafe_prompts: list[str] = Field(SafetyConfig.model_fields["unsafe_prompts"].default, min_length=1)
    safety_safe_prompts: list[str] = Field(SafetyConfig.model_fields["safe_prompts"].default, min_length=1)

    @model_validator(mode="after")
    def _names(self):
        for field in ("models", "adapters"):
            for name in getattr(self, field):
                if not re.match(NAME, name):
                    raise ValueError(f"{field}: the name {name[:64]!r} is not letters, digits, '.', '_' or '-'")
        taken = [self.model_name, *self.models, *self.adapters]
        if len(set(taken)) < len(taken):
            raise ValueError(f"model_name, models and adapters share a name: {taken}")
        return self

    def model_names(self) -> list[str]:
        """What a request's `model` may say: the base first."""
        return [self.model_name, *self.models, *self.adapters]

    def safety(self) -> dict:
        """What /v1/model and the startup log say about the output filter."""
        if self.safety_model is None:
            return {"enabled": False, "reason": "no safety_model configured: generated images are not checked"}
        return {
            "enabled": True,
            "model": self.safety_model,
            "threshold": self.safety_threshold,
            "action": self.safety_action,
        }


def _takes(info) -> str:
    """What a model of this conditioning takes instead, for a refusal."""
    return {"class": "use class_label", "text": "use prompt", "none": "it takes no condition"}[info.conditioning]


def request_model(info, settings: ServeSettings, tokens: PromptTokens | None = None) -> type[BaseModel]:
    """The POST /v1/generate body, with this model's bounds in the schema (and so in OpenAPI).
    `tokens`: a text model's tokenizer (the backend's `prompt_tokens()`): a prompt longer than
    the model reads is refused, not cut off (sfumato.serve.prompts)."""
    max_px = settings.max_size_px or 2 * info.default_size_px
    sampler_type = Literal[tuple(info.samplers)]  # type: ignore[valid-type]
    size = dict(
        default=info.default_size_px,
        ge=max(8, info.size_multiple_px or info.default_size_px),
        le=max_px if info.size_multiple_px else info.default_size_px,
    )
    trained = {tuple(s) for s in info.trained_sizes_px}
    if trained:  # an aspect-bucketed model: its buckets, whatever max_size_px says
        sides = [side for s in trained for side in s]
        size.update(ge=min(sides), le=max(sides))
    text = info.conditioning == "text"

    # Field validators: the 422's `loc` names the field.
    def _prompt(cls, value, validation):
        if value is None:
            return value
        name = validation.field_name
        if not text:
            raise ValueError(f"{name}: this model is not text-conditional ({_takes(info)})")
        problem = prompt_problem(value, settings.max_prompt_chars, tokens, required=name == "prompt")
        if problem:
            raise ValueError(f"{name} {problem}")
        return value

    def _class_label(cls, value, validation):
        if value is None:
            return value
        if info.conditioning != "class":
            raise ValueError(f"class_label: this model is not class-conditional ({_takes(info)})")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("class_label is not valid Unicode text (it holds a lone surrogate)") from None
            if value not in info.class_names:
                raise ValueError(f"class_label {value[:64]!r} is not one of {info.class_names}")
        elif not 0 <= value < len(info.class_names):
            raise ValueError(f"class_label {value} is outside 0..{len(info.class_names) - 1}")
        return value

    def _check(self):
        if trained and (self.width, self.height) not in trained:
            offered = ", ".join(f"{w}x{h}" for w, h in sorted(trained))
            raise ValueError(
                f"width x height {self.width}x{self.height} is not a size this model was trained at: {offered}"
            )
        for name in ("width", "height"):
            value = getattr(self, name)
            if info.size_multiple_px and value % info.size_multiple_px:
                raise ValueError(f"{name}={value} must be a multiple of {info.size_multiple_px}")
        return self

    prompt_description = (
        f"what the image should show (required): text, at most {settings.max_prompt_chars} characters"
        + (f" and {tokens.max_tokens} tokens" if tokens is not None else "")
        if text
        else "text models only"
    )
    return create_model(
        "GenerateRequest",
        __config__=ConfigDict(extra="forbid", allow_inf_nan=False),
        __validators__={
            "_check": model_validator(mode="after")(_check),
            "_prompt": field_validator("prompt", "negative_prompt")(_prompt),
            "_class_label": field_validator("class_label")(_class_label),
        },
        model=(
            Literal[tuple(settings.model_names())],
            Field(
                settings.model_name,  # type: ignore[valid-type]
                description="a served model or adapter by name",
            ),
        ),
        prompt=(
            (str, Field(..., max_length=settings.max_prompt_chars, description=prompt_description))
            if text
            else (str | None, Field(None, description=prompt_description))
        ),
        negative_prompt=(
            str | None,
            Field(None, max_length=settings.max_prompt_chars, description="what to steer away from (text models)"),
        ),
        class_label=(
            StrictInt | str | None,
            Field(None, description="class index or name (class-conditional models); true is neither"),
        ),
        seed=(int | None, Field(None, ge=0, le=2**31 - 1, description="None: a random seed, returned")),
        steps=(int, Field(min(30, settings.max_steps), ge=1, le=settings.max_steps)),
        guidance_scale=(
            float,
            Field(
                info.guidance_scale,
                ge=0,
                le=30,
                description="classifier-free guidance; absent: the served model's own (its run's "
                "evaluate.guidance_scale, as its export records it)",
            ),
        ),
        guidance_interval=(
            GuidanceInterval | None,
            Field(
                info.guidance_interval,
                description="[lo, hi]: guide only at noise levels in it (1: pure noise; Kynkäänniemi et al. "
                "2024), one model call at the others; null: at every step; absent: the served model's own",
            ),
        ),
        num_images=(int, Field(1, ge=1, le=settings.max_images)),
        sampler=(sampler_type, Field(info.default_sampler, description="one that fits the model's objective")),
        width=(int, Field(**size)),
        height=(int, Field(**size)),
        timeout_s=(
            float | None,
            Field(
                None,
                gt=0,
                le=settings.request_timeout_s,
                description="a shorter deadline than the server's (408 past it)",
            ),
        ),
    )


@dataclass(frozen=True)
class Output:
    """One generated image as it leaves the replica: its PNG (None when withheld) and verdict."""

    png: bytes | None
    verdict: Verdict


def _png(image) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def default(name: str):
    """A ServeSettings field's default: the one place each is written."""
    return ServeSettings.model_fields[name].default


# build_app sets these from the settings (.options); the decorators hold the same defaults.
@serve.deployment(
    max_ongoing_requests=default("max_ongoing_requests"),
    max_queued_requests=default("max_queued_requests"),
    health_check_period_s=10,
    health_check_timeout_s=30,
    backpressure_config={"status_code": 503, "retry_after_s": default("retry_after_s")},
)
class Generator:
    """Owns the model (and the accelerator: give it num_gpus in the Serve config)."""

    def __init__(self, settings: dict):
        self.settings = ServeSettings(**settings)
        self.backend = load_backend(
            self.settings.model, self.settings.backend, self.settings.device, self.settings.lora, self.settings.adapters
        )
        self.backends = {
            name: load_backend(folder, self.settings.backend, self.settings.device)
            for name, folder in self.settings.models.items()
        }
        self.filter = None
        if self.settings.safety_model is not None:
            self.filter = OutputFilter(
                self.settings.safety_model,
                self.settings.safety_threshold,
                self.settings.safety_action,
                self.settings.safety_unsafe_prompts,
                self.settings.safety_safe_prompts,
                self.settings.device,
            )
        log.log(logging.INFO if self.filter else logging.WARNING, "output safety filter: %s", self.settings.safety())
        self.cancelled: set[str] = set()
        self.stats = {"completed": 0, "cancelled": 0, "batches": 0, "withheld": 0, "blurred": 0}
        self.metrics = ModelMetrics()
        self.generate_batch.set_max_batch_size(self.settings.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    def info(self) -> dict:
        return {
            **asdict(self.backend.info()),
            "stats": dict(self.stats),
            "safety": self.settings.safety(),
            "models": self.settings.model_names(),
        }

    def _outputs(self, images: list) -> list[Output]:
        """Each image scored (filter on), measured for the drift histograms and encoded: what
        leaves the replica."""
        checked = self.filter(images) if self.filter else [(image, Verdict(UNCHECKED)) for image in images]
        outputs = []
        for image, verdict in checked:
            if verdict.score is not None:
                self.metrics.safety_score.observe(verdict.score)
            if verdict.action in ("withheld", "blurred"):
                self.stats[verdict.action] += 1
                self.metrics.safety_triggers.inc(tags={"action": verdict.action})
            if image is not None:
                self.metrics.observe_image(image)
            outputs.append(Output(None if image is None else _png(image), verdict))
        return outputs

    async def generate(self, job: Job) -> "list[Output] | Cancelled":
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

            started = time.time()
            for job in group:
                self.metrics.queue_wait.observe(max(0.0, started - job.created))
            self.metrics.batch_size.observe(len(group))
            try:
                backend = self.backends.get(group[0].model, self.backend)  # the base also runs its adapters
                images = await asyncio.to_thread(backend.generate, group, should_stop)
            except Cancelled as err:
                self.stats["cancelled"] += len(group)
                for i in indices:
                    results[i] = err
                continue
            self.stats["batches"] += 1
            encoding = time.time()
            self.metrics.denoise.observe(encoding - started)
            for i, job_images in zip(indices, images):
                results[i] = await asyncio.to_thread(self._outputs, job_images)
                self.stats["completed"] += 1
                self.metrics.images.inc(len(job_images))
            self.metrics.encode.observe(time.time() - encoding)
        for job in jobs:
            self.cancelled.discard(job.id)
        return results


def build_ingress(
    settings: ServeSettings, info, tokens: PromptTokens | None = None, guidance: dict | None = None
) -> type:
    """The FastAPI ingress class for this model's limits (they shape the request schema);
    `tokens`: a text model's tokenizer, which bounds its prompts; `guidance`: each served model's
    own (guidance_scale, guidance_interval) by name, a request's when it names neither."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from ray.serve.exceptions import BackPressureError

    from sfumato.serve.guard import answer_invalid_requests, require_token

    GenerateRequest = request_model(info, settings, tokens)
    app = FastAPI(title="sfumato", description="Image generation with a model trained by sfumato.")

    token = os.environ.get(settings.token_env, "") if settings.token_env else ""

    # Before validation and any model work; /healthz stays open for probes (sfumato.serve.guard).
    answer_invalid_requests(app)
    require_token(app, token)

    metrics: list[IngressMetrics] = []  # the replica's, once it is constructed (in its own process)

    @app.middleware("http")
    async def counted(request: Request, call_next):
        """Outermost: every answer of /v1/generate, refusals included, counted by status."""
        response = await call_next(request)
        if metrics and request.url.path.endswith("/v1/generate"):
            metrics[0].responses.inc(tags={"status": str(response.status_code)})
        return response

    @serve.deployment(
        max_ongoing_requests=64,
        max_queued_requests=64,
        ray_actor_options={"num_cpus": 0},
        backpressure_config={"status_code": 503, "retry_after_s": settings.retry_after_s},
    )
    @serve.ingress(app)
    class Ingress:
        def __init__(self, generator):
            self.generator = generator
            self.metrics = IngressMetrics()
            self.metrics.keep_gauges_alive()
            metrics[:] = [self.metrics]

        @app.get("/healthz")
        async def healthz(self) -> dict:
            return {"status": "ok"}

        @app.get("/v1/model")
        @app.get("/v1/info")
        async def model(self) -> dict:
            model_info = await self.generator.info.remote()
            return {
                **model_info,
                "limits": {
                    "max_steps": settings.max_steps,
                    "max_images": settings.max_images,
                    "max_prompt_chars": settings.max_prompt_chars,
                    "max_prompt_tokens": None if tokens is None else tokens.max_tokens,
                    "max_size_px": settings.max_size_px or 2 * model_info["default_size_px"],
                    "request_timeout_s": settings.request_timeout_s,
                },
            }

        @app.post("/v1/generate", responses={200: {"content": {"image/png": {}, "application/json": {}}}})
        async def generate(self, body: GenerateRequest, request: Request):  # type: ignore[valid-type]
            started = time.perf_counter()
            seed = body.seed if body.seed is not None else secrets.randbelow(2**31 - settings.max_images)
            timeout_s = body.timeout_s or settings.request_timeout_s
            scale, interval = (guidance or {}).get(body.model, (body.guidance_scale, body.guidance_interval))
            if "guidance_scale" in body.model_fields_set:
                scale = body.guidance_scale
            if "guidance_interval" in body.model_fields_set:
                interval = body.guidance_interval
            job = Job(
                id=uuid.uuid4().hex,
                seed=seed,
                steps=body.steps,
                guidance_scale=scale,
                guidance_interval=interval,
                num_images=body.num_images,
                sampler=body.sampler,
                width=body.width,
                height=body.height,
                prompt=body.prompt,
                negative_prompt=body.negative_prompt,
                class_label=body.class_label,
                deadline=time.time() + timeout_s,
                created=time.time(),
                model=body.model,
            )
            self.metrics.in_flight_now += 1
            self.metrics.in_flight.set(self.metrics.in_flight_now)
            response = self.generator.generate.remote(job)
            try:
                images = await asyncio.wait_for(response, timeout=timeout_s)
            except asyncio.TimeoutError:
                response.cancel()
                return JSONResponse({"detail": f"generation took longer than {timeout_s} s"}, 408)
            except BackPressureError:
                return JSONResponse(
                    {"detail": "the model is at capacity, retry later"},
                    503,
                    headers={"Retry-After": str(settings.retry_after_s)},
                )
            finally:
                self.metrics.in_flight_now -= 1
                self.metrics.in_flight.set(self.metrics.in_flight_now)
            if isinstance(images, Cancelled):
                return JSONResponse({"detail": "generation was cancelled at its deadline"}, 408)
            self.metrics.latency.observe(time.perf_counter() - started)
            seeds = [seed + k for k in range(len(images))]
            verdicts = [{"action": out.verdict.action, "score": out.verdict.score} for out in images]
            withheld = [k for k, out in enumerate(images) if out.verdict.action == WITHHELD]
            if len(images) == 1 and "application/json" not in request.headers.get("accept", ""):
                if withheld:  # no pixels of a flagged image leave; 451 says why (docs/export-and-serving.md)
                    return JSONResponse(
                        {
                            "detail": f"the image was withheld by the output safety filter (score "
                            f"{images[0].verdict.score:.3f} >= {settings.safety_threshold})",
                            "withheld": withheld,
                            "safety": verdicts,
                            "seeds": seeds,
                        },
                        451,
                        headers={"X-Seed": str(seed), "X-Safety": WITHHELD},
                    )
                headers = {"X-Seed": str(seed), "X-Safety": images[0].verdict.action}
                if images[0].verdict.score is not None:
                    headers["X-Safety-Score"] = f"{images[0].verdict.score:.6f}"
                return Response(images[0].png, media_type="image/png", headers=headers)
            return {
                "images": [None if out.png is None else base64.b64encode(out.png).decode() for out in images],
                "seeds": seeds,
                "width": body.width,
                "height": body.height,
                "safety": verdicts,
                "withheld": withheld,
            }

    return Ingress


def check_compatible(base, other, name: str) -> None:
    """One request schema serves every model: a second export must take the same requests."""
    for field in ("conditioning", "class_names", "samplers", "default_size_px", "size_multiple_px", "trained_sizes_px"):
        if getattr(base, field) != getattr(other, field):
            raise ValueError(
                f"models.{name}: its {field} {getattr(other, field)!r} differs from the base model's "
                f"{getattr(base, field)!r}; serve it as an application of its own"
            )


def check_same_tokens(base: PromptTokens | None, other: PromptTokens | None, name: str) -> None:
    """The ingress bounds every model's prompts with the base model's tokenizer: a second text
    model must read text the same way (the same tokenizer and length)."""
    if base is None or other is None:
        return
    if base.max_tokens != other.max_tokens or base.tokenizer.to_str() != other.tokenizer.to_str():
        raise ValueError(
            f"models.{name}: its tokenizer or prompt length ({other.max_tokens} tokens) differs from the "
            f"base model's ({base.max_tokens}): serve it as an application of its own"
        )


def build_app(args: dict):
    """The application for `serve run` / `serve.run`: `args` are ServeSettings' fields."""
    settings = ServeSettings(**args)
    if settings.safety_model is None:
        log.warning("output safety filter: OFF, no safety_model configured: generated images leave unchecked")
    base = load_backend(settings.model, settings.backend, settings.device, settings.lora)
    info, tokens = base.info(), base.prompt_tokens()  # limits shape the schema
    own = (info.guidance_scale, info.guidance_interval)
    guidance = dict.fromkeys(settings.model_names(), own)  # adapters: the base's
    for name, folder in settings.models.items():
        other = load_backend(folder, settings.backend, settings.device)
        other_info = other.info()
        check_compatible(info, other_info, name)
        check_same_tokens(tokens, other.prompt_tokens(), name)
        guidance[name] = (other_info.guidance_scale, other_info.guidance_interval)
    generator = Generator.options(
        max_ongoing_requests=settings.max_ongoing_requests,
        max_queued_requests=settings.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": settings.retry_after_s},
        ray_actor_options={"num_cpus": settings.num_cpus},
    ).bind(settings.model_dump())
    return build_ingress(settings, info, tokens, guidance).bind(generator)


def run_server(
    settings: ServeSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    blocking: bool = True,
    name: str = "sfumato",
    route_prefix: str = "/",
):
    """`sfumato serve`: start Serve's HTTP proxy on host:port (local Ray, or $RAY_ADDRESS) and run
    the app; blocking until interrupted unless told otherwise."""
    from sfumato.config import RayConfig
    from sfumato.runtime import init_ray

    init_ray(RayConfig())
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_app(settings.model_dump()), name=name, route_prefix=route_prefix, blocking=blocking)
