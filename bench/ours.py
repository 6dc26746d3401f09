"""Our side of `xlaserve bench decode`: the model under test and our engine driven directly.

- `load`: a checkpoint (as stored or dequantized) or a preset's shapes with random weights (dense or
  quantized, `QUANT_ALIASES`);
- `prompt_tokens`: the prompt ids both sides prefill;
- `Decoder`: TTFT and decode-step timing of one engine's compiled programs (`Engine.prefill`,
  `Engine.decode`), the counterpart of bench/hf.py's `Decoder`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xlaserve.runtime.config import ModelConfig
from xlaserve.runtime.models.presets import PRESETS

QUANT_ALIASES = {"int8": "q8_0", "int4": "q4_0"}


@dataclass
class Model:
    """What `load` built: weights, their quantization label and, for a checkpoint, its path and
    tokenizer."""

    name: str
    cfg: ModelConfig
    weights: object
    quant: str
    path: Path | None = None
    tokenizer: object = None


def load(args, dtype: str, log) -> Model:
    """The model under test: a checkpoint (`args.model`, as stored or dequantized) or a preset's
    shapes with random weights (dense or quantized), per `args.quant`; `log` tells of a download."""
    import jax.numpy as jnp

    from xlaserve.runtime import models
    from xlaserve.runtime.models import params

    quant = QUANT_ALIASES.get(args.quant, args.quant)
    if args.preset:
        cfg, quant = PRESETS[args.preset], quant or "none"
        if quant == "native":
            raise ValueError(
                "--quant native needs a checkpoint (--model); presets take none, q8_0, q4_0, q4_1"
            )
        infos, dt = models.declare(cfg), jnp.dtype(dtype)
        if quant == "none":
            return Model(args.preset, cfg, params.random_weights(infos, args.seed, dt), quant)
        return Model(args.preset, cfg, params.random_quantized(infos, quant, dt, args.seed), quant)
    from xlaserve.checkpoints import registry
    from xlaserve.checkpoints.load import load_model

    quant = quant or "native"
    if quant not in ("native", "none"):
        raise ValueError(f"--quant {quant}: a checkpoint runs as stored (native) or dequantized (none)")
    path = registry.resolve(args.model, log=log)
    loaded = load_model(path, dequantize=quant == "none", dtype=dtype)
    label = loaded.quantization if quant == "native" else "none"
    return Model(path.name, loaded.config, loaded.weights, label, path, loaded.tokenizer)


def prompt_tokens(model: Model, n: int, seed: int) -> np.ndarray:
    """n prompt ids: compare_hf's prompts, repeated, for a real model; random ids for a preset."""
    if model.tokenizer is None:
        return np.random.default_rng(seed).integers(0, model.cfg.vocab_size, n).astype(np.int32)
    from xlaserve.bench.compare_hf import PROMPTS

    ids = model.tokenizer.encode("\n\n".join(PROMPTS))
    return np.resize(np.asarray(ids, np.int32), n)


class Decoder:
    """Drives one engine's compiled programs directly (not the scheduler)."""

    def __init__(self, engine):
        self.engine = engine
        e = engine.ecfg
        self.table = np.arange(e.max_slots * e.pages_per_seq, dtype=np.int32).reshape(e.max_slots, -1)

    def ttft(self, tokens: np.ndarray) -> float:
        """The prompt's chunks through `Engine.prefill`, then the first token on the host."""
        from xlaserve.runtime.engine import to_host
        from xlaserve.runtime.sampling import SamplingState

        e, chunk = self.engine, self.engine.ecfg.prefill_buckets[-1]
        presence = np.zeros((e.cfg.vocab_size,), bool)
        presence[tokens] = True
        sampling = SamplingState.zeros(1)
        t0 = time.perf_counter()
        for start in range(0, len(tokens), chunk):
            packed = e.prefill(tokens[start : start + chunk], start, self.table[0], sampling, presence)
        to_host(packed)
        return time.perf_counter() - t0

    def decode(self, batch: int, context: int, steps: int) -> float:
        """Seconds per step: `batch` slots at length context - steps, `steps` dispatches."""
        import jax

        from xlaserve.runtime.engine import to_host
        from xlaserve.runtime.programs import DecodeState

        e, slots = self.engine, self.engine.ecfg.max_slots
        busy = np.arange(slots) < batch
        state = dataclasses.replace(
            DecodeState.zeros(slots, e.cfg.vocab_size),
            tokens=np.full((slots,), 1, np.int32),
            lengths=np.where(busy, context - steps, 0).astype(np.int32),
            active=busy,
        )
        e.state = jax.block_until_ready(jax.device_put(state, jax.tree.map(lambda a: a.sharding, e.state)))
        t0 = time.perf_counter()
        for _ in range(steps):
            packed = e.decode(self.table, context, batch)
        to_host(packed)
        return (time.perf_counter() - t0) / steps
