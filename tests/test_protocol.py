"""The wire protocol: round trips, validation with reasons, and fuzzing (anything else -> ProtocolError)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cosine import protocol as p
from cosine.keys import Keys


def roundtrip(msg, vocab=4096):
    return p.decode(p.encode(msg), vocab=vocab)


def test_roundtrips():
    msgs = [
        p.GenerationRequest("r1", prompt="hello", max_new_tokens=5, temperature=0.7, top_p=0.9, seed=3, stop=["\n"]),
        p.GenerationRequest("r2", prompt_ids=[1, 2, 3], deadline_ms=123, drafter="code"),
        p.GenerationRequest("r3", prompt="x", drafters=["code", "prose"], speculation="fixed", spec_k=3),
        p.GenerationRequest("r4", prompt="x", speculation="off"),
        p.DraftJob("r1", "v1", epoch=5, base=3, tokens=[7, 8], k=4, width=2, experts=["prose", "code"], sent_ms=9),
        p.DraftClose("r1"),
        p.Draft("r1", "d1", 5, [1, 2, 3], [-1, 0, 0], [0.5, 0.25, 0.125], ["code"] * 3, job_sent_ms=4, draft_ms=1.5),
        p.Draft("r1", "d1", 5, [1, 2], [-1, 0], [0.5, 0.25], ["code", "prose"], votes={"code": [1, 2], "prose": [3, 2]},
                vote_conf={"code": [0.5, 0.25], "prose": [0.4, 0.2]}, feature="code", lookahead=True),
        p.Chunk("r1", 0, 0, [5, 6], "ab", finished=True, finish_reason="stop", stats={"drafts": 1}, verifier="v"),
        p.Cancel("r1"),
    ]
    for m in msgs:
        assert roundtrip(m) == m
    assert p.decode_entry(p.entry(msgs[0])) == msgs[0]


@pytest.mark.parametrize(
    "body, reason",
    [
        ({"v": 2, "t": "cancel", "request_id": "x"}, "schema version"),
        ({"v": 1, "t": "nope"}, "unknown message type"),
        ({"v": 1, "t": "cancel"}, "request_id"),
        ({"v": 1, "t": "cancel", "request_id": "a b"}, "request_id"),
        ({"v": 1, "t": "cancel", "request_id": "x", "extra": 1}, "unknown fields"),
        ({"v": 1, "t": "request", "request_id": "x"}, "exactly one of prompt"),
        ({"v": 1, "t": "request", "request_id": "x", "prompt": ""}, "must not be empty"),
        ({"v": 1, "t": "request", "request_id": "x", "prompt_ids": [1, 99999]}, "outside the vocabulary"),
        ({"v": 1, "t": "request", "request_id": "x", "prompt": "a", "top_p": 0}, "top_p"),
        ({"v": 1, "t": "request", "request_id": "x", "prompt": "a", "max_new_tokens": 0}, "max_new_tokens"),
        ({"v": 1, "t": "request", "request_id": "x", "prompt": "a", "temperature": -1}, "temperature"),
        ({"v": 1, "t": "draft_job", "request_id": "x", "verifier": "v", "epoch": 4, "base": 0, "tokens": [1],
          "k": 2}, "epoch 4 != base"),
        ({"v": 1, "t": "draft_job", "request_id": "x", "verifier": "v", "epoch": 1, "base": 0, "tokens": [1],
          "k": 2, "experts": ["a b"]}, "experts"),
        ({"v": 1, "t": "request", "request_id": "x", "prompt": "a", "speculation": "always"}, "speculation"),
        ({"v": 1, "t": "request", "request_id": "x", "prompt": "a", "speculation": "fixed"}, "spec_k"),
        ({"v": 1, "t": "request", "request_id": "x", "prompt": "a", "spec_k": 3}, "spec_k"),
        ({"v": 1, "t": "request", "request_id": "x", "prompt": "a", "drafters": "code"}, "drafters"),
        ({"v": 1, "t": "draft", "request_id": "x", "drafter": "d", "epoch": 1, "votes": {"a": [99999]}}, "votes"),
        ({"v": 1, "t": "draft", "request_id": "x", "drafter": "d", "epoch": 1, "vote_conf": {"a": [2.0]}},
         "vote_conf"),
        ({"v": 1, "t": "draft", "request_id": "x", "drafter": "d", "epoch": 1, "tokens": [1, 2],
          "parents": [-1, 5], "confidences": [0.1, 0.1], "sources": ["a", "a"]}, "parents"),
    ],
)
def test_invalid_messages_have_reasons(body, reason):
    with pytest.raises(p.ProtocolError) as err:
        p.decode(msgpack.packb(body), vocab=4096)
    assert reason in err.value.reason


def test_wrong_stream_and_garbage():
    with pytest.raises(p.ProtocolError, match="does not belong"):
        p.decode(p.encode(p.Cancel("x")), expected=(p.DraftJob,))
    for raw in (b"", b"\xc1", b"\x93\x01\x02\x03", msgpack.packb([1, 2])):
        with pytest.raises(p.ProtocolError):
            p.decode(raw)
    with pytest.raises(p.ProtocolError, match="exactly one field"):
        p.decode_entry({b"x": b"1"})


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=6),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_fuzz_bytes_only_raise_protocol_error(raw):
    try:
        p.decode(raw, vocab=100)
    except p.ProtocolError:
        pass


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(p.MESSAGE_TYPES)), st.dictionaries(
    st.sampled_from(["request_id", "prompt", "prompt_ids", "epoch", "base", "tokens", "k", "seq", "offset",
                     "parents", "confidences", "sources", "drafter", "verifier", "stop", "top_p", "stats"]),
    json_like, max_size=8))
def test_fuzz_structured_only_raise_protocol_error(mtype, fields):
    body = {"v": 1, "t": mtype, **fields}
    try:
        raw = msgpack.packb(body, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return
    try:
        p.decode(raw, vocab=100)
    except p.ProtocolError:
        pass


def test_keys_live_under_the_prefix():
    k = Keys("dep1")
    names = [k.requests, k.draft("d"), k.verify("v"), k.out("r"), k.cancel, k.dlq, k.workers, k.worker("w"),
             k.lock("reclaim"), k.control, k.control_log]
    assert all(n.startswith("dep1:") for n in names) and len(set(names)) == len(names)
    with pytest.raises(ValueError):
        Keys("bad prefix")
