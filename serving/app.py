"""The Ray Serve application: one deployment that is both the FastAPI ingress and the model.

A replica loads the checkpoint, runs one warm-up forward, and then answers

    POST /v1/segment?format=png|json|overlay   a JPEG or PNG (raw body or multipart file field)
    POST /v1/clicks                            correction clicks (JSON: image_id, width, height,
                                               clicks [{x, y, cls}]) -> serving.clicks_store
    GET  /v1/model                             classes, palette, version, metrics, click source
    GET  /healthz   GET /readyz                alive / weights loaded and warm-up done
    GET  /                                     a page to try it in a browser
    /label-studio/{health,setup,predict,webhook}  Label Studio's ML backend (serving.label_studio)

Every answer carries `X-Model-Version`; segmentations also `X-Classes-Present` (class ids),
with `serving.suggest_clicks` > 0 `X-Disagreement` (the teachers' mean disagreement) and
`X-Suggested-Clicks` (`x,y;x,y;...`, where to click next: serving.committee),
`X-Batch-Size` (images in the forward it shared) and `Server-Timing` (decode, queue,
forward, encode). Refused inputs get 4xx with a JSON body `{"error": <code>, "detail":
<reason>}` (see `serving.imaging`); an overloaded deployment answers 503 with
`Retry-After` (Serve's `max_queued_requests` with a `BackpressureConfig`) instead of
queueing without bound.

Why a single deployment: on a few CPU cores, a separate ingress deployment would cost a
second hop per request and a process competing with the model for the same cores.
Decoding and encoding run in threads and every forward on one dedicated thread, so the
replica's event loop keeps accepting requests while a forward runs (torch releases the GIL).

Batching (`@serve.batch`, priced by pixels in `serving.batching`): images wait while a
forward runs and then go together; a lone request does not wait for company
(`batch_wait_timeout_s` applies only while other requests are in the replica).

`build_app` is the application builder behind both `seminar serve` and
`serving/serve_config.yaml`.
"""

import asyncio
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve.config import BackpressureConfig, RequestRouterConfig
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from seminar.config import ServingConfig
from seminar.data.clicks import append_clicks, make_click_table
from seminar.predict import Segmenter, restore_size
from seminar.registry import resolve_model
from serving.batching import PixelBudget, QueuedImage, batch_cost, predict_batch
from serving.committee import Committee, suggested_clicks
from serving.imaging import (
    MAX_CLICKS_PER_REQUEST,
    RLE_CONVENTION,
    InputError,
    check_declared_type,
    check_size,
    decode_image,
    label_png,
    mime_type,
    overlay_png,
    segmentation_json,
)
from serving import label_studio
from serving.serve_metrics import ServingMetrics

WEB_PAGE = Path(__file__).parent / "index.html"
ROUTES = ("/", "/healthz", "/readyz", "/v1/model", "/v1/segment", "/v1/clicks", *label_studio.ROUTES)
CLICKS_MAX_BYTES = 2**20  # a POST /v1/clicks body
# Room for the multipart envelope around an image of max_bytes.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
SLOW_UPLOAD_S = 1.0  # the time a body gets while serving.max_slow_uploads others are arriving
CROWDED_STALL_S = 0.25  # ... and the longest it may then pause between two chunks
# Serve's router holds requests that find the replicas full and asks again after a backoff that
# grows to 0.5 s by default, admitting two requests per replica per round: the queue behind a
# burst drains at ~4 requests/s. Asking every 50 ms at most drains it ten times faster, for two
# queue-length probes per replica per 50 ms while the queue is not empty.
ROUTER_MAX_BACKOFF_S = 0.05
OutputFormat = Literal["png", "json", "overlay"]


class ServeArgs(BaseModel):
    """The application's arguments (`args:` in serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="checkpoint dir, s3:// URI, or registry name <prefix>/<model>[/<version>]")
    which: Literal["best_teacher", "primary_teacher", "primary_student", "teacher_ensemble"] | None = Field(
        None, description="which network answers (default: the spec's method.inference)")
    registry: str | None = Field(None, description="registry for bare model names (default: $SEMINAR_REGISTRY)")
    serving: ServingConfig = Field(default_factory=ServingConfig)


class Click(BaseModel):
    model_config = ConfigDict(extra="forbid")

    x: float = Field(ge=0, allow_inf_nan=False)
    y: float = Field(ge=0, allow_inf_nan=False)
    cls: int = Field(ge=0)


class ClickBatch(BaseModel):
    """POST /v1/clicks: correction clicks on one image, in its own pixels."""

    model_config = ConfigDict(extra="forbid")

    image_id: str = Field(min_length=1, max_length=200, pattern=r"^[^/\\\x00-\x1f]+$",
                          description="the image's id in the training data (a folder dataset: its file stem)")
    width: int = Field(ge=1, le=65535)
    height: int = Field(ge=1, le=65535)
    clicks: list[Click] = Field(min_length=1, max_length=MAX_CLICKS_PER_REQUEST)


@dataclass
class Inferred:
    """One image's share of a batched forward."""

    probs: torch.Tensor  # [C, h, w] at inference size
    disagreement: torch.Tensor | None  # [h, w] of the teachers (serving.suggest_clicks), else None
    batch_size: int  # images in the forward it was part of
    forward_s: float  # that forward's duration


class UploadAdmission:
    """How long a request body may take to arrive, in one replica.

    A body still arriving holds a replica slot: the first max_slow_uploads in flight get
    body_timeout_s (then 408); while that many are in flight, a new one must arrive within
    SLOW_UPLOAD_S without pausing for more than CROWDED_STALL_S, or is told to come back (503),
    so senders that never finish cannot hold every slot in turn, while fast uploads, however
    many, arrive well within it. A crowd keeps that rule on until body_timeout_s after it was
    last seen (or one of its bodies was refused): Serve's router lets a flood of slow senders in
    a few at a time, and they must not earn a second round of full timeouts when the first ends.

    `clock` (time.monotonic by default) is injectable, so that the rule is tested with a fake one.
    """

    def __init__(self, max_slow_uploads: int, body_timeout_s: float, retry_after_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.max_slow_uploads = max_slow_uploads
        self.body_timeout_s = body_timeout_s
        self.retry_after_s = retry_after_s
        self.clock = clock
        self.uploads = 0  # request bodies being received
        self.crowded_until = float("-inf")  # clock() until which new bodies get only SLOW_UPLOAD_S

    def admit(self) -> tuple[float, float | None, bool]:
        """A body starts arriving: (its timeout, its longest pause or None, crowded). The caller
        calls `done` when it has arrived or failed."""
        now = self.clock()
        if self.uploads >= self.max_slow_uploads:
            self.crowded_until = now + self.body_timeout_s
        crowded = now < self.crowded_until
        self.uploads += 1
        if crowded:
            return min(SLOW_UPLOAD_S, self.body_timeout_s), CROWDED_STALL_S, True
        return self.body_timeout_s, None, False

    def timed_out(self, crowded: bool) -> InputError | None:
        """A body did not arrive in time: the answer to give instead of the 408 (a 503 for a
        crowded one, whose flood goes on), or None."""
        if not crowded:
            return None
        self.crowded_until = self.clock() + self.body_timeout_s  # the flood goes on
        return InputError(503, "busy", f"{self.uploads - 1} other uploads in progress; retry", self.retry_after_s)

    def done(self) -> None:
        self.uploads -= 1

    async def receive(self, request: Request, max_bytes: int, json_body: bool = False) -> bytes:
        timeout_s, stall_s, crowded = self.admit()
        try:
            return await read_upload(request, max_bytes, timeout_s, json_body, stall_s=stall_s)
        except InputError as error:
            busy = self.timed_out(crowded) if error.error == "body_timeout" else None
            if busy is not None:
                raise busy from None
            raise
        finally:
            self.done()


class SegmentationService:
    """What one replica holds: the model, the batch queue, the metrics."""

    def __init__(self, args: ServeArgs):
        self.args = args
        self.cfg = cfg = args.serving
        torch.set_num_threads(cfg.torch_threads or len(os.sched_getaffinity(0)))
        self.ready = False
        resolved = resolve_model(args.model, args.registry)
        if cfg.suggest_clicks:  # every teacher, for their disagreement (serving.committee)
            self.committee = Committee.load(resolved.checkpoint, args.which, cfg.runtime, cfg.torch_threads, cfg.device)
            self.segmenter = self.committee.served
        else:
            self.committee = None
            self.segmenter = Segmenter.load(resolved.checkpoint, args.which, cfg.device, cfg.runtime, cfg.torch_threads)
        self.resolved = resolved
        self.version = resolved.version
        self.untinted = tuple(i for i, name in enumerate(self.segmenter.classes) if name.lower() == "background")
        self.budget = PixelBudget(cfg.max_batch_size, cfg.batch_pixel_budget)
        self.infer.set_max_batch_size(cfg.max_batch_size)
        self.in_flight = 0  # segment requests in this replica, from body read to answer
        self.admission = UploadAdmission(cfg.max_slow_uploads, cfg.body_timeout_s, cfg.retry_after_s)
        self.forward_idle = asyncio.Event()  # set while no batched forward runs
        self.forward_idle.set()
        self.metrics = ServingMetrics(self.version, self.segmenter.which)
        # Every forward runs on this one thread (off the event loop): torch then keeps a single
        # warm team of intra-op threads instead of one per thread of a pool.
        self.forward_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        # Warm-up: the first forward allocates and picks kernels; pay for it before /readyz says yes.
        warm = torch.zeros(3, cfg.infer_size, cfg.infer_size * 3 // 4)
        self.forward_thread.submit(self._run, [warm]).result()
        self.ready = True

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_http_app(self)

    def check_health(self) -> None:
        """Serve calls this periodically; a replica that raises is replaced."""
        if not self.ready:
            raise RuntimeError("model not loaded")

    # ---- the batched forward ---------------------------------------------------------

    # The limits here are placeholders: __init__ sets the configured ones.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, batch_size_fn=batch_cost)
    async def infer(self, images: list[QueuedImage]) -> list[Inferred]:
        self.forward_idle.clear()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.forward_thread, self._forward, images)
        finally:
            self.forward_idle.set()

    def _forward(self, images: list[QueuedImage]) -> list[Inferred]:
        height, width = max(i.height for i in images), max(i.width for i in images)
        self.metrics.batch(len(images), len(images) * height * width)
        start = time.perf_counter()
        answers = self._run([i.tensor for i in images])
        forward_s = time.perf_counter() - start
        return [Inferred(p, d, len(images), forward_s) for p, d in answers]

    def _run(self, tensors: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per image: the served network's probabilities and the teachers' disagreement (or None)."""
        if self.committee:
            return self.committee(tensors)
        return [(p, None) for p in predict_batch(self.segmenter.predict_probs, tensors)]

    # ---- one request -----------------------------------------------------------------

    def _prepare(self, data: bytes) -> tuple[np.ndarray, torch.Tensor]:
        image = decode_image(data, self.cfg.max_pixels)
        self.metrics.image(image.shape[1], image.shape[0])
        return image, self.segmenter.model_input(image, self.cfg.infer_size)

    def _answer(self, image: np.ndarray, inferred: Inferred, fmt: OutputFormat, alpha: float) -> Response:
        labels, confidence = restore_size(inferred.probs, *image.shape[:2])
        present = ",".join(str(c) for c in np.flatnonzero(np.bincount(labels.ravel())))
        headers = {"X-Classes-Present": present}
        suggestions = None
        if inferred.disagreement is not None:
            height, width = image.shape[:2]
            disagreement = inferred.disagreement.numpy()
            mean_disagreement = float(disagreement.mean())
            suggestions = suggested_clicks(disagreement, self.cfg.suggest_clicks, width, height)
            # every format carries them, so that the page draws them over its overlay
            headers["X-Disagreement"] = f"{mean_disagreement:.4f}"
            headers["X-Suggested-Clicks"] = ";".join(f"{c['x']},{c['y']}" for c in suggestions)
        classes, palette = self.segmenter.classes, self.segmenter.palette
        if fmt == "json":
            answer = segmentation_json(labels, confidence, classes, palette, self.version)
            if suggestions is not None:
                answer.update(disagreement=mean_disagreement, suggested_clicks=suggestions)
            return JSONResponse(answer, headers=headers)
        if fmt == "overlay":
            body = overlay_png(image, labels, palette, alpha, self.untinted)
        else:
            body = label_png(labels, palette)
        return Response(body, media_type="image/png", headers=headers)

    async def receive(self, request: Request, max_bytes: int, json_body: bool = False) -> bytes:
        """The request's body, read under the upload-admission rule (`UploadAdmission`)."""
        return await self.admission.receive(request, max_bytes, json_body)

    async def segment(self, data: bytes, fmt: OutputFormat, alpha: float | None) -> Response:
        self.in_flight += 1
        try:
            return await self._segment(data, fmt, alpha)
        finally:
            self.in_flight -= 1

    async def labels(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """An image's label map and confidence at its own size (Label Studio's /predict)."""
        self.in_flight += 1
        try:
            image, inferred, _ = await self._infer_image(data)
        finally:
            self.in_flight -= 1
        return await asyncio.to_thread(restore_size, inferred.probs, *image.shape[:2])

    async def _infer_image(self, data: bytes) -> tuple[np.ndarray, Inferred, float]:
        """(decoded image, its share of a batched forward, when decoding ended)."""
        image, tensor = await asyncio.to_thread(self._prepare, data)
        decoded = time.perf_counter()
        # Serve's batcher closes a batch after the timeout even while the previous forward is
        # still running, so under load it would queue many small batches. Holding images
        # back until the forward is done lets everything that arrived meanwhile form one batch.
        await self.forward_idle.wait()
        # Wait for a batch to fill only while other requests are in this replica: a lone
        # request goes straight to the forward instead of waiting out the timeout for nobody.
        self.infer.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s if self.in_flight > 1 else 0.0)
        inferred = await self.infer(QueuedImage(tensor, self.budget))
        return image, inferred, decoded

    async def _segment(self, data: bytes, fmt: OutputFormat, alpha: float | None) -> Response:
        start = time.perf_counter()
        image, inferred, decoded = await self._infer_image(data)
        answered = time.perf_counter()
        alpha = self.cfg.overlay_alpha if alpha is None else alpha
        response = await asyncio.to_thread(self._answer, image, inferred, fmt, alpha)
        # Where the time went, for clients and browser dev tools (W3C Server-Timing).
        queued_s = answered - decoded - inferred.forward_s
        response.headers["Server-Timing"] = ", ".join([
            f"decode;dur={1000 * (decoded - start):.1f}",
            f"queue;dur={1000 * queued_s:.1f};desc=\"waiting for a batch\"",
            f"forward;dur={1000 * inferred.forward_s:.1f};desc=\"batch of {inferred.batch_size}\"",
            f"encode;dur={1000 * (time.perf_counter() - answered):.1f}",
        ])
        response.headers["X-Batch-Size"] = str(inferred.batch_size)
        return response

    def store_clicks(self, data: bytes) -> tuple[str, int]:
        """Validate a ClickBatch body and append it to serving.clicks_store: (part, clicks)."""
        try:
            batch = ClickBatch.model_validate_json(data)
        except ValidationError as e:
            raise InputError(422, "invalid_click", "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()[:5])) from None
        num_classes = len(self.segmenter.classes)
        for i, click in enumerate(batch.clicks):
            if click.cls >= num_classes:
                raise InputError(422, "invalid_click", f"clicks.{i}.cls: {click.cls} is outside the model's "
                                                       f"{num_classes} classes (0..{num_classes - 1})")
            if click.x > batch.width - 1 or click.y > batch.height - 1:
                raise InputError(422, "invalid_click", f"clicks.{i}: ({click.x:g}, {click.y:g}) is outside the "
                                                       f"{batch.width}x{batch.height} image")
        return self.write_clicks(batch.image_id, [(c.x, c.y, c.cls) for c in batch.clicks]), len(batch.clicks)

    def write_clicks(self, image_id: str, clicks: list[tuple[float, float, int]]) -> str:
        """Append one image's checked (x, y, class) clicks to serving.clicks_store: the part written."""
        x, y, cls = zip(*clicks)
        table = make_click_table([image_id] * len(clicks), x, y, cls, [1] * len(clicks), "user")
        return append_clicks(self.cfg.clicks_store, table)

    def describe(self) -> dict:
        meta = self.segmenter.metadata
        return {
            "version": self.version,
            "checkpoint_version": self.segmenter.version,
            "which": self.segmenter.which,
            "runtime": self.segmenter.runtime,  # onnx, or torch (asked for, or the fallback)
            "source": self.args.model,
            "classes": [{"id": i, "name": name, "color": list(colour)}
                        for i, (name, colour) in enumerate(zip(self.segmenter.classes, self.segmenter.palette))],
            "palette": [list(c) for c in self.segmenter.palette],
            "click_source": meta.get("click_source"),
            "metrics": _finite(self.resolved.registry_metadata.get("metrics") or meta.get("metrics") or {}),
            "step": meta.get("step"),
            "created": meta.get("created"),
            "code_version": meta.get("code_version"),
            "registry": {k: self.resolved.registry_metadata.get(k) for k in ("model", "version", "created")}
            if self.resolved.registry_metadata else None,
            "inference": {"infer_size": self.cfg.infer_size, "max_batch_size": self.cfg.max_batch_size,
                          "batch_pixel_budget": self.cfg.batch_pixel_budget, "device": self.cfg.device,
                          "suggest_clicks": self.cfg.suggest_clicks if self.committee else 0},
            "clicks": {"collected": bool(self.cfg.clicks_store)},
            "limits": {"max_bytes": self.cfg.max_bytes, "max_pixels": self.cfg.max_pixels,
                       "content_types": ["image/jpeg", "image/png"]},
            "formats": ["png", "json", "overlay"],
            "overlay_untinted": list(self.untinted),  # classes the overlay leaves unpainted
            "rle_format": RLE_CONVENTION,
        }


def _finite(metrics: dict) -> dict:
    """JSON has no NaN: report a metric that was never measured as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


# ---- HTTP ----------------------------------------------------------------------------


async def read_upload(request: Request, max_bytes: int, timeout_s: float, json_body: bool = False,
                      stall_s: float | None = None) -> bytes:
    """The image bytes of a raw or multipart body (or with `json_body`, a JSON body), refusing
    oversize bodies early and bodies that have not arrived within `timeout_s`, or (with
    `stall_s`) that paused longer than that between two chunks (408)."""
    try:
        return await asyncio.wait_for(_read_body(request, max_bytes, json_body, stall_s), timeout_s)
    except asyncio.TimeoutError:
        raise InputError(408, "body_timeout", f"the request body did not arrive within {timeout_s:g} s") from None


async def _read_body(request: Request, max_bytes: int, json_body: bool = False, stall_s: float | None = None) -> bytes:
    content_type = mime_type(request.headers.get("content-type"))
    multipart = content_type == "multipart/form-data" and not json_body
    if json_body and content_type != "application/json":
        raise InputError(415, "unsupported_media_type", f"Content-Type {content_type!r} is not accepted; "
                                                        "send the clicks as application/json")
    if not multipart and not json_body:
        check_declared_type(content_type)
    limit = max_bytes + (MULTIPART_OVERHEAD_BYTES if multipart else 0)
    declared_length = request.headers.get("content-length", "")
    if declared_length.isdigit():
        check_size(int(declared_length), limit)
    body = bytearray()
    chunks = aiter(request.stream())
    while True:
        try:
            chunk = await asyncio.wait_for(anext(chunks), stall_s)  # stall_s None: no limit
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise InputError(408, "body_timeout", f"the request body paused for over {stall_s:g} s") from None
        body += chunk
        check_size(len(body), limit)
    data = await _file_field(request, bytes(body)) if multipart else bytes(body)
    check_size(len(data), max_bytes)
    return data


async def _file_field(request: Request, body: bytes) -> bytes:
    """The first file of a multipart/form-data body (field 'file', 'image', or any)."""
    async def replay():
        yield body

    try:
        form = await MultiPartParser(request.headers, replay(), max_files=4, max_fields=16).parse()
    except MultiPartException as e:
        raise InputError(400, "bad_multipart", f"the multipart body cannot be parsed: {e.message}") from None
    files = [(name, value) for name, value in form.multi_items() if isinstance(value, UploadFile)]
    if not files:
        raise InputError(400, "empty_body", "the multipart body has no file field; send the image as "
                                            "a file field named 'file'")
    files.sort(key=lambda item: item[0] not in ("file", "image"))
    upload = files[0][1]
    check_declared_type(upload.content_type)
    data = await upload.read()
    await form.close()
    return data


class VersionHeaderAndMetrics:
    """ASGI middleware: `X-Model-Version` on every answer, and the request metrics.

    Plain ASGI rather than `@app.middleware("http")`: it sits on every request's path and
    Starlette's BaseHTTPMiddleware costs an extra task and stream per request.
    """

    def __init__(self, app, service: "SegmentationService"):
        self.app, self.service = app, service
        self.version_header = (b"x-model-version", service.version.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500  # unless a response starts: an exception escaped the app

        async def send_with_version(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), self.version_header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_version)
        finally:
            self.service.metrics.request(route_of(scope), status, time.perf_counter() - start)


def route_of(scope) -> str:
    """The route for metric labels: a known path or 'other' (keeps the label set small)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path if path in ROUTES else "other"


def build_http_app(service: SegmentationService) -> FastAPI:
    app = FastAPI(title="Seminar segmentation", version=service.version)

    app.add_middleware(VersionHeaderAndMetrics, service=service)

    @app.exception_handler(InputError)
    async def refused(request: Request, error: InputError) -> JSONResponse:
        headers = {"Retry-After": f"{error.retry_after_s:g}"} if error.retry_after_s is not None else None
        return JSONResponse({"error": error.error, "detail": error.detail}, status_code=error.status,
                            headers=headers)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, error: RequestValidationError) -> JSONResponse:
        reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in error.errors())
        return JSONResponse({"error": "invalid_parameter", "detail": reasons}, status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(WEB_PAGE.read_text())

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"alive": True}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if not service.ready:
            return JSONResponse({"ready": False, "detail": "loading the model"}, status_code=503)
        return JSONResponse({"ready": True, "model_version": service.version})

    @app.get("/v1/model")
    async def model() -> dict:
        return service.describe()

    @app.post("/v1/segment", responses={200: {"content": {"image/png": {}, "application/json": {}}}})
    async def segment(request: Request, format: OutputFormat = "png",
                      alpha: float | None = Query(None, ge=0, le=1, description="overlay opacity")) -> Response:
        data = await service.receive(request, service.cfg.max_bytes)
        return await service.segment(data, format, alpha)

    @app.post("/v1/clicks", status_code=201)
    async def clicks(request: Request) -> JSONResponse:
        """Correction clicks, stored for the next training run (the model is retrained, not edited)."""
        if not service.cfg.clicks_store:
            raise InputError(404, "clicks_not_collected", "this endpoint does not collect clicks "
                                                          "(serving.clicks_store is not set)")
        data = await service.receive(request, CLICKS_MAX_BYTES, json_body=True)
        part = await asyncio.to_thread(service.store_clicks, data)
        return JSONResponse({"stored": part[1], "part": part[0]}, status_code=201)

    label_studio.add_routes(app, service)
    return app


# ---- the Serve application -----------------------------------------------------------

SegmentationDeployment = serve.deployment(name="segmenter")(serve.ingress()(SegmentationService))


def deployment_options(cfg: ServingConfig) -> dict:
    options = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        # Without retry_after_s Serve's 503 carries no Retry-After header.
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=cfg.retry_after_s),
        "request_router_config": RequestRouterConfig(max_backoff_s=ROUTER_MAX_BACKOFF_S),
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": 1 if cfg.device == "cuda" else 0},
    }
    if cfg.omp_wait_policy:  # read when OpenMP starts: it must be in the replica's environment
        options["ray_actor_options"]["runtime_env"] = {"env_vars": {"OMP_WAIT_POLICY": cfg.omp_wait_policy.upper()}}
    if cfg.num_replicas is not None:
        options["num_replicas"] = cfg.num_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "initial_replicas": max(cfg.min_replicas, 1),
            "target_ongoing_requests": cfg.target_ongoing_requests,
        }
    return options


def build_app(args: ServeArgs | dict) -> serve.Application:
    """Application builder: `serving.app:build_app` in serve_config.yaml, or `seminar serve`."""
    args = ServeArgs.model_validate(args) if isinstance(args, dict) else args
    return SegmentationDeployment.options(**deployment_options(args.serving)).bind(args)
