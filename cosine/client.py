"""The producer client: submit requests, read their output streams, cancel.

``Client`` (blocking) and ``AsyncClient`` (asyncio) share the protocol and the chunk assembly: output is
read with ``XREAD BLOCK`` from the start of the request's output stream, so nothing written before the
client began reading is missed; chunks carry sequence numbers and token offsets, so a replayed round or a
request resumed by another verifier never duplicates or drops tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field, fields

import redis

from cosine import defaults
from cosine.broker import RedisSettings, Streams, connect, connect_async, server_ms, wall_ms, xadd_args
from cosine.errors import (
    InvalidParameterError,
    InvalidRequestError,
    NoWorkersError,
    OverloadedError,
    RequestCancelledError,
    RequestTimeoutError,
    ServerError,
    StreamGapError,
)
from cosine.keys import Keys, check_name
from cosine.ownership import new_secret, output_name, owned_id
from cosine.protocol import Cancel, Chunk, GenerationRequest, ProtocolError, check, decode_entry
from cosine.sampling_params import SamplingParams


@dataclass
class StreamChunk:
    """What a streaming reader gets as tokens commit."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    stats: dict | None = None


@dataclass
class GenerationResult:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: dict = field(default_factory=dict)

    @property
    def mean_acceptance_length(self) -> float:
        return float(self.stats.get("mean_acceptance_length", 1.0))


def default_client_name() -> str:
    """``host-pid``, kept to the id alphabet: who submitted a request, as the dashboard shows it."""
    host = re.sub(r"[^A-Za-z0-9_.\-]", "-", socket.gethostname())[:100] or "client"
    return f"{host}-{os.getpid()}"


def build_request(
    prompt: str | Sequence[int] | Sequence[dict],
    *,
    params: SamplingParams | None = None,
    timeout: float | None = defaults.CLIENT_TIMEOUT_S,
    client: str | None = None,
    owner: str | None = None,
    priority: int = 0,
    drafter: str | None = None,
    drafters: Sequence[str] | None = (),
    speculation: str | int = "adaptive",
    request_id: str | None = None,
    **sampling,
) -> GenerationRequest:
    """Validate parameters (typed errors naming the field) and build the wire message.

    ``prompt``: text (encoded as the target's tokenizer does by default), token ids, or chat messages
    (``[{"role": "user", "content": ...}]``, rendered by the target's chat template on the verifier).

    Sampling comes as ``params`` or as its fields (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``,
    ``stop``, ``stop_token_ids``, ``seed``, ``ignore_eos``). ``speculation``: "adaptive" (default: length
    chosen per round from the request's acceptance and the cluster's load), "off" or 0 (plain decoding by the
    target) or an int (that many draft positions per round). ``drafter`` pins one drafter model; ``drafters``
    restricts routing to these models."""
    if params is None:
        unknown = sorted(set(sampling) - {f.name for f in fields(SamplingParams)})
        if unknown:
            raise InvalidParameterError(unknown[0], "is not a parameter of a request")
        params = SamplingParams(**sampling)
    elif sampling:
        raise InvalidParameterError(sorted(sampling)[0], "give sampling parameters in params or as arguments, not both")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise InvalidParameterError("timeout", f"must be > 0 seconds or None, got {timeout!r}")
    if not isinstance(prompt, (str, list, tuple)):
        raise InvalidParameterError("prompt", f"must be text, token ids or chat messages, got {type(prompt).__name__}")
    if drafters is None:
        drafters = ()
    elif not isinstance(drafters, (list, tuple)):
        raise InvalidParameterError("drafters", f"must be a list of drafter names, got {type(drafters).__name__}")
    text, ids, messages = (prompt, None, None) if isinstance(prompt, str) else (None, list(prompt), None)
    if ids and all(isinstance(m, dict) for m in ids):
        ids, messages = None, [dict(m) for m in prompt]
    if not (text or ids or messages):
        raise InvalidParameterError("prompt", "must not be empty")
    fixed = isinstance(speculation, int) and not isinstance(speculation, bool)
    created = wall_ms()
    msg = GenerationRequest(
        request_id=owned_id(request_id or uuid.uuid4().hex, owner) if owner else request_id or uuid.uuid4().hex,
        prompt=text, prompt_ids=ids, messages=messages, params=params,
        priority=priority,
        deadline_ms=created + int(timeout * 1000) if timeout is not None else None, drafter=drafter,
        drafters=list(drafters), speculation=("fixed" if speculation else "off") if fixed else str(speculation),
        spec_k=int(speculation) if fixed and speculation else None, created_ms=created, client=client,
        owner=owner,
    )
    try:
        check(msg)
    except ProtocolError as exc:
        name, _, rest = exc.reason.partition(": ")
        raise InvalidParameterError(name if rest else "request", rest or exc.reason) from exc
    return msg


class _Assembler:
    """Turns output chunks (possibly duplicated after a replay or a takeover) into one clean stream."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.next_seq = 0
        self.tokens: list[int] = []
        self.text: list[str] = []
        self.final: Chunk | None = None

    def add(self, chunk: Chunk) -> StreamChunk | None:
        if chunk.seq < self.next_seq:
            return None  # already seen
        if chunk.offset > len(self.tokens):
            raise StreamGapError(
                f"output jumped from token {len(self.tokens)} to {chunk.offset}", self.request_id
            )
        self.next_seq = chunk.seq + 1
        new = chunk.token_ids[len(self.tokens) - chunk.offset :]
        self.tokens.extend(new)
        self.text.append(chunk.text)
        if chunk.finished:
            self.final = chunk
        return StreamChunk(self.request_id, chunk.text, list(new), chunk.finished, chunk.finish_reason, chunk.stats)

    def result(self) -> GenerationResult:
        assert self.final is not None
        raise_for_chunk(self.final)
        return GenerationResult(self.request_id, "".join(self.text), list(self.tokens),
                                self.final.finish_reason or "stop", dict(self.final.stats or {}))


def raise_for_chunk(chunk: Chunk) -> None:
    """Turn a final chunk that reports a failure into the matching typed exception."""
    rid = chunk.request_id
    if chunk.finish_reason == "cancelled":
        raise RequestCancelledError("cancelled", rid)
    if chunk.finish_reason == "timeout":
        raise RequestTimeoutError("the server ended the request at its deadline", rid)
    if chunk.finish_reason == "error":
        if chunk.error_type == "invalid_request":
            field_name, _, rest = (chunk.error or "").partition(": ")
            raise InvalidRequestError(rest or chunk.error or "invalid request", rid, field_name if rest else "request")
        raise ServerError(chunk.error or "the request failed", rid)


class _Reading:
    """One request's output as it is read: the stream cursor, the deadline and the chunk assembly (the same
    for the blocking and the asyncio client; only their XREAD calls differ)."""

    def __init__(self, keys: Keys, request_id: str, owner: str | None, timeout: float | None) -> None:
        self.asm = _Assembler(request_id)
        self.key = keys.out(output_name(request_id, owner))
        self.cursor: bytes | str = "0-0"
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout

    @property
    def done(self) -> bool:
        return self.asm.final is not None

    def block_ms(self) -> int | None:
        """How long the next XREAD may block; None once the deadline has passed."""
        if self.deadline is None:
            return defaults.CLIENT_READ_BLOCK_MS
        left = self.deadline - time.monotonic()
        return None if left <= 0 else max(1, min(defaults.CLIENT_READ_BLOCK_MS, int(left * 1000)))

    def timed_out(self) -> RequestTimeoutError:
        return RequestTimeoutError(f"no result within {self.timeout:.1f} s", self.asm.request_id)

    def take(self, reply) -> list[StreamChunk]:
        """The new chunks in an XREAD reply, duplicates dropped."""
        out = []
        for _stream, items in reply or []:
            for eid, fields_map in items:
                self.cursor = eid
                try:
                    chunk = decode_entry(fields_map, (Chunk,))
                except ProtocolError as exc:
                    raise ServerError(f"unreadable output chunk: {exc.reason}", self.asm.request_id) from exc
                got = self.asm.add(chunk)
                if got is not None:
                    out.append(got)
        return out


def on_broker_clock(msg: GenerationRequest) -> GenerationRequest:
    """``msg`` with its creation time and deadline moved to the broker's clock (as just read), which the
    verifier enforcing the deadline reads too."""
    shift = wall_ms() - msg.created_ms
    return dataclasses.replace(msg, created_ms=msg.created_ms + shift,
                               deadline_ms=None if msg.deadline_ms is None else msg.deadline_ms + shift)


def _has_verifier(roles: list) -> None:
    if b"verifier" not in roles:
        raise NoWorkersError("no live verifier worker: start one with `cosine worker verifier` or `cosine up`")


def _has_room(outstanding: int, limit: int, priority: int) -> None:
    """Room for one more request: the last ``PRIORITY_RESERVE`` of ``limit`` is kept for priority > 0."""
    if priority <= 0:
        limit = max(1, int(limit * (1 - defaults.PRIORITY_RESERVE)))
    if outstanding >= limit:
        raise OverloadedError(f"the deployment holds {outstanding} requests (limit {limit} at priority "
                              f"{priority}); retry later")


class Client:
    """Blocking producer client.

    >>> client = Client("redis://127.0.0.1:6379/0")
    >>> client.generate("def main(", max_new_tokens=32).text
    """

    def __init__(self, url: str = defaults.REDIS_URL, prefix: str = defaults.KEY_PREFIX, *,
                 settings: RedisSettings | None = None, require_workers: bool = True,
                 max_outstanding: int = defaults.MAX_OUTSTANDING_REQUESTS, name: str | None = None,
                 owner: str | None = None) -> None:
        """``max_outstanding``: requests the deployment may hold (queued or in flight) before a submit raises
        :class:`~cosine.errors.OverloadedError`; ``name``: sent with each request (default host-pid), shown by
        the dashboard; ``owner``: the secret binding this client's requests to it (default: a new random one;
        give the same to clients in other processes that must read or cancel them: cosine/ownership.py)."""
        self.settings = settings or RedisSettings(url=url, prefix=prefix)
        self.name = check_name("name", name or default_client_name())
        self.owner = owner or new_secret()
        self.keys = Keys(self.settings.prefix)
        self.r = connect(self.settings)
        self.streams = Streams(self.r, self.keys)
        self.require_workers = require_workers
        self.max_outstanding = max_outstanding

    def close(self) -> None:
        self.r.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- submitting -----------------------------------------------------------------------------------
    def _check_admission(self, priority: int) -> None:
        """Before a submit: a live verifier (unless not required) and room in the deployment."""
        now = self.streams.server_ms()  # also sets this host's clock to the broker's for the deadline
        pipe = self.r.pipeline(transaction=False)
        pipe.xlen(self.keys.requests)
        if self.require_workers:
            cutoff = now - int(defaults.WORKER_DEAD_AFTER_S * 1000)
            for wid in self.r.zrangebyscore(self.keys.workers, cutoff, "+inf"):
                pipe.hget(self.keys.worker(wid.decode()), "role")
        outstanding, *roles = pipe.execute()
        if self.require_workers:
            _has_verifier(roles)
        _has_room(outstanding, self.max_outstanding, priority)

    def submit(self, prompt: str | Sequence[int] | Sequence[dict], **params) -> str:
        """Queue a request; returns its id. Parameters as for :meth:`generate`."""
        msg = build_request(prompt, **{"client": self.name, **params, "owner": self.owner})
        self._check_admission(msg.priority)
        self.streams.add(self.keys.requests, on_broker_clock(msg))
        return msg.request_id

    def output_key(self, request_id: str) -> str:
        """The Redis key of one of this client's requests' output stream."""
        return self.keys.out(output_name(request_id, self.owner))

    def cancel(self, request_id: str) -> None:
        """Ask the owning verifier to stop the request (it ends with finish reason ``cancelled``); only this
        client's own requests (those of its owner secret) can be cancelled."""
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self.keys.cancelled(request_id), self.owner, px=int(defaults.OUTPUT_TTL_S * 1000))
        self.streams.add(self.keys.cancel, Cancel(request_id, self.owner), pipe)
        pipe.execute()

    # -- reading --------------------------------------------------------------------------------------
    def _chunks(self, reading: _Reading) -> Iterator[StreamChunk]:
        while not reading.done:
            block = reading.block_ms()
            if block is None:
                try:
                    self.cancel(reading.asm.request_id)
                except redis.RedisError:
                    pass  # best effort: the server also ends the request at its deadline
                raise reading.timed_out()
            try:
                reply = self.r.xread({reading.key: reading.cursor}, count=256, block=block)
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(0.2)  # the broker restarts or fails over: keep reading until the deadline
                continue
            yield from reading.take(reply)

    def result(self, request_id: str, timeout: float | None = defaults.CLIENT_TIMEOUT_S) -> GenerationResult:
        """Wait for a submitted request and return its result (raises the typed error it ended with)."""
        reading = _Reading(self.keys, request_id, self.owner, timeout)
        for _ in self._chunks(reading):
            pass
        return reading.asm.result()

    def generate(self, prompt: str | Sequence[int], *, timeout: float | None = defaults.CLIENT_TIMEOUT_S,
                 **params) -> GenerationResult:
        """Generate to completion. Parameters: ``max_new_tokens``, ``temperature`` (0 = greedy), ``top_p``,
        ``top_k``, ``stop``, ``stop_token_ids``, ``seed``, ``ignore_eos`` (or all of them as ``params``, a
        :class:`SamplingParams`), ``priority``, ``drafter``, ``drafters``, ``speculation`` (see
        :func:`build_request`); ``timeout`` in seconds."""
        rid = self.submit(prompt, timeout=timeout, **params)
        return self.result(rid, timeout)

    def stream(self, prompt: str | Sequence[int], *, timeout: float | None = defaults.CLIENT_TIMEOUT_S,
               **params) -> Iterator[StreamChunk]:
        """Yield text and token ids as they commit; the last chunk has ``finished`` and ``stats``."""
        reading = _Reading(self.keys, self.submit(prompt, timeout=timeout, **params), self.owner, timeout)
        for chunk in self._chunks(reading):
            if chunk.finished:
                raise_for_chunk(reading.asm.final)  # type: ignore[arg-type]
            yield chunk

    def generate_many(self, prompts: Sequence[str | Sequence[int]], *,
                      timeout: float | None = defaults.CLIENT_TIMEOUT_S, **params) -> list[GenerationResult]:
        """Submit every prompt first, then collect the results in order."""
        ids = [self.submit(p, timeout=timeout, **params) for p in prompts]
        return [self.result(rid, timeout) for rid in ids]


class AsyncClient:
    """asyncio producer client with the same methods as :class:`Client`."""

    def __init__(self, url: str = defaults.REDIS_URL, prefix: str = defaults.KEY_PREFIX, *,
                 settings: RedisSettings | None = None, require_workers: bool = True,
                 max_outstanding: int = defaults.MAX_OUTSTANDING_REQUESTS, name: str | None = None,
                 owner: str | None = None) -> None:
        self.settings = settings or RedisSettings(url=url, prefix=prefix)
        self.name = check_name("name", name or default_client_name())
        self.owner = owner or new_secret()
        self.keys = Keys(self.settings.prefix)
        self.r = connect_async(self.settings)
        self.require_workers = require_workers
        self.max_outstanding = max_outstanding

    async def close(self) -> None:
        await self.r.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _check_admission(self, priority: int) -> None:
        now = server_ms(await self.r.time())  # also sets this host's clock to the broker's for the deadline
        if self.require_workers:
            cutoff = now - int(defaults.WORKER_DEAD_AFTER_S * 1000)
            ids = await self.r.zrangebyscore(self.keys.workers, cutoff, "+inf")
            _has_verifier([await self.r.hget(self.keys.worker(wid.decode()), "role") for wid in ids])
        _has_room(await self.r.xlen(self.keys.requests), self.max_outstanding, priority)

    async def submit(self, prompt: str | Sequence[int] | Sequence[dict], **params) -> str:
        msg = build_request(prompt, **{"client": self.name, **params, "owner": self.owner})
        await self._check_admission(msg.priority)
        await self.r.xadd(**xadd_args(self.keys, self.keys.requests, on_broker_clock(msg)))
        return msg.request_id

    async def cancel(self, request_id: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self.keys.cancelled(request_id), self.owner, px=int(defaults.OUTPUT_TTL_S * 1000))
        pipe.xadd(**xadd_args(self.keys, self.keys.cancel, Cancel(request_id, self.owner)))
        await pipe.execute()

    async def _chunks(self, reading: _Reading) -> AsyncIterator[StreamChunk]:
        while not reading.done:
            block = reading.block_ms()
            if block is None:
                try:
                    await self.cancel(reading.asm.request_id)
                except redis.RedisError:
                    pass
                raise reading.timed_out()
            try:
                reply = await self.r.xread({reading.key: reading.cursor}, count=256, block=block)
            except (redis.ConnectionError, redis.TimeoutError):
                await asyncio.sleep(0.2)
                continue
            for chunk in reading.take(reply):
                yield chunk

    async def result(self, request_id: str, timeout: float | None = defaults.CLIENT_TIMEOUT_S) -> GenerationResult:
        reading = _Reading(self.keys, request_id, self.owner, timeout)
        async for _ in self._chunks(reading):
            pass
        return reading.asm.result()

    async def generate(self, prompt: str | Sequence[int], *, timeout: float | None = defaults.CLIENT_TIMEOUT_S,
                       **params) -> GenerationResult:
        rid = await self.submit(prompt, timeout=timeout, **params)
        return await self.result(rid, timeout)

    async def stream(self, prompt: str | Sequence[int], *, timeout: float | None = defaults.CLIENT_TIMEOUT_S,
                     **params) -> AsyncIterator[StreamChunk]:
        async for chunk in self.follow(await self.submit(prompt, timeout=timeout, **params), timeout):
            yield chunk

    async def follow(self, request_id: str, timeout: float | None = defaults.CLIENT_TIMEOUT_S
                     ) -> AsyncIterator[StreamChunk]:
        """A submitted request's chunks as they commit; its error, if it ends in one, raised at the end."""
        reading = _Reading(self.keys, request_id, self.owner, timeout)
        async for chunk in self._chunks(reading):
            if chunk.finished:
                raise_for_chunk(reading.asm.final)  # type: ignore[arg-type]
            yield chunk

    async def generate_many(self, prompts: Sequence[str | Sequence[int]], *,
                            timeout: float | None = defaults.CLIENT_TIMEOUT_S, **params) -> list[GenerationResult]:
        ids = [await self.submit(p, timeout=timeout, **params) for p in prompts]
        return list(await asyncio.gather(*(self.result(rid, timeout) for rid in ids)))


__all__ = ["AsyncClient", "Client", "GenerationResult", "StreamChunk", "build_request"]
