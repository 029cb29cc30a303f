"""The producer client: submit requests, read their output streams, cancel.

``Client`` (blocking) and ``AsyncClient`` (asyncio) share the protocol and the chunk assembly: output is
read with ``XREAD BLOCK`` from the start of the request's output stream, so nothing written before the
client began reading is missed; chunks carry sequence numbers and token offsets, so a replayed round or a
request resumed by another verifier never duplicates or drops tokens.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import redis
import redis.asyncio as aioredis

from cosine import defaults
from cosine.broker import RedisSettings, connect, now_ms
from cosine.errors import (
    InvalidParameterError,
    InvalidRequestError,
    NoWorkersError,
    RequestCancelledError,
    RequestTimeoutError,
    ServerError,
    StreamGapError,
)
from cosine.keys import Keys
from cosine.protocol import Cancel, Chunk, GenerationRequest, ProtocolError, decode_entry, entry
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


def build_request(
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop: Sequence[str] | str | None = None,
    stop_token_ids: Sequence[int] = (),
    seed: int | None = None,
    timeout: float | None = defaults.CLIENT_TIMEOUT_S,
    priority: int = 0,
    drafter: str | None = None,
    drafters: Sequence[str] = (),
    speculation: str | int = "adaptive",
    ignore_eos: bool = False,
    request_id: str | None = None,
) -> GenerationRequest:
    """Validate parameters (typed errors naming the field) and build the wire message.

    ``speculation``: "adaptive" (default: length chosen per round from the request's acceptance and the
    cluster's load), "off" or 0 (plain decoding by the target) or an int (that many draft positions per round).
    ``drafter`` pins one drafter model; ``drafters`` restricts routing to these models."""
    if isinstance(stop, str):
        stop = [stop]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, stop=tuple(stop or ()), stop_token_ids=tuple(stop_token_ids),
                            ignore_eos=ignore_eos)
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise InvalidParameterError("timeout", f"must be > 0 seconds or None, got {timeout!r}")
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidParameterError("prompt", "must not be empty")
        text, ids = prompt, None
    else:
        ids, text = list(prompt), None
        if not ids:
            raise InvalidParameterError("prompt", "must contain at least one token")
    created = now_ms()
    msg = GenerationRequest(
        request_id=request_id or uuid.uuid4().hex,
        prompt=text,
        prompt_ids=ids,
        max_new_tokens=params.max_new_tokens,
        temperature=float(params.temperature),
        top_p=float(params.top_p),
        top_k=params.top_k,
        seed=params.seed,
        stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        priority=priority,
        deadline_ms=created + int(timeout * 1000) if timeout is not None else None,
        drafter=drafter,
        drafters=list(drafters),
        speculation=("fixed" if speculation else "off") if _is_int(speculation) else str(speculation),
        spec_k=int(speculation) if _is_int(speculation) and speculation else None,
        created_ms=created,
    )
    try:
        GenerationRequest.validate({**msg.to_dict()}, None)
    except ProtocolError as exc:
        name, _, rest = exc.reason.partition(": ")
        raise InvalidParameterError(name if rest else "request", rest or exc.reason) from exc
    return msg


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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


class Client:
    """Blocking producer client.

    >>> client = Client("redis://127.0.0.1:6379/0")
    >>> client.generate("def main(", max_new_tokens=32).text
    """

    def __init__(self, url: str = defaults.REDIS_URL, prefix: str = defaults.KEY_PREFIX, *,
                 settings: RedisSettings | None = None, require_workers: bool = True) -> None:
        self.settings = settings or RedisSettings(url=url, prefix=prefix)
        self.keys = Keys(self.settings.prefix)
        self.r = connect(self.settings)
        self.require_workers = require_workers

    def close(self) -> None:
        self.r.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- submitting -----------------------------------------------------------------------------------
    def _check_workers(self) -> None:
        if not self.require_workers:
            return
        cutoff = now_ms() - int(defaults.WORKER_DEAD_AFTER_S * 1000)
        ids = self.r.zrangebyscore(self.keys.workers, cutoff, "+inf")
        pipe = self.r.pipeline(transaction=False)
        for wid in ids:
            pipe.hget(self.keys.worker(wid.decode()), "role")
        if b"verifier" not in pipe.execute():
            raise NoWorkersError("no live verifier worker: start one with `cosine worker verifier` or `cosine up`")

    def submit(self, prompt: str | Sequence[int], **params) -> str:
        """Queue a request; returns its id. Parameters as for :meth:`generate`."""
        msg = build_request(prompt, **params)
        self._check_workers()
        self.r.xadd(self.keys.requests, entry(msg), maxlen=defaults.STREAM_MAXLEN, approximate=True)
        return msg.request_id

    def cancel(self, request_id: str) -> None:
        """Ask the owning verifier to stop the request (it ends with finish reason ``cancelled``)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self.keys.cancelled(request_id), b"1", px=int(defaults.OUTPUT_TTL_S * 1000))
        pipe.xadd(self.keys.cancel, entry(Cancel(request_id)), maxlen=defaults.CANCEL_MAXLEN, approximate=True)
        pipe.execute()

    # -- reading --------------------------------------------------------------------------------------
    def _chunks(self, request_id: str, timeout: float | None, asm: _Assembler) -> Iterator[StreamChunk]:
        deadline = None if timeout is None else time.monotonic() + timeout
        cursor = "0-0"
        key = self.keys.out(request_id)
        while asm.final is None:
            block = defaults.CLIENT_READ_BLOCK_MS
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    try:
                        self.cancel(request_id)
                    except redis.RedisError:
                        pass  # best effort: the server also ends the request at its deadline
                    raise RequestTimeoutError(f"no result within {timeout:.1f} s", request_id)
                block = max(1, min(block, int(left * 1000)))
            try:
                reply = self.r.xread({key: cursor}, count=256, block=block)
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(0.2)  # the broker restarts or fails over: keep reading until the deadline
                continue
            for _stream, items in reply or []:
                for eid, fields in items:
                    cursor = eid
                    try:
                        chunk = decode_entry(fields, (Chunk,))
                    except ProtocolError as exc:
                        raise ServerError(f"unreadable output chunk: {exc.reason}", request_id) from exc
                    out = asm.add(chunk)
                    if out is not None:
                        yield out

    def result(self, request_id: str, timeout: float | None = defaults.CLIENT_TIMEOUT_S) -> GenerationResult:
        """Wait for a submitted request and return its result (raises the typed error it ended with)."""
        asm = _Assembler(request_id)
        for _ in self._chunks(request_id, timeout, asm):
            pass
        return asm.result()

    def generate(self, prompt: str | Sequence[int], *, timeout: float | None = defaults.CLIENT_TIMEOUT_S,
                 **params) -> GenerationResult:
        """Generate to completion. Parameters: ``max_new_tokens``, ``temperature`` (0 = greedy), ``top_p``,
        ``top_k``, ``stop``, ``stop_token_ids``, ``seed``, ``priority``, ``drafter``, ``drafters``, ``speculation``
        (see :func:`build_request`); ``timeout`` in seconds."""
        rid = self.submit(prompt, timeout=timeout, **params)
        return self.result(rid, timeout)

    def stream(self, prompt: str | Sequence[int], *, timeout: float | None = defaults.CLIENT_TIMEOUT_S,
               **params) -> Iterator[StreamChunk]:
        """Yield text and token ids as they commit; the last chunk has ``finished`` and ``stats``."""
        rid = self.submit(prompt, timeout=timeout, **params)
        asm = _Assembler(rid)
        for chunk in self._chunks(rid, timeout, asm):
            if chunk.finished:
                raise_for_chunk(asm.final)  # type: ignore[arg-type]
            yield chunk

    def generate_many(self, prompts: Sequence[str | Sequence[int]], *,
                      timeout: float | None = defaults.CLIENT_TIMEOUT_S, **params) -> list[GenerationResult]:
        """Submit every prompt first, then collect the results in order."""
        ids = [self.submit(p, timeout=timeout, **params) for p in prompts]
        return [self.result(rid, timeout) for rid in ids]


class AsyncClient:
    """asyncio producer client with the same methods as :class:`Client`."""

    def __init__(self, url: str = defaults.REDIS_URL, prefix: str = defaults.KEY_PREFIX, *,
                 require_workers: bool = True) -> None:
        self.keys = Keys(prefix)
        self.r = aioredis.Redis.from_url(url, socket_timeout=defaults.SOCKET_TIMEOUT_S, decode_responses=False)
        self.require_workers = require_workers

    async def close(self) -> None:
        await self.r.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _check_workers(self) -> None:
        if not self.require_workers:
            return
        cutoff = now_ms() - int(defaults.WORKER_DEAD_AFTER_S * 1000)
        for wid in await self.r.zrangebyscore(self.keys.workers, cutoff, "+inf"):
            if await self.r.hget(self.keys.worker(wid.decode()), "role") == b"verifier":
                return
        raise NoWorkersError("no live verifier worker: start one with `cosine worker verifier` or `cosine up`")

    async def submit(self, prompt: str | Sequence[int], **params) -> str:
        msg = build_request(prompt, **params)
        await self._check_workers()
        await self.r.xadd(self.keys.requests, entry(msg), maxlen=defaults.STREAM_MAXLEN, approximate=True)
        return msg.request_id

    async def cancel(self, request_id: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self.keys.cancelled(request_id), b"1", px=int(defaults.OUTPUT_TTL_S * 1000))
        pipe.xadd(self.keys.cancel, entry(Cancel(request_id)), maxlen=defaults.CANCEL_MAXLEN, approximate=True)
        await pipe.execute()

    async def _chunks(self, request_id: str, timeout: float | None, asm: _Assembler) -> AsyncIterator[StreamChunk]:
        deadline = None if timeout is None else time.monotonic() + timeout
        cursor = "0-0"
        key = self.keys.out(request_id)
        while asm.final is None:
            block = defaults.CLIENT_READ_BLOCK_MS
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    try:
                        await self.cancel(request_id)
                    except redis.RedisError:
                        pass
                    raise RequestTimeoutError(f"no result within {timeout:.1f} s", request_id)
                block = max(1, min(block, int(left * 1000)))
            try:
                reply = await self.r.xread({key: cursor}, count=256, block=block)
            except (redis.ConnectionError, redis.TimeoutError):
                await asyncio.sleep(0.2)
                continue
            for _stream, items in reply or []:
                for eid, fields in items:
                    cursor = eid
                    try:
                        chunk = decode_entry(fields, (Chunk,))
                    except ProtocolError as exc:
                        raise ServerError(f"unreadable output chunk: {exc.reason}", request_id) from exc
                    out = asm.add(chunk)
                    if out is not None:
                        yield out

    async def result(self, request_id: str, timeout: float | None = defaults.CLIENT_TIMEOUT_S) -> GenerationResult:
        asm = _Assembler(request_id)
        async for _ in self._chunks(request_id, timeout, asm):
            pass
        return asm.result()

    async def generate(self, prompt: str | Sequence[int], *, timeout: float | None = defaults.CLIENT_TIMEOUT_S,
                       **params) -> GenerationResult:
        rid = await self.submit(prompt, timeout=timeout, **params)
        return await self.result(rid, timeout)

    async def stream(self, prompt: str | Sequence[int], *, timeout: float | None = defaults.CLIENT_TIMEOUT_S,
                     **params) -> AsyncIterator[StreamChunk]:
        rid = await self.submit(prompt, timeout=timeout, **params)
        asm = _Assembler(rid)
        async for chunk in self._chunks(rid, timeout, asm):
            if chunk.finished:
                raise_for_chunk(asm.final)  # type: ignore[arg-type]
            yield chunk

    async def generate_many(self, prompts: Sequence[str | Sequence[int]], *,
                            timeout: float | None = defaults.CLIENT_TIMEOUT_S, **params) -> list[GenerationResult]:
        ids = [await self.submit(p, timeout=timeout, **params) for p in prompts]
        return list(await asyncio.gather(*(self.result(rid, timeout) for rid in ids)))


__all__ = ["AsyncClient", "Client", "GenerationResult", "StreamChunk", "build_request"]
