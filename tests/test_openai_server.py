"""``cosine serve``: the official ``openai`` package and plain HTTP get the target's exact output through the
OpenAI-compatible endpoint, streaming included; unsupported parameters are refused in OpenAI's error shape."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import openai
import pytest
import redis

from cosine.protocol import Chunk, decode_entry
from cosine.sampling_params import SamplingParams

from .pipeline_helpers import wait_for

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(live_cluster):
    """``cosine serve`` in front of the session's shared deployment."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cosine.cli", "serve", "--redis-url", live_cluster.url,
                             "--port", str(port), "--model-name", "zoo"], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, 60, 0.2, "the OpenAI endpoint")
        yield base, live_cluster.url
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _reference(zoo_engine, prompt_ids, n):
    return zoo_engine.generate([prompt_ids], SamplingParams(max_new_tokens=n), speculative=False)[0]


def test_completions_with_the_openai_package_equal_the_target(server, zoo_engine, zoo_prompts):
    server, _ = server
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["zoo"]
    prompt = zoo_prompts["code"][0]
    ids = zoo_engine.tokenizer(prompt)["input_ids"]
    ref = _reference(zoo_engine, ids, 16)
    out = client.completions.create(model="zoo", prompt=prompt, max_tokens=16, temperature=0)
    assert out.choices[0].text == zoo_engine.text(ref)
    assert out.usage.completion_tokens == len(ref.output_ids) and out.usage.prompt_tokens == len(ids)
    assert out.model_extra["cosine"]["request_id"]
    streamed = client.completions.create(model="zoo", prompt=prompt, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == zoo_engine.text(ref)


def test_chat_with_the_openai_package_streams_the_target(server, zoo_engine):
    from cosine.engine.prompting import encode_chat

    server, _ = server
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "def add(a, b):"}]
    ref = _reference(zoo_engine, encode_chat(zoo_engine.tokenizer, messages), 12)
    out = client.chat.completions.create(model="zoo", messages=messages, max_tokens=12)
    assert out.choices[0].message.content == zoo_engine.text(ref)
    parts = list(client.chat.completions.create(model="zoo", messages=messages, max_tokens=12, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == zoo_engine.text(ref)
    assert parts[-1].choices[0].finish_reason in ("length", "stop")


def test_unsupported_parameters_are_refused_in_openai_shape(server):
    server, _ = server
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="zoo", prompt="x", max_tokens=4, n=2)
    assert err.value.body["param"] == "n" and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="zoo", prompt="x", max_tokens=4, top_p=2.0)
    assert err.value.body["param"] == "top_p"


def test_plain_http_gets_a_completion(server):
    server, _ = server
    req = urllib.request.Request(server + "/v1/completions", method="POST",
                                 headers={"Content-Type": "application/json"},
                                 data=json.dumps({"prompt": "import os", "max_tokens": 8}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        body = json.loads(r.read())
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 8
    bad = urllib.request.Request(server + "/v1/completions", method="POST", data=b"{not json")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad, timeout=10)
    assert err.value.code == 400 and "error" in json.loads(err.value.read())


def test_a_client_that_disconnects_cancels_its_request(server):
    base, redis_url = server
    req = urllib.request.Request(base + "/v1/completions", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"prompt": "def f(x):", "max_tokens": 400, "stream": True,
                                                  "ignore_eos": True}).encode())
    resp = urllib.request.urlopen(req, timeout=60)
    first = json.loads(resp.readline().decode().removeprefix("data: "))
    rid = first["id"].removeprefix("cmpl-")
    resp.close()  # the client goes away mid-stream
    # The request belongs to the server's client, so read its output stream as the broker's admin would.
    r = redis.Redis.from_url(redis_url)

    def final_chunk():
        keys = list(r.scan_iter(match=f"cosine:out:{rid}.*"))
        rows = r.xrange(keys[0]) if len(keys) == 1 else []
        chunks = [decode_entry(f, (Chunk,)) for _, f in rows]
        return chunks[-1] if chunks and chunks[-1].finished else None

    assert wait_for(final_chunk, 60, 0.2, what="the request's end").finish_reason == "cancelled"
