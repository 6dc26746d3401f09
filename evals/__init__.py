"""Evaluation: the lm-evaluation-harness backends (`xlaserve`, `xlaserve-grpc`), registered with
lm-eval on import when lm-eval is installed (`pip install xlaserve[eval]`)."""

import importlib.util

if importlib.util.find_spec("lm_eval") is not None:
    from xlaserve.evals import lm_eval_backend  # noqa: F401  (registers the backends)
