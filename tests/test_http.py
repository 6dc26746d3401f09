"""The OpenAI-compatible HTTP API over the mock engine (hand-checkable tokens: each is the previous
+ 1; nothing compiles), with the official `openai` client and raw HTTP on loopback: every endpoint,
the SSE framing, usage, log-probs, echo, n, and a table of bad requests each refused with the right
status and parameter while the server keeps serving."""

from __future__ import annotations

import dataclasses
import json

import httpx
import openai
import pytest
from serving import mock_llm, start_http

from xlaserve import SamplingParams
from xlaserve.runtime.mock_engine import OTHER_LOGPROB

CHAT = [{"role": "user", "content": "w40"}]  # the mock template ends with w3: the reply is w4 w5 ...


@pytest.fixture(scope="module")
def served():
    http, client = start_http(mock_llm(step_s=0.002))
    yield http, client
    http.stop()


def events(http, path: str, body: dict) -> list:
    """The raw SSE frames of a streamed request: JSON objects, then the string "[DONE]"."""
    with httpx.stream("POST", http.url + path, json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    frames = raw.split("\n\n")
    assert frames[-1] == "" and all(f.startswith("data: ") for f in frames[:-1]), raw
    return [f[6:] if f == "data: [DONE]" else json.loads(f[6:]) for f in frames[:-1]]


def test_health_models_and_unknown_routes(served):
    http, client = served
    assert httpx.get(http.url + "/health").json() == {"status": "serving"}
    assert [m.id for m in client.models.list()] == ["mock"]
    assert client.models.retrieve("mock").owned_by == "xlaserve"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    r = httpx.get(http.url + "/v2/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(http.url + "/metrics").status_code == 404  # not where the metrics endpoint is
    assert httpx.get(http.url + "/docs").status_code == 404


def test_completion_equals_the_python_api(served):
    _, client = served
    out = client.completions.create(model="mock", prompt="w5 w6 w7", max_tokens=6, temperature=0)
    same = mock_llm().generate("w5 w6 w7", SamplingParams(max_tokens=6, temperature=0.0))[0]
    assert out.choices[0].text == same.text == "w8 w9 w10 w11 w12 w13"
    assert out.choices[0].finish_reason == "length" and out.object == "text_completion"
    assert out.id.startswith("cmpl-") and out.model == "mock"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (3, 6, 9)
    eos = client.completions.create(model="mock", prompt="w509", max_tokens=10)
    assert eos.choices[0].text == "w510 w511" and eos.choices[0].finish_reason == "stop"
    assert eos.usage.completion_tokens == 3  # the end-of-sequence token was generated
    stop = client.completions.create(model="mock", prompt="w5", max_tokens=10, stop="w9")
    assert stop.choices[0].text == "w6 w7 w8 " and stop.choices[0].finish_reason == "stop"
    assert stop.choices[0].model_extra["stop_reason"] == "w9"
    default = client.completions.create(model="mock", prompt="w5")  # OpenAI's default: 16 tokens
    assert default.usage.completion_tokens == 16


def test_chat_completion(served):
    _, client = served
    out = client.chat.completions.create(model="mock", messages=CHAT, max_tokens=3)
    msg = out.choices[0].message
    assert (msg.role, msg.content, msg.tool_calls) == ("assistant", "w4 w5 w6", None)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.usage.prompt_tokens == 3 and out.usage.completion_tokens == 3  # "user: w40 w3"
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "w7"}, {"type": "text", "text": "w8"}]}
    ]
    out = client.chat.completions.create(model="mock", messages=parts, max_completion_tokens=2)
    # "developer" is read as "system" (which the template accepts): "system: w7\nw8 w3"
    assert out.usage.prompt_tokens == 4 and out.choices[0].message.content == "w4 w5"
    out = client.chat.completions.create(model="mock", messages=CHAT)  # default: the room left (256 - 3)
    assert out.usage.completion_tokens == 253 and out.choices[0].finish_reason == "length"


def test_prompt_forms_and_n(served):
    _, client = served
    out = client.completions.create(
        model="mock", prompt=["w1", "w10 w11"], max_tokens=2, n=2, seed=3, temperature=0
    )
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == ["w2 w3", "w2 w3", "w12 w13", "w12 w13"]
    # each prompt counted once however many choices sample it; every choice's tokens counted
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (3, 8)
    ids = client.completions.create(model="mock", prompt=[7, 8], max_tokens=2)
    assert ids.choices[0].text == "w9 w10" and ids.usage.prompt_tokens == 2
    many = client.completions.create(model="mock", prompt=[[7], [20, 21]], max_tokens=1)
    assert [c.text for c in many.choices] == ["w8", "w22"]
    chat = client.chat.completions.create(model="mock", messages=CHAT, max_tokens=2, n=3)
    assert [c.message.content for c in chat.choices] == ["w4 w5"] * 3
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (3, 6)
    again = client.completions.create(model="mock", prompt="w50 w51 w52 w53 w54 w55 w56 w57", max_tokens=1)
    again = client.completions.create(model="mock", prompt="w50 w51 w52 w53 w54 w55 w56 w57", max_tokens=1)
    assert again.usage.prompt_tokens_details.cached_tokens == 7  # a page and 3 tokens (never the last)


def test_logprobs_and_echo(served):
    _, client = served
    out = client.chat.completions.create(
        model="mock", messages=CHAT, max_tokens=2, logprobs=True, top_logprobs=2
    )
    first = out.choices[0].logprobs.content[0]
    assert (first.token, first.logprob, first.bytes) == ("w4", 0.0, list(b"w4"))
    assert [(t.token, t.logprob) for t in first.top_logprobs] == [("w4", 0.0), ("w5", OTHER_LOGPROB)]
    plain = client.chat.completions.create(model="mock", messages=CHAT, max_tokens=2, logprobs=True)
    assert plain.choices[0].logprobs.content[1].top_logprobs == []
    assert (
        client.chat.completions.create(model="mock", messages=CHAT, max_tokens=1).choices[0].logprobs is None
    )
    legacy = client.completions.create(model="mock", prompt="w5", max_tokens=2, logprobs=1)
    lp = legacy.choices[0].logprobs
    assert lp.tokens == ["w6", "w7"] and lp.token_logprobs == [0.0, 0.0] and lp.text_offset == [0, 2]
    assert lp.top_logprobs == [{"w6": 0.0}, {"w7": 0.0}]
    echo = client.completions.create(model="mock", prompt="w5 w6 w9", max_tokens=1, echo=True)
    assert echo.choices[0].text == "w5 w6 w9" + "w10"
    scored = client.completions.create(model="mock", prompt="w5 w6 w9", max_tokens=1, echo=True, logprobs=0)
    lp = scored.choices[0].logprobs
    assert lp.tokens == ["w5", "w6", "w9", "w10"]
    # the prompt scored by the engine: w6 follows w5 (0), w9 does not follow w6 (-10); the first has none
    assert lp.token_logprobs == [None, 0.0, OTHER_LOGPROB, 0.0]
    assert lp.top_logprobs[0] is None and lp.top_logprobs[2] == {"w9": OTHER_LOGPROB}
    assert lp.text_offset[:3] == [0, 2, 4] and lp.text_offset[3] == len("w5 w6 w9")


def test_sse_framing_and_usage(served):
    http, _ = served
    frames = events(
        http, "/v1/chat/completions", {"model": "mock", "messages": CHAT, "max_tokens": 3, "stream": True}
    )
    assert frames[-1] == "[DONE]"
    chunks = frames[:-1]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "w4 w5 w6"
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    body = {"model": "mock", "prompt": "w5", "max_tokens": 2, "stream": True, "n": 2}
    body["stream_options"] = {"include_usage": True}
    frames = events(http, "/v1/completions", body)
    assert frames[-1] == "[DONE]" and frames[-2]["choices"] == []
    assert frames[-2]["usage"] == {
        "prompt_tokens": 1,
        "completion_tokens": 4,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert all(c["usage"] is None for c in frames[:-2])
    for i in (0, 1):
        mine = [c["choices"][0] for c in frames[:-2] if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == "w6 w7" and mine[-1]["finish_reason"] == "length"


def test_the_client_streams(served):
    _, client = served
    stream = client.chat.completions.create(
        model="mock", messages=CHAT, max_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "w4 w5 w6 w7"
    assert chunks[-1].usage.completion_tokens == 4
    stream = client.completions.create(
        model="mock", prompt="w5 w6", max_tokens=2, stream=True, echo=True, logprobs=0
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == "w5 w6w7 w8"
    assert chunks[0].choices[0].logprobs.token_logprobs == [None, 0.0]
    streamed = client.chat.completions.create(
        model="mock", messages=CHAT, max_tokens=2, stream=True, logprobs=True, top_logprobs=1
    )
    lps = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in lps] == [("w4", 0.0), ("w5", 0.0)]


PENALTY_FIELD = "presence_penalty" in {f.name for f in dataclasses.fields(SamplingParams)}
C, T = "/v1/chat/completions", "/v1/completions"
BAD = [
    (C, {}, 400, "messages"),
    (C, {"messages": []}, 400, "messages"),
    (C, {"messages": [{"role": 1, "content": "w1"}]}, 400, "messages[0].role"),
    (C, {"messages": [{"role": "admin", "content": "w1"}]}, 400, "messages[0].role"),
    (C, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content[0]"),
    (C, {"messages": CHAT, "temperature": -1}, 400, "temperature"),
    (C, {"messages": CHAT, "temperature": "hot"}, 400, "temperature"),
    (C, {"messages": CHAT, "top_p": 0}, 400, "top_p"),
    (C, {"messages": CHAT, "top_k": -5}, 400, "top_k"),
    (C, {"messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    (C, {"messages": CHAT, "max_completion_tokens": 10**6}, 400, "max_completion_tokens"),
    (C, {"messages": CHAT, "n": 0}, 400, "n"),
    (C, {"messages": CHAT, "n": 1000}, 400, "n"),
    (C, {"messages": CHAT, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    (C, {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    (C, {"messages": CHAT, "stop": [""]}, 400, "stop"),
    (C, {"messages": CHAT, "stop": ["w9"] * 17}, 400, "stop"),
    (C, {"messages": CHAT, "seed": "x"}, 400, "seed"),
    (C, {"messages": CHAT, "logit_bias": {"5": 3}}, 400, "logit_bias"),
    (C, {"messages": CHAT, "presence_penalty": 0.5}, 200 if PENALTY_FIELD else 400, "presence_penalty"),
    (C, {"messages": CHAT, "response_format": {"type": "xml"}}, 400, "response_format.type"),
    (
        C,
        {"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        400,
        "response_format.json_schema.schema",
    ),
    (C, {"messages": CHAT, "response_format": {"type": "json_object"}, "regex": "w1"}, 400, "regex"),
    (C, {"messages": CHAT, "tool_choice": "required"}, 400, "tool_choice"),
    (
        C,
        {
            "messages": CHAT,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        },
        400,
        "tool_choice",
    ),
    (C, {"messages": CHAT, "functions": [{"name": "f"}]}, 400, "functions"),
    (C, {"model": "gpt-4", "messages": CHAT}, 404, "model"),
    (T, {}, 400, "prompt"),
    (T, {"prompt": []}, 400, "prompt"),
    (T, {"prompt": ""}, 400, "prompt"),
    (T, {"prompt": [1, 10**6]}, 400, "prompt"),
    (T, {"prompt": [1, "w2"]}, 400, "prompt"),
    (T, {"prompt": "w1 " * 300}, 400, "prompt"),
    (T, {"prompt": "w1", "max_tokens": 300}, 400, "max_tokens"),
    (T, {"prompt": "w1", "suffix": "w2"}, 400, "suffix"),
    (T, {"prompt": "w1", "best_of": 3}, 400, "best_of"),
    (T, {"prompt": "w1", "logprobs": 21}, 400, "logprobs"),
    (T, {"prompt": "w1", "stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    (T, {"prompt": "w1", "min_p": 2}, 400, "min_p"),
    (T, {"prompt": "w1", "repetition_penalty": 0}, 400, "repetition_penalty"),
]


def test_bad_requests_are_refused_naming_the_parameter(served):
    http, client = served
    for path, body, status, param in BAD:
        body = (
            {"model": "mock", "max_tokens": 2, **body} if status != 200 or "max_tokens" not in body else body
        )
        r = httpx.post(http.url + path, json=body, timeout=10)
        assert r.status_code == status, (body, r.text)
        if status != 200:
            error = r.json()["error"]
            assert error["param"] == param, (body, error)
            assert error["type"] == ("invalid_request_error") and error["message"], error
    for raw in (b"{", b"[1, 2]", b"null", '{"prompt": "\udcff"}'.encode("utf-8", "surrogatepass")):
        r = httpx.post(http.url + T, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", (raw, r.text)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="mock", messages=CHAT, temperature=3000)
    assert e.value.body["param"] == "temperature" and "[0.0, 100.0]" in e.value.body["message"]
    assert client.completions.create(model="mock", prompt="w1", max_tokens=2).choices[0].text == "w2 w3"
    unknown = {"model": "mock", "prompt": "w1", "max_tokens": 1, "frobnicate": {"x": 1}, "user": "me"}
    assert httpx.post(http.url + T, json=unknown).status_code == 200  # unknown fields are ignored
    stats = http.service.loop.stats()
    assert stats.slots_busy == 0 and stats.queue_length == 0
