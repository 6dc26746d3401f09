"""A toy model family, added the way a real one is: this one module plus one registry line
(`models.register(FAMILY)`; a family shipped with xlaserve gets its line in `FAMILIES`).

Llama's weights and names with a GELU (tanh) feed-forward, the `hidden_act="gelu_pytorch_tanh"`
that HF's LlamaForCausalLM runs and our llama family refuses: HF is the oracle for it. (The shared
decoder computes any activation it knows; a family opts in by listing the feature.)
"""

import dataclasses

from xlaserve.runtime.models import llama

FAMILY = dataclasses.replace(
    llama.FAMILY,
    name="toy_gelu",
    hf_architectures=(),
    hf_model_types=("toy_gelu",),
    gguf_architectures=("toy_gelu",),
    features=frozenset({"hidden_act"}),
)
