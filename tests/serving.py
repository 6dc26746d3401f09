"""The mock-engine server used by the server tests (importable: pytest puts tests/ on sys.path):
an LLM over the mock engine (hand-checkable tokens: each is the previous + 1; nothing compiles) with
a word-level tokenizer, served by the real gRPC server on loopback."""

from __future__ import annotations

import grpc
import tokenizers
from tokenizers import models, pre_tokenizers

from xlaserve import LLM, EngineConfig
from xlaserve.checkpoints.tokenizer import Tokenizer
from xlaserve.runtime.mock_engine import VOCAB, MockEngine
from xlaserve.serve.client import Client
from xlaserve.serve.server import Server

Code = grpc.StatusCode
ENGINE = EngineConfig(max_slots=4, max_queue=8, max_model_len=256, page_size=4, max_per_client=None)


def mock_tokenizer(vocab: int = VOCAB) -> Tokenizer:
    """The mock engine's words: token i is "w{i}", separated by spaces; w0 is EOS."""
    backend = tokenizers.Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }} {% endfor %}"
        "{% if add_generation_prompt %}w3{% endif %}"
    )
    return Tokenizer(backend, bos_token=None, eos_token="w0", chat_template=template, source="mock")


def mock_llm(step_s: float = 0.0, **fields) -> LLM:
    cfg = EngineConfig(**{**ENGINE.__dict__, **fields})
    return LLM.from_engine(MockEngine(cfg, step_s=step_s), mock_tokenizer(), source="mock")


def start(llm, **server_kw) -> tuple[Server, Client]:
    server = Server(port=0, model_names=("mock",), **server_kw).start()
    server.attach(llm)
    return server, Client(f"127.0.0.1:{server.port}", api_key=server_kw.get("api_keys", [None])[0])


def start_http(llm, **server_kw):
    """The OpenAI-compatible HTTP API over `llm` on a free loopback port, and the official client
    (no retries: a 429 or 503 is what a test wants to see). Returns (HttpServer, openai.OpenAI)."""
    import openai

    from xlaserve.serve.http_server import HttpServer

    http = HttpServer(port=0, model_names=("mock",), **server_kw).start()
    http.attach(llm)
    key = (server_kw.get("api_keys") or ["none"])[0]
    return http, openai.OpenAI(base_url=http.url + "/v1", api_key=key, max_retries=0)
