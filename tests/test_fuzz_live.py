"""A raw fuzzer on a live deployment (real Redis, real worker processes): random and mutated entries written
into the request, draft-job and draft streams while good requests run. No worker dies, every entry the
workers cannot decode reaches the dead-letter stream with a reason, a rejected request's sender gets its
typed error, and the good requests end with the target's exact output."""

from __future__ import annotations

import random

import msgpack
import pytest

from cosine.client import Client, build_request
from cosine.errors import InvalidRequestError
from cosine.local_redis import LocalRedis
from cosine.protocol import (
    Draft,
    DraftClose,
    DraftJob,
    GenerationRequest,
    ProtocolError,
    decode_entry,
    encode,
    peek_request_id,
)

from .helpers import greedy_divergences, target_outputs
from .pipeline_helpers import deployment, streams, wait_for

pytestmark = pytest.mark.slow

JUNK = 80


def _random_value(rng: random.Random):
    return rng.choice([None, True, -1, 0, 7, 2**40, 1.5, float("nan"), "", "x" * rng.randint(1, 300),
                       [rng.randint(-5, 10_000) for _ in range(rng.randint(0, 6))], {"a": 1}, b"\x00\xff"])


def _mutated(rng: random.Random, seed) -> dict:
    body = msgpack.unpackb(encode(seed), raw=False)
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(sorted(body))
        if rng.random() < 0.3:
            del body[name]
        else:
            body[name] = _random_value(rng)
    try:
        return {b"d": msgpack.packb(body, use_bin_type=True)}
    except (TypeError, ValueError, OverflowError):
        return {b"d": b"\x93\x01"}


def _junk(rng: random.Random, n: int, prompt: list[int]) -> list[tuple[str, dict]]:
    """``n`` bad or odd entries: (which stream, fields), the streams named by role."""
    out = []
    for i in range(n):
        role = rng.choice(["requests", "draft", "verify"])
        seed = {"requests": build_request(prompt, max_new_tokens=4),
                "draft": DraftJob(f"ghost{i}", "verifier-0", len(prompt), 0, prompt, 2),
                "verify": Draft(f"ghost{i}", "drafter-0", len(prompt), [5], [-1], [0.5], ["code"])}[role]
        kind = rng.random()
        if kind < 0.2:
            fields = {b"d": rng.randbytes(rng.randint(0, 64))}
        elif kind < 0.3:
            fields = {b"x": b"no payload field", b"d": b"\x80"}
        else:
            fields = _mutated(rng, seed)
        out.append((role, fields))
    return out


def test_a_raw_fuzzer_on_live_streams_loses_nothing_and_kills_nothing(zoo_engine, zoo_prompts, tmp_path):
    rng = random.Random(20261206)
    tok = zoo_engine.tokenizer
    vocab = int(zoo_engine.verifier.runner.model.config.vocab_size)
    good = [zoo_prompts[d][i] for d in sorted(zoo_prompts) for i in range(2)]
    prompt = tok(good[0], add_special_tokens=False)["input_ids"]
    with LocalRedis() as srv, deployment(srv.url, verifiers=1, drafters=1, log_dir=str(tmp_path)) as dep:
        s = streams(srv.url)
        k = s.keys
        where = {"requests": (k.requests, (GenerationRequest,)),
                 "draft": (k.draft("drafter-0"), (DraftJob, DraftClose)),
                 "verify": (k.verify("verifier-0"), (Draft,))}
        junk = _junk(rng, JUNK, prompt)
        bad, rejected = 0, []
        for role, fields in junk:
            try:
                decode_entry(fields, where[role][1], vocab)
            except ProtocolError:
                bad += 1
                peeked = peek_request_id(fields) if role == "requests" else None
                if peeked is not None and peeked[1] is None:  # an unowned id: any client reads its refusal
                    rejected.append(peeked[0])
        before = s.r.xlen(k.dlq)
        with Client(srv.url) as c:
            ids = [c.submit(p, max_new_tokens=24) for p in good]
            for role, fields in junk:
                s.r.xadd(where[role][0], fields)
            results = [c.result(rid, timeout=180) for rid in ids]
            for rid in rejected:  # the sender of a refused request is told why, with a typed error
                with pytest.raises(InvalidRequestError):
                    c.result(rid, timeout=30)
        wait_for(lambda: s.r.xlen(k.dlq) >= before + bad, 30, what=f"{bad} dead letters")
        letters = s.r.xrange(k.dlq)[before:]
        assert all(f[b"reason"] for _, f in letters) and len(letters) == bad
        assert all(proc.poll() is None for proc in dep.procs.values()), "a worker died"
        ids_in = [tok(p, add_special_tokens=False)["input_ids"] for p in good]
        refs = target_outputs(zoo_engine, ids_in, 24)
        _, failures = greedy_divergences(zoo_engine.verifier.runner.model, ids_in,
                                         [r.token_ids for r in results], refs)
        assert not failures, failures
        assert bad >= JUNK // 2 and rejected, "the fuzzer wrote mostly bad entries, some of them requests"
