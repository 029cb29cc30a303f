"""The wire protocol: round trips, validation with reasons, and fuzzing (anything else -> ProtocolError)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cosine import protocol as p
from cosine.keys import Keys
from cosine.sampling_params import SamplingParams

V = p.SCHEMA_VERSION


def roundtrip(msg, vocab=4096):
    return p.decode(p.encode(msg), vocab=vocab)


def test_roundtrips():
    msgs = [
        p.GenerationRequest("r1", prompt="hello", params=SamplingParams(max_new_tokens=5, temperature=0.7, top_p=0.9,
                                                                       seed=3, stop=["\n"])),
        p.GenerationRequest("r2", prompt_ids=[1, 2, 3], deadline_ms=123, drafter="code"),
        p.GenerationRequest("r3", prompt="x", drafters=["code", "prose"], speculation="fixed", spec_k=3),
        p.GenerationRequest("r4", prompt="x", speculation="off"),
        p.DraftJob("r1", "v1", epoch=5, base=3, tokens=[7, 8], k=4, width=2, experts=["prose", "code"], sent_ms=9),
        p.DraftJob("r1", "v1", epoch=2, base=0, tokens=[7, 8], k=4, params=SamplingParams(temperature=0.8, seed=5),
                   position=3, q_top=32),
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
        ({"v": V + 1, "t": "cancel", "request_id": "x"}, "schema version"),
        ({"v": V, "t": "nope"}, "unknown message type"),
        ({"v": V, "t": "cancel"}, "request_id"),
        ({"v": V, "t": "cancel", "request_id": "a b"}, "request_id"),
        ({"v": V, "t": "cancel", "request_id": "x", "extra": 1}, "unknown fields"),
        ({"v": V, "t": "request", "request_id": "x"}, "exactly one of prompt"),
        ({"v": V, "t": "request", "request_id": "x", "prompt": ""}, "must not be empty"),
        ({"v": V, "t": "request", "request_id": "x", "prompt_ids": [1, 99999]}, "outside the vocabulary"),
        ({"v": V, "t": "request", "request_id": "x", "prompt": "a", "params": {"top_p": 0}}, "top_p"),
        ({"v": V, "t": "request", "request_id": "x", "prompt": "a", "params": {"max_new_tokens": 0}}, "max_new_tokens"),
        ({"v": V, "t": "request", "request_id": "x", "prompt": "a", "params": {"temperature": -1}}, "temperature"),
        ({"v": V, "t": "request", "request_id": "x", "prompt": "a", "params": {"stop_token_ids": [99999]}},
         "stop_token_ids"),
        ({"v": V, "t": "request", "request_id": "x", "prompt": "a", "params": {"mirostat": 1}}, "unknown fields"),
        ({"v": V, "t": "request", "request_id": "x", "prompt": "a", "params": [0.5]}, "params"),
        ({"v": V, "t": "request", "request_id": "x", "prompt": "a", "temperature": 0.5}, "unknown fields"),
        ({"v": V, "t": "draft_job", "request_id": "x", "verifier": "v", "epoch": 1, "base": 0, "tokens": [1],
          "k": 2, "params": {"temperature": 0.8}, "q_top": 8}, "sampled drafts need"),
        ({"v": V, "t": "draft_job", "request_id": "x", "verifier": "v", "epoch": 4, "base": 0, "tokens": [1],
          "k": 2}, "epoch 4 != base"),
        ({"v": V, "t": "draft_job", "request_id": "x", "verifier": "v", "epoch": 1, "base": 0, "tokens": [1],
          "k": 2, "experts": ["a b"]}, "experts"),
        ({"v": V, "t": "request", "request_id": "x", "prompt": "a", "speculation": "always"}, "speculation"),
        ({"v": V, "t": "request", "request_id": "x", "prompt": "a", "speculation": "fixed"}, "spec_k"),
        ({"v": V, "t": "request", "request_id": "x", "prompt": "a", "spec_k": 3}, "spec_k"),
        ({"v": V, "t": "request", "request_id": "x", "prompt": "a", "drafters": "code"}, "drafters"),
        ({"v": V, "t": "draft", "request_id": "x", "drafter": "d", "epoch": 1, "votes": {"a": [99999]}}, "votes"),
        ({"v": V, "t": "draft", "request_id": "x", "drafter": "d", "epoch": 1, "vote_conf": {"a": [2.0]}},
         "vote_conf"),
        ({"v": V, "t": "draft", "request_id": "x", "drafter": "d", "epoch": 1, "tokens": [1, 2],
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
                     "parents", "confidences", "sources", "drafter", "verifier", "params", "stats"]),
    json_like, max_size=8))
def test_fuzz_structured_only_raise_protocol_error(mtype, fields):
    body = {"v": V, "t": mtype, **fields}
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


def _valid_messages() -> list[p.Message]:
    from cosine.client import build_request

    return [
        build_request([1, 2, 3], max_new_tokens=4, temperature=0.7, seed=3, stop=["x"], drafter="code"),
        p.DraftJob("r", "v", 3, 1, [2, 3], 2, experts=["code", "prose"], expert_weights=[1.0, 0.5]),
        p.DraftClose("r"),
        p.Draft("r", "d", 5, [4, 5, 6], [-1, 0, 0], [0.9, 0.5, 0.2], ["code"] * 3, votes={"code": [4, 5]},
                vote_conf={"code": [0.9, 0.5]}, assumed=[1, 2]),
        p.VoteAsk("r", "d0", 7, "code", 0, [1, 2, 3]),
        p.Vote("r", "d1", 7, "code", [4, 5], [0.6, 0.3]),
        p.Chunk("r", 0, 0, [1, 2], "ab", True, "length", stats={"tokens": 2}, verifier="v"),
        p.Cancel("r"),
    ]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 7), st.data())
def test_fuzz_mutated_valid_messages_decode_or_raise_protocol_error(which, data):
    """One field of a valid message of every type replaced (or dropped): decoding either refuses it with a
    ProtocolError or returns a message that encodes back to what it decodes from."""
    msg = _valid_messages()[which]
    body = msgpack.unpackb(p.encode(msg), raw=False)
    name = data.draw(st.sampled_from(sorted(body)))
    if data.draw(st.booleans()):
        del body[name]
    else:
        body[name] = data.draw(json_like)
    try:
        raw = msgpack.packb(body, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return
    try:
        got = p.decode(raw, vocab=100)
    except p.ProtocolError:
        return
    assert p.decode(p.encode(got), vocab=100) == got


def test_the_fuzzers_seed_messages_are_valid():
    for msg in _valid_messages():
        assert p.decode(p.encode(msg), vocab=100) == msg


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=st.one_of(st.text(max_size=50), st.text(alphabet=st.characters(codec=None, max_codepoint=0x10FFFF),
                                                         max_size=20),
                        st.lists(st.integers(-10, 10**7), max_size=8), st.lists(json_like, max_size=3)),
       params=st.dictionaries(st.sampled_from(["max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                                               "stop_token_ids", "ignore_eos", "priority", "drafter", "drafters",
                                               "speculation", "spec_k", "timeout", "bogus"]), json_like, max_size=4))
def test_fuzz_client_requests_are_built_or_refused_with_a_typed_error(prompt, params):
    """Any prompt (empty, invalid UTF-8 surrogates, control characters, unknown ids) and any parameters: the
    client builds a valid request or raises InvalidParameterError, never anything else."""
    from cosine.client import build_request
    from cosine.errors import InvalidParameterError

    try:
        msg = build_request(prompt, **params)
    except InvalidParameterError:
        return
    p.check(msg)
    assert p.decode(p.encode(msg)) == msg
