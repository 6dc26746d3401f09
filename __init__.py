"""xlaserve: a JAX/XLA-compiled LLM inference runtime.

from xlaserve import LLM, SamplingParams
llm = LLM("smollm2")
print(llm.generate("The capital of France is", SamplingParams(temperature=0))[0].text)
"""

__version__ = "0.1.0"

# The public API is imported lazily so that `xlaserve pull` and `--help` do not start JAX.
_PUBLIC = {
    "LLM": "xlaserve.llm",
    "SamplingParams": "xlaserve.runtime.sampling_params",
    "EngineConfig": "xlaserve.runtime.config",
    "ModelConfig": "xlaserve.runtime.config",
    "RequestOutput": "xlaserve.runtime.request",
    "CheckpointError": "xlaserve.checkpoints.loaded",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'xlaserve' has no attribute {name!r}")
