"""An OpenAI-compatible HTTP endpoint over a deployment: ``/v1/completions``, ``/v1/chat/completions`` (plain and
streamed over server-sent events), ``/v1/models`` and ``/health``.

Requests go through :class:`~cosine.client.AsyncClient` like any producer's, so outputs are exactly the target's.
OpenAI's parameters map onto the client's (``max_tokens`` → ``max_new_tokens``, ``temperature``, ``top_p``,
``seed``, ``stop``); those CoSine does not implement (``n`` > 1, ``logprobs``, penalties, ``logit_bias``, tools)
are refused with OpenAI's error shape rather than ignored. Each response carries ``cosine``: the request's
speculation stats. A streaming client that disconnects cancels its request.
"""

from __future__ import annotations

import contextlib
import json
import time

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from cosine.broker import RedisSettings
from cosine.client import AsyncClient
from cosine.errors import CosineError, InvalidParameterError, NoWorkersError, OverloadedError, RequestTimeoutError

# OpenAI parameters accepted, and those refused unless at their neutral value (value given: refused).
NEUTRAL = {"n": 1, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": None,
           "top_logprobs": None, "logit_bias": None, "echo": False, "suffix": None, "tools": None,
           "tool_choice": None, "functions": None, "response_format": None}
ACCEPTED = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
            "stop", "stream", "stream_options", "user", "top_k", "ignore_eos"}  # the last two: vLLM's extensions


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": None}}, status_code=self.status)


def sampling(body: dict) -> dict:
    """The client's parameters for an OpenAI request body; raises :class:`OpenAIError` for what CoSine does not
    do (named, never ignored)."""
    for key in sorted(set(body) - ACCEPTED):
        if key not in NEUTRAL or body[key] not in (NEUTRAL[key], None):
            raise OpenAIError(400, f"'{key}' is not supported by this server", key)
    out: dict = {}
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        out["max_new_tokens"] = limit
    for key in ("temperature", "top_p", "seed", "top_k", "ignore_eos"):
        if body.get(key) is not None:
            out[key] = body[key]
    stop = body.get("stop")
    if stop is not None:
        out["stop"] = [stop] if isinstance(stop, str) else stop
    return out


def _finish(reason: str | None) -> str | None:
    return {"length": "length", "stop": "stop"}.get(reason or "", reason)


class Server:
    """The app's state: one :class:`AsyncClient` and the model name it reports."""

    def __init__(self, settings: RedisSettings, model: str) -> None:
        self.settings, self.model = settings, model
        self.client: AsyncClient | None = None

    async def startup(self) -> None:
        self.client = AsyncClient(settings=self.settings)

    async def shutdown(self) -> None:
        if self.client is not None:
            await self.client.close()

    # -- routes ---------------------------------------------------------------------------------------
    async def models(self, _request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                         "owned_by": "cosine"}]})

    async def health(self, _request: Request) -> JSONResponse:
        try:
            await self.client.r.ping()  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - any failure to reach the broker is unhealthy
            return JSONResponse({"status": "unhealthy", "reason": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def completions(self, request: Request):
        return await self._handle(request, chat=False)

    async def chat(self, request: Request):
        return await self._handle(request, chat=True)

    async def _handle(self, request: Request, chat: bool):
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise OpenAIError(400, "the body must be a JSON object")
            prompt = body.get("messages") if chat else body.get("prompt")
            if prompt is None:
                raise OpenAIError(400, f"'{'messages' if chat else 'prompt'}' is required",
                                  "messages" if chat else "prompt")
            if not chat and isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
                if len(prompt) != 1:
                    raise OpenAIError(400, "one prompt per request (batches are not supported)", "prompt")
                prompt = prompt[0]
            params = sampling(body)
            rid = await self.client.submit(prompt, **params)  # type: ignore[union-attr]
        except OpenAIError as exc:
            return exc.response()
        except InvalidParameterError as exc:
            return OpenAIError(400, str(exc), getattr(exc, "field", None)).response()
        except (NoWorkersError, OverloadedError) as exc:
            return OpenAIError(503, str(exc), kind="server_error").response()
        except json.JSONDecodeError:
            return OpenAIError(400, "the body is not JSON").response()
        created = int(time.time())
        if body.get("stream"):
            return StreamingResponse(self._events(request, rid, chat, created), media_type="text/event-stream")
        try:
            result = await self.client.result(rid)  # type: ignore[union-attr]
        except RequestTimeoutError as exc:
            return OpenAIError(504, str(exc), kind="timeout").response()
        except CosineError as exc:
            return OpenAIError(500, str(exc), kind="server_error").response()
        usage = {"prompt_tokens": int(result.stats.get("prompt_tokens", 0)),
                 "completion_tokens": len(result.token_ids)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        choice = ({"index": 0, "message": {"role": "assistant", "content": result.text},
                   "finish_reason": _finish(result.finish_reason)} if chat else
                  {"index": 0, "text": result.text, "logprobs": None, "finish_reason": _finish(result.finish_reason)})
        return JSONResponse({"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}",
                             "object": "chat.completion" if chat else "text_completion", "created": created,
                             "model": self.model, "choices": [choice], "usage": usage,
                             "cosine": {"request_id": rid, **result.stats}})

    async def _events(self, request: Request, rid: str, chat: bool, created: int):
        """Server-sent events of one request: a chunk per committed text delta, then ``[DONE]``; a client gone
        mid-stream cancels the request."""
        kind = "chat.completion.chunk" if chat else "text_completion"
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{rid}"
        done = False
        try:
            if chat:
                yield _sse({"id": ident, "object": kind, "created": created, "model": self.model,
                            "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
            async for chunk in self.client.follow(rid):  # type: ignore[union-attr]
                if await request.is_disconnected():
                    break
                delta = {"content": chunk.text} if chat else None
                choice = {"index": 0, "finish_reason": _finish(chunk.finish_reason) if chunk.finished else None}
                choice.update({"delta": delta} if chat else {"text": chunk.text, "logprobs": None})
                event = {"id": ident, "object": kind, "created": created, "model": self.model, "choices": [choice]}
                if chunk.finished:
                    event["cosine"] = {"request_id": rid, **(chunk.stats or {})}
                yield _sse(event)
                done = chunk.finished
            yield "data: [DONE]\n\n"
        except CosineError as exc:
            yield _sse({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
        finally:
            if not done:  # the client went away (this task is being cancelled): cancel, shielded from that
                with anyio.CancelScope(shield=True):
                    await self.client.cancel(rid)  # type: ignore[union-attr]


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def create_app(settings: RedisSettings, model: str = "cosine") -> Starlette:
    server = Server(settings, model)
    routes = [Route("/v1/models", server.models), Route("/health", server.health),
              Route("/v1/completions", server.completions, methods=["POST"]),
              Route("/v1/chat/completions", server.chat, methods=["POST"])]

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await server.startup()
        try:
            yield
        finally:
            await server.shutdown()

    return Starlette(routes=routes, lifespan=lifespan)
