"""The OpenAI-compatible HTTP API on the real model (SmolLM2), with the official client: greedy
answers equal the Python API's, streaming equals non-streaming, log-probs equal the engine's, n
choices and seeds reproduce, stop strings cut, usage counts cached prompts; and structured output
(JSON object, JSON schema, forced tool calls) gives outputs that validate (these need the engine to
honour SamplingParams' json_schema / grammar: runtime/grammar.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import jsonschema
import openai
import pytest
from helpers import free_port

from xlaserve import SamplingParams
from xlaserve.serve.http_server import HttpServer

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
N = 12  # tokens per answer: small, the module runs in well under a minute on 2 cores


@pytest.fixture(scope="module")
def solo(llm):
    """The Python API's answers, before the server takes the runner."""
    greedy = SamplingParams(temperature=0.0, max_tokens=N, logprobs=2)
    text = llm.generate(PROMPT, greedy)[0]
    chat = llm.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=N))
    score = llm.score([(llm.encode(PROMPT), 1)])[0]
    return {"text": text, "chat": chat, "score": score}


@pytest.fixture(scope="module")
def client(llm, solo):
    http = HttpServer(port=0, model_names=("smollm2",)).start()
    http.attach(llm)
    yield openai.OpenAI(base_url=http.url + "/v1", api_key="none", max_retries=0, timeout=120)
    http.stop()  # closes its engine loop: the runner goes back to the other tests


def test_greedy_equals_the_python_api(client, solo):
    out = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=N, temperature=0)
    want = solo["text"]
    assert out.choices[0].text == want.text
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (
        len(want.prompt_token_ids),
        len(want.token_ids),
    )
    chat = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=N, temperature=0)
    assert chat.choices[0].message.content == solo["chat"].text
    assert chat.usage.prompt_tokens == len(solo["chat"].prompt_token_ids)
    assert chat.choices[0].finish_reason == {"eos": "stop", "length": "length"}[solo["chat"].finish_reason]


def test_streaming_equals_non_streaming(client, solo):
    stream = client.chat.completions.create(
        model="smollm2",
        messages=CHAT,
        max_tokens=N,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == solo["chat"].text
    assert chunks[-1].usage.completion_tokens == len(solo["chat"].token_ids)
    stream = client.completions.create(
        model="smollm2", prompt=PROMPT, max_tokens=N, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == solo["text"].text


def test_logprobs_equal_the_engine(client, solo):
    want = solo["text"].logprobs
    out = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=N, temperature=0, logprobs=2)
    assert out.choices[0].logprobs.token_logprobs == pytest.approx([lp.logprob for lp in want], abs=1e-4)
    for token, logprob, top in zip(
        *(getattr(out.choices[0].logprobs, k) for k in ("tokens", "token_logprobs", "top_logprobs")),
        strict=True,
    ):
        assert top[token] == pytest.approx(logprob) and len(top) == 2  # greedy: the best of the 2
    msg = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    for t in msg.choices[0].logprobs.content:
        assert [a.logprob for a in t.top_logprobs] == sorted(
            [a.logprob for a in t.top_logprobs], reverse=True
        )
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5)  # greedy: the best one
    text = "".join(bytes(t.bytes).decode("utf-8", "replace") for t in msg.choices[0].logprobs.content)
    assert text == msg.choices[0].message.content
    echo = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=1, echo=True, logprobs=0)
    lp = echo.choices[0].logprobs
    n = len(solo["text"].prompt_token_ids)
    assert echo.choices[0].text.startswith(PROMPT) and lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:n] == pytest.approx(solo["score"].logprobs, abs=1e-4)


def test_n_choices_and_seeds_reproduce(client):
    kw = dict(model="smollm2", messages=CHAT, max_tokens=N, temperature=0.8)
    three = client.chat.completions.create(n=3, seed=11, **kw)
    texts = [c.message.content for c in three.choices]
    assert len(texts) == 3 and len(set(texts)) > 1  # three samples, not one copied
    assert [c.message.content for c in client.chat.completions.create(n=3, seed=11, **kw).choices] == texts
    assert client.chat.completions.create(seed=12, **kw).choices[0].message.content == texts[1]  # seed + j
    assert three.usage.prompt_tokens == client.chat.completions.create(seed=12, **kw).usage.prompt_tokens
    once = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=N, temperature=0.8, seed=5)
    again = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=N, temperature=0.8, seed=5)
    assert once.choices[0].text == again.choices[0].text
    streamed = client.completions.create(
        model="smollm2", prompt=PROMPT, max_tokens=N, temperature=0.8, seed=5, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == once.choices[0].text


def test_stop_strings_and_cached_prompts(client, solo):
    full = solo["text"].text
    word = full.split()[2]
    out = client.completions.create(
        model="smollm2", prompt=PROMPT, max_tokens=N, temperature=0, stop=[word, "zzz"]
    )
    assert out.choices[0].text == full[: full.index(word)] and out.choices[0].finish_reason == "stop"
    long = "Here is a list of European capitals and their countries: " * 4
    first = client.completions.create(model="smollm2", prompt=long, max_tokens=1, temperature=0)
    again = client.completions.create(model="smollm2", prompt=long, max_tokens=1, temperature=0)
    assert first.usage.prompt_tokens == again.usage.prompt_tokens
    assert 0 < again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens


# -- structured output: these need the engine to honour json_schema / grammar ----------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def test_json_outputs_validate(client):
    ask = [{"role": "user", "content": "Describe a person as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in (1, 2):
        out = client.chat.completions.create(
            model="smollm2", messages=ask, max_tokens=40, temperature=0.8, seed=seed, response_format=fmt
        )
        jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)
        assert out.choices[0].finish_reason == "stop"
    short = [{"role": "user", "content": 'Reply with the JSON object {"ok": true}.'}]
    obj = client.chat.completions.create(
        model="smollm2", messages=short, max_tokens=40, temperature=0, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    assert obj.choices[0].finish_reason == "stop"


def test_forced_tool_calls_validate(client):
    ask = [{"role": "user", "content": "What's the weather in Paris?"}]
    # "required" lets the model make several calls (parallel_tool_calls defaults to true): SmolLM2
    # makes the same one twice; a named function is called once.
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        out = client.chat.completions.create(
            model="smollm2", messages=ask, max_tokens=80, temperature=0, tools=[WEATHER], tool_choice=choice
        )
        c = out.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.tool_calls and not c.message.content, c
        assert len(c.message.tool_calls) == (1 if isinstance(choice, dict) else 2)
        for call in c.message.tool_calls:
            assert call.function.name == "get_weather" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    stream = client.chat.completions.create(
        model="smollm2",
        messages=ask,
        max_tokens=40,
        temperature=0,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert (
        calls
        and calls[0].function.name == "get_weather"
        and calls[0].id.startswith("call_")
        and chunks[-1].choices[0].finish_reason == "tool_calls"
    )
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)  # the call is not content
    # the arguments arrive piece by piece, and together equal the non-streamed call's
    pieces = [t.function.arguments for t in calls[1:]]
    assert len(pieces) > 2 and all(t.index == 0 and t.id is None for t in calls[1:])
    whole = client.chat.completions.create(
        model="smollm2",
        messages=ask,
        max_tokens=40,
        temperature=0,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    assert "".join(pieces) == whole.choices[0].message.tool_calls[0].function.arguments


def test_serve_process_http_alone_health_and_sigterm_drain(model_path):
    """`xlaserve serve --http-port` alone: no gRPC port; /health 503 while compiling, 200 when serving;
    on SIGTERM new requests get 503 and the stream in flight completes, then the process exits 0."""
    port = free_port()
    engine = ["--max-slots", "4", "--max-model-len", "1024", "--prefill-buckets", "32,128"]
    cmd = [
        sys.executable,
        "-m",
        "xlaserve.cli",
        "serve",
        "--model",
        str(model_path),
        "--http-port",
        str(port),
    ]
    proc = subprocess.Popen(
        [*cmd, "--grace-period", "60", *engine],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_for(rf"OpenAI-compatible HTTP API on http://127\.0\.0\.1:{port}/v1", proc, 120)
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/health").status_code == 503  # still loading and compiling
        seen = wait_for(r"SERVING .*compile", proc, 300)
        assert "listening on" not in seen  # no gRPC server
        assert httpx.get(url + "/health").json() == {"status": "serving"}
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert next(m.id for m in client.models.list()) == str(model_path)
        body = {"prompt": PROMPT, "max_tokens": 48, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            wait_for("draining", proc, 30)
            assert httpx.get(url + "/health").status_code == 503
            with pytest.raises(openai.InternalServerError) as e:
                client.completions.create(model=str(model_path), prompt="x", max_tokens=1)
            assert e.value.status_code == 503
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def wait_for(pattern: str, proc, timeout: float) -> str:
    """stderr up to the first line matching `pattern`."""
    end, seen = time.time() + timeout, ""
    while time.time() < end:
        line = proc.stderr.readline()
        seen += line
        if re.search(pattern, line):
            return seen
        if proc.poll() is not None:
            break
    raise AssertionError(f"{pattern!r} not seen; stderr so far:\n{seen}")
