"""Shared fixtures: the real model (required, never skipped), one compiled engine per session, and
the HF transformers reference loading the same GGUF file."""

from __future__ import annotations

import warnings
from pathlib import Path

import background
import pytest
from helpers import TEST_ENGINE, default_model

warnings.filterwarnings("ignore", message=".*torch_dtype.*")

# The fast lane (`make test-fast`, `pytest -m "not slow"`) compiles no real model: a test is slow
# when it uses a compiled engine or a converted checkpoint, or lives in a module of end-to-end tests.
SLOW_FIXTURES = {"llm", "hf_model", "qwen_llm", "qwen_hf", "keep_ckpt", "results", "tiny_dirs"}
SLOW_FIXTURES |= {"qwen15_path"}  # the 1.5B is only ever compiled
SLOW_MODULES = {
    "test_bench_decode",
    "test_bench_kernels",
    "test_cli",
    "test_evals",
    "test_hf_dir",
    "test_http_model",
    "test_model_vs_hf",
    "test_model_families",
    "test_server_e2e",
    "test_slots",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames) or item.module.__name__.split(".")[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


def pytest_collection_finish(session):
    if not session.config.option.collectonly:
        background.start(session.items)  # the subprocess jobs the selected tests need


def pytest_sessionfinish(session):
    background.stop()


@pytest.fixture(scope="session")
def model_path():
    from xlaserve.checkpoints import registry

    try:
        return Path(default_model())
    except registry.PullError as e:
        pytest.fail(f"the default model is required for the test suite and could not be pulled: {e}")


@pytest.fixture(scope="session")
def qwen_path():
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2), pulled once per machine into the model cache."""
    from xlaserve.checkpoints import registry

    try:
        return registry.resolve("qwen2.5-coder-0.5b", log=lambda m: None)
    except registry.PullError as e:
        pytest.fail(f"the Qwen model is required for the test suite and could not be pulled: {e}")


@pytest.fixture(scope="session")
def qwen15_path():
    """Qwen2.5-Coder-1.5B-Instruct Q4_K_M (qwen2; the 0.5B's target in speculative decoding), pulled
    once per machine into the model cache."""
    from xlaserve.checkpoints import registry

    try:
        return registry.resolve("qwen2.5-coder-1.5b", log=lambda m: None)
    except registry.PullError as e:
        pytest.fail(f"the Qwen 1.5B model is required for the test suite and could not be pulled: {e}")


@pytest.fixture(scope="session")
def llm(model_path):
    from xlaserve import LLM

    return LLM(str(model_path), **TEST_ENGINE)


@pytest.fixture(scope="session")
def qwen_llm(qwen_path):
    """Qwen2.5-Coder-0.5B on the test engine, its programs compiled on first use (its tests run few)."""
    from xlaserve import LLM

    return LLM(str(qwen_path), **(TEST_ENGINE | {"compile_at": "use"}))


@pytest.fixture(scope="session")
def qwen_hf(qwen_path):
    return _hf_from_gguf(qwen_path)


@pytest.fixture(scope="session")
def hf_model(model_path):
    return _hf_from_gguf(model_path)


def _hf_from_gguf(path):
    import torch  # the reference stack is required: a missing torch is an error, not a skip
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)


@pytest.fixture(scope="session")
def keep_ckpt(model_path, tmp_path_factory):
    """SmolLM2 converted to an xlaserve checkpoint as it is stored (Q4_1/Q8_0 blocks kept)."""
    from xlaserve.checkpoints import convert

    out = tmp_path_factory.mktemp("ckpt") / "smollm2"
    convert.convert(model_path, out, quant="keep")
    return out
