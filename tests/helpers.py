"""Helpers shared by the tests (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import socket

import numpy as np

# A small engine shape shared by the end-to-end tests: compiles in ~10 s on 2 cores.
TEST_ENGINE = dict(max_slots=4, prefill_buckets=(32, 128), max_model_len=1024)
# Logits of our fp32 engine and HF fp32 on the same weights differ only by summation order; the
# largest difference measured was 1.4e-4 on logits of magnitude ~30.
LOGIT_ATOL = 2e-3


def hf_logits(hf_model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(hf_model, ids, n: int) -> list[int]:
    """n greedy tokens from HF with its KV cache, never stopping at EOS (the oracle for
    `ignore_eos=True`)."""
    import torch

    out, past, inputs = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            res = hf_model(input_ids=inputs, past_key_values=past, use_cache=True)
            past = res.past_key_values
            token = int(res.logits[0, -1].argmax())
            out.append(token)
            inputs = torch.tensor([[token]])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
