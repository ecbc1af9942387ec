"""The translation server's web application: the REST API and the page, on FastAPI.

``create_app`` builds the FastAPI application around a ``Service`` (what is loaded once):

* ``POST /translate``: LibreTranslate's shape (``{"q": text or [texts], "source": "de",
  "target": "en"}`` -> ``{"translatedText": ...}``), with ``beam_size`` and
  ``alternatives`` (the n-best list, with scores);
* ``POST /attention``: one sentence's translation and every layer's and head's
  attention (encoder, decoder, encoder-decoder);
* ``GET /info``, ``GET /languages``, ``GET /health``; ``GET /`` the page, ``/static``
  its script and style; ``/docs`` the OpenAPI page.

Every error is a JSON body ``{"error": "what is wrong"}`` with a 4xx status (5xx only
for the server's own faults), and the server goes on serving. ``BodyLimit`` refuses a
body over the configured size with 413 before it is parsed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

import transformer
from transformer.serve.schemas import (
    ERRORS,
    AttentionRequest,
    AttentionResponse,
    Health,
    TranslateRequest,
    TranslateResponse,
    describe_validation,
)
from transformer.serve.service import ApiError, Batching, Limits, Service

__all__ = ["ApiError", "Batching", "BodyLimit", "Limits", "Service", "create_app"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"


class BodyLimit:
    """ASGI middleware: refuse a request body over ``limit`` bytes with 413, from its
    Content-Length before anything is read, or once that much of a chunked body has come."""

    def __init__(self, app: Callable, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = JSONResponse({"error": self._message()}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"the request body is over this server's limit of {self.limit} bytes"


def create_app(service: Service) -> FastAPI:
    """The FastAPI application serving ``service``; it closes the service when it stops
    (after uvicorn has let the requests in flight finish)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(service.close)

    app = FastAPI(
        title="annotated-transformer translation server",
        version=transformer.__version__,
        description=f"Translates {service.source} -> {service.target} with `{Path(service.checkpoint).name}`. "
        "`POST /translate` takes LibreTranslate's request; every error is `{\"error\": \"...\"}` with a 4xx "
        "status. The page at `/` translates as you type and shows where each word looked.",
        lifespan=lifespan,
    )

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        status, message = describe_validation(e.errors(), request.url.path)
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        log.exception("request to %s failed", request.url.path)
        return JSONResponse({"error": f"internal error ({type(e).__name__}): {e}"}, status_code=500)

    @app.post("/translate", response_model=TranslateResponse, response_model_exclude_none=True, responses=ERRORS,
              summary="Translate one text or a list of texts")
    async def translate(body: TranslateRequest) -> Any:
        service.check_languages(body.source, body.target)
        many = isinstance(body.q, list)
        texts = service.check_texts(body.q)
        beam_size, nbest = service.beam(body.beam_size, body.alternatives)
        found = await service.translate(texts, beam_size, nbest)
        best = [hyps[0][0] for hyps in found]
        out: dict[str, Any] = {"translatedText": best if many else best[0]}
        if body.alternatives:
            alternatives = [[text for text, _ in hyps[1:]] for hyps in found]
            scores = [[score for _, score in hyps] for hyps in found]
            out["alternatives"] = alternatives if many else alternatives[0]
            out["scores"] = scores if many else scores[0]
        return out

    @app.post("/attention", response_model=AttentionResponse, responses=ERRORS,
              summary="One sentence's translation and every layer's and head's attention")
    async def attention(body: AttentionRequest) -> Response:
        service.check_languages(body.source, body.target)
        service.check_texts(body.q)
        beam_size, _ = service.beam(body.beam_size, 0)
        return Response(await service.attention(body.q, beam_size), media_type="application/json")

    @app.get("/health", response_model=Health, summary="Whether the server is up, and what it has decoded")
    async def health() -> Any:
        return {"status": "stopping" if service.batcher.closing else "ok",
                "uptime_s": round(time.time() - service.started, 3),
                "batching": service.batcher.stats.as_dict()}

    @app.get("/info", summary="The model, its languages, the decoding defaults, the limits and its config")
    async def info() -> dict[str, Any]:
        return service.info()

    @app.get("/languages", summary="LibreTranslate's list of languages: the model's one pair")
    async def languages() -> list[dict[str, Any]]:
        return service.languages()

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit, limit=service.limits.max_body_bytes)
    return app
