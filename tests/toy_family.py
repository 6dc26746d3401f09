"""A toy model family, added the way a real one is: this one module plus one registry line
(`models.register(FAMILY)`; a family shipped with xlaserve gets its line in `FAMILIES`).

Llama's weights and names with a GELU (tanh) feed-forward, the `hidden_act="gelu_pytorch_tanh"`
that HF's LlamaForCausalLM runs and our llama family refuses: HF is the oracle for it.
"""

import dataclasses
import functools

import jax

from xlaserve.runtime.models import llama

FAMILY = dataclasses.replace(
    llama.FAMILY,
    name="toy_gelu",
    hf_architectures=(),
    hf_model_types=("toy_gelu",),
    gguf_architectures=("toy_gelu",),
    forward=functools.partial(llama.forward, act=functools.partial(jax.nn.gelu, approximate=True)),
    features=frozenset({"hidden_act"}),
)
