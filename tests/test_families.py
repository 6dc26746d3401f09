"""The family seam: every family runs sharded as on one device (tiny configs, 8 simulated devices
in one process), a toy family added as one module plus one registry line loads an HF directory
and matches HF, and a config flag a family does not implement is refused, naming it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import background
import numpy as np
import pytest
import toy_family
from helpers import LOGIT_ATOL, TINY_ENGINE, hf_greedy, hf_logits, save_tiny

from xlaserve.checkpoints.gguf import open_reader, read_metadata
from xlaserve.checkpoints.load import load_model
from xlaserve.checkpoints.loaded import CheckpointError
from xlaserve.checkpoints.tokenizer import tokenizer_from_gguf
from xlaserve.runtime import models

TP2 = background.Job(
    lambda folder: [sys.executable, str(Path(__file__).parent / "families_worker.py")], fixture="tp2"
)


@pytest.fixture
def tp2():
    """The worker's run (in the background from the start of the session: tests/background.py)."""
    return TP2.result()


@pytest.mark.slow
def test_every_family_on_a_tp2_mesh_equals_one_device(tp2):
    run = tp2
    assert run.returncode == 0, run.stderr[-3000:]
    results = {r["family"]: r for r in map(json.loads, run.stdout.splitlines())}
    assert set(results) == {*models.FAMILIES, toy_family.FAMILY.name}
    for r in results.values():
        assert r["tokens_1"] == r["tokens_tp2"], r
        assert r["max_abs_diff"] < LOGIT_ATOL, r


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return tokenizer_from_gguf(read_metadata(open_reader(model_path)), model_path)


@pytest.fixture
def toy_registered():
    models.register(toy_family.FAMILY)
    yield toy_family.FAMILY
    del models.FAMILIES[toy_family.FAMILY.name]


def set_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.slow
def test_toy_family_loads_an_hf_directory_and_matches_hf(tmp_path, tokenizer, toy_registered):
    from xlaserve import LLM, SamplingParams

    hf = save_tiny(tmp_path, tokenizer, hidden_act="gelu_pytorch_tanh")
    # Our llama family does not run a GELU feed-forward: refused, naming the flag and the family.
    with pytest.raises(
        CheckpointError, match="hidden_act='gelu_pytorch_tanh' is not implemented for the llama"
    ):
        load_model(tmp_path)
    set_config(tmp_path, model_type="toy_gelu", architectures=["ToyGeluForCausalLM"])
    llm = LLM(str(tmp_path), **{**TINY_ENGINE, "max_model_len": 128})
    assert llm.config.architecture == "toy_gelu"
    ids = llm.encode("The toy family runs through the same loader, engine and sampler. " * 2)
    (scores,) = llm.score([(ids, 1)])  # log-probs of ids[1:], each given the tokens before it
    lg = hf_logits(hf, ids)[:-1]
    peak = lg.max(-1, keepdims=True)
    want = lg - peak - np.log(np.exp(lg - peak).sum(-1, keepdims=True))
    np.testing.assert_allclose(
        scores.logprobs, want[np.arange(len(ids) - 1), ids[1:]], atol=LOGIT_ATOL, rtol=0
    )
    out = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(hf, ids, 16)


@pytest.mark.parametrize(
    "flag, value", [("attention_bias", True), ("mlp_bias", True), ("attn_logit_softcapping", 50.0)]
)
def test_a_flag_the_family_does_not_implement_is_refused(tmp_path, tokenizer, flag, value):
    save_tiny(tmp_path, tokenizer, **{flag: value})
    with pytest.raises(CheckpointError, match=f"{flag}={value!r} is not implemented for the llama family"):
        load_model(tmp_path)


def test_per_layer_variants_are_stacks_of_their_own_layers():
    """A family with two kinds of layer declares two stacks; the loader fills each from the model
    layers its declaration lists (here layers 0-1 and 2-4), by the tensor names of those layers."""
    import dataclasses

    from xlaserve.checkpoints.loaded import assemble
    from xlaserve.runtime.models.params import declare, declare_stacked
    from xlaserve.runtime.models.presets import PRESETS

    cfg = dataclasses.replace(PRESETS["tiny"], num_layers=5, architecture="two_stacks")
    d = cfg.hidden_size

    def param_info(cfg):
        return {
            "embed": declare((cfg.vocab_size, "vocab"), (d, "embed"), matrix=True),
            "dense": {"norm": declare_stacked(range(2), (d, None), matrix=False)},
            "moe": {"norm": declare_stacked(range(2, 5), (d, None), matrix=False)},
        }

    family = dataclasses.replace(toy_family.FAMILY, name="two_stacks", param_info=param_info)
    models.register(family)
    try:
        read = lambda name, layer: np.full((d,) if layer is not None else (cfg.vocab_size, d), layer or 0.0)
        weights = assemble(cfg, read, dequant=False, dtype=np.float32, path="two_stacks")
    finally:
        del models.FAMILIES["two_stacks"]
    assert weights["dense"]["norm"].shape == (2, d) and weights["moe"]["norm"].shape == (3, d)
    np.testing.assert_array_equal(weights["dense"]["norm"][:, 0], [0, 1])
    np.testing.assert_array_equal(weights["moe"]["norm"][:, 0], [2, 3, 4])
