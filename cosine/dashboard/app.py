"""The queue dashboard: an ASGI app (Starlette) that samples the deployment from Redis about once a second and
pushes the page's state to every open page over server-sent events.

Routes: ``/`` the page (assets shipped in the package, no CDN), ``/api/state`` the latest state as JSON,
``/api/events`` the same state as a server-sent event each time it is sampled, ``/metrics`` the Prometheus
exposition (:mod:`cosine.metrics_export`), ``/health``. Read-only unless an admin token is configured: then
``POST /api/actions/drain`` (a worker finishes what it holds and exits) and ``POST /api/actions/requeue`` (a
dead-lettered request goes back to the request stream) take ``Authorization: Bearer TOKEN``, on a connection
of their own (``admin_settings``: the dashboard's own Redis user may only read), and are logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from importlib import resources

import anyio
import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from cosine.broker import RedisSettings, connect
from cosine.dashboard.view import History, build_view
from cosine.keys import Keys
from cosine.metrics_export import CONTENT_TYPE_LATEST, render
from cosine.status import collect_status

log = logging.getLogger(__name__)

STATIC = resources.files("cosine.dashboard") / "static"
DEAD_LETTERS_SHOWN = 5
TIMELINE = 30  # controller decisions shown


def dead_letters(r: redis.Redis, keys: Keys, n: int = DEAD_LETTERS_SHOWN) -> list[dict]:
    """The latest ``n`` dead letters: id, the stream it left, why, who moved it, and whether it can be requeued."""
    out = []
    for eid, fields in r.xrevrange(keys.dlq, count=n):
        f = {k.decode(errors="replace"): v for k, v in fields.items()}

        def text(name: str) -> str:
            v = f.get(name, b"")
            return v.decode(errors="replace") if isinstance(v, bytes) else str(v)

        out.append({"id": eid.decode(), "stream": text("stream"), "reason": text("reason"), "origin": text("origin"),
                    "requeueable": text("stream") == keys.requests and not any(k.startswith("size:") for k in f)})
    return out


class Sampler:
    """Reads the deployment every ``interval`` seconds and keeps the page's latest state."""

    def __init__(self, settings: RedisSettings, interval: float = 1.0) -> None:
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.interval = interval
        self.history = History()
        self.state: dict = {"redis_up": False, "error": "not sampled yet", "seq": 0}
        self.changed = asyncio.Condition()
        self._r: redis.Redis | None = None

    def sample(self) -> dict:
        """One reading (blocking: run it in a thread)."""
        if self._r is None:
            self._r = connect(self.settings)
        try:
            snap = collect_status(self.settings, timeline=TIMELINE, r=self._r)
            return build_view(snap, dead_letters(self._r, self.keys), self.history)
        except redis.RedisError as exc:
            log.warning("dashboard could not read Redis: %s", exc)
            return {"redis_up": False, "error": f"{type(exc).__name__}: {exc}", "now": time.time(),
                    "series": list(self.history.series)}

    async def run(self) -> None:
        while True:
            state = await anyio.to_thread.run_sync(self.sample)
            async with self.changed:
                state["seq"] = self.state.get("seq", 0) + 1
                state["interval_s"] = self.interval
                self.state = state
                self.changed.notify_all()
            await asyncio.sleep(self.interval)

    async def next_state(self, seen: int) -> dict:
        """The state once its sequence number passes ``seen``."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.state["seq"] > seen)
            return self.state


class Actions:
    """The admin actions, each checked against the token and logged with who asked."""

    def __init__(self, settings: RedisSettings, token: str | None) -> None:
        self.settings, self.token = settings, token
        self.keys = Keys(settings.prefix)
        self._r: redis.Redis | None = None

    @property
    def r(self) -> redis.Redis:
        if self._r is None:
            self._r = connect(self.settings)
        return self._r

    def authorise(self, request: Request) -> JSONResponse | None:
        """None when the request may act; else the refusal (403 without a token configured, 401 wrong token)."""
        if not self.token:
            return JSONResponse({"error": "actions are off: start the dashboard with --admin-token-file"}, 403)
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            log.warning("dashboard action refused from %s: wrong admin token", _who(request))
            return JSONResponse({"error": "wrong or missing admin token"}, 401)
        return None

    def drain(self, worker: str, who: str) -> JSONResponse:
        if self.r.zscore(self.keys.workers, worker) is None:
            return JSONResponse({"error": f"no worker {worker!r} is registered"}, 404)
        self.r.hset(self.keys.drain, worker, f"asked from the dashboard by {who} at {time.strftime('%H:%M:%S')}")
        log.warning("dashboard action by %s: drain worker %s", who, worker)
        return JSONResponse({"ok": True, "worker": worker})

    def requeue(self, entry_id: str, who: str) -> JSONResponse:
        rows = self.r.xrange(self.keys.dlq, entry_id, entry_id)
        if not rows:
            return JSONResponse({"error": f"no dead letter {entry_id}"}, 404)
        fields = {k.decode(errors="replace"): v for k, v in rows[0][1].items()}
        stream = fields.get("stream", b"").decode(errors="replace")
        if stream != self.keys.requests:
            return JSONResponse({"error": f"only requests can be requeued; this came from {stream}"}, 409)
        if any(k.startswith("size:") for k in fields):
            return JSONResponse({"error": "its fields were cut when it was dead-lettered; it cannot be requeued"}, 409)
        original = {k[len("orig:"):]: v for k, v in fields.items() if k.startswith("orig:")}
        pipe = self.r.pipeline(transaction=True)
        pipe.xadd(stream, original)
        pipe.xdel(self.keys.dlq, entry_id)
        new_id = pipe.execute()[0].decode()
        log.warning("dashboard action by %s: requeued dead letter %s as %s %s", who, entry_id, stream, new_id)
        return JSONResponse({"ok": True, "id": new_id})


def _who(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown"


def create_app(settings: RedisSettings, *, interval: float = 1.0, admin_token: str | None = None,
               admin_settings: RedisSettings | None = None, stopping: Callable[[], bool] = lambda: False
               ) -> Starlette:
    """The dashboard over the deployment under ``settings`` (a read-only user suffices); actions only with
    ``admin_token``, through ``admin_settings`` (default: ``settings``). ``stopping`` says the server is
    shutting down: open event streams then end, so a page left open never holds up a stop."""
    sampler = Sampler(settings, interval)
    actions = Actions(admin_settings or settings, admin_token)

    async def page(_request: Request) -> Response:
        with resources.as_file(STATIC / "index.html") as path:
            return FileResponse(path, headers={"Cache-Control": "no-store"})

    async def state(_request: Request) -> JSONResponse:
        return JSONResponse({**sampler.state, "actions": bool(admin_token)})

    async def events(request: Request) -> StreamingResponse:
        async def stream():
            seen = 0
            yield "retry: 2000\n\n"
            quiet = 0.0
            while not stopping() and not await request.is_disconnected():
                with anyio.move_on_after(1.0) as scope:
                    current = await sampler.next_state(seen)
                if scope.cancelled_caught:
                    quiet += 1.0
                    if quiet >= 15:  # a comment now and then keeps proxies from closing a quiet stream
                        quiet = 0.0
                        yield ": keep-alive\n\n"
                    continue
                seen = current["seq"]
                yield f"data: {json.dumps({**current, 'actions': bool(admin_token)})}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    async def metrics(_request: Request) -> Response:
        body = await anyio.to_thread.run_sync(render, settings)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def health(_request: Request) -> JSONResponse:
        up = sampler.state.get("redis_up", False)
        return JSONResponse({"status": "ok" if up else "redis unreachable"}, 200 if up else 503)

    async def action(request: Request) -> JSONResponse:
        refused = actions.authorise(request)
        if refused is not None:
            return refused
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the body must be JSON"}, 400)
        kind, who = request.path_params["kind"], _who(request)
        if kind not in ("drain", "requeue"):
            return JSONResponse({"error": f"no action {kind!r} (drain, requeue)"}, 404)
        arg = body.get("worker" if kind == "drain" else "id") if isinstance(body, dict) else None
        if not isinstance(arg, str) or not arg:
            return JSONResponse({"error": "drain takes {'worker': ID}; requeue takes {'id': DEAD_LETTER_ID}"}, 400)
        try:
            return await anyio.to_thread.run_sync(actions.drain if kind == "drain" else actions.requeue, arg, who)
        except redis.RedisError as exc:
            log.warning("dashboard action %s by %s failed: %s", kind, who, exc)
            return JSONResponse({"error": f"Redis refused: {exc}"}, 502)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        task = asyncio.create_task(sampler.run())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    routes = [Route("/", page), Route("/api/state", state), Route("/api/events", events), Route("/metrics", metrics),
              Route("/health", health), Route("/api/actions/{kind:str}", action, methods=["POST"]),
              Mount("/static", StaticFiles(directory=str(STATIC)), name="static")]
    return Starlette(routes=routes, lifespan=lifespan)
