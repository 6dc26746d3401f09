"""`xlaserve bench decode`: how close compiled decode and prefill come to the device's roofline.

    xlaserve bench decode --model smollm2 --batch-sizes 1,8,32 --context-lengths 128,512 --compare hf
    xlaserve bench decode --preset llama3-8b --batch-sizes 1,8,32,64 --context-lengths 512,2048,8192

A real model (`--model`: alias, .gguf or HF directory) or a preset (`--preset`: random weights with a
real model's shapes) is built into one engine holding a decode program for every (batch, context)
and a prefill program per prompt length. Then, in order:

- copy bandwidth: the best of several passes of dst = src + 1 over large arrays, (bytes read +
  written) / time: what a memory-bound program can reach on this device, measured first;
- prefill: TTFT of one prompt of each length (its chunks through `Engine.prefill`, then the first
  token on the host) and its useful FLOP/s, 2 x matmul params x tokens + causal attention, against
  the datasheet peak;
- decode: the compiled decode program driven directly (`Engine.generate`, not the scheduler) with
  `batch` active slots whose sequences reach exactly `context` tokens at the last timed step.
  Reported: step time (median over rounds of `--steps` back-to-back dispatches), tok/s =
  batch / step time, and bytes/s = (weight bytes + KV bytes a step reads) / step time, as % of the
  measured copy bandwidth and of the datasheet. A step reads every weight once (an untied
  embedding table only at the batch's rows) and the K/V of `context` tokens per sequence (the XLA
  path attends densely over the KV bucket; the Pallas kernels stop at each sequence's length, so
  there the figure is an upper bound by at most `steps` tokens).

The KV cache keeps its initial zeros: a step's time does not depend on the values, while prefilling
batch x context tokens first would dominate a CPU run.

`--compare hf` runs HF transformers on the same GGUF (loaded as bench/compare_hf.py loads it; for a
preset, a LlamaForCausalLM of the same shapes with random weights, built on the device) with the
same prompt token ids and the same (batch, context) steps,
alternating with ours round by round (ours, HF, ours, HF, ...); medians are reported. HF's TTFT is a
forward over the prompt with logits_to_keep=1; its decode step is a forward of one token per
sequence over a KV cache holding context - steps tokens, then argmax. On CUDA HF gets its strongest
configuration (bf16, static cache, torch.compile mode="reduce-overhead"); elsewhere fp32 with its
default dynamic cache, as in compare_hf.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xlaserve.bench import report
from xlaserve.runtime.config import EngineConfig, ModelConfig, RopeConfig

# Datasheet figures, matched in order against the lower-cased jax device_kind (first match wins):
# memory bandwidth (bytes/s) and dense matmul peak (FLOP/s) by compute dtype.
DATASHEET = [
    ("h100 pcie", "NVIDIA H100 PCIe", 2.0e12, {"bfloat16": 756e12, "float32": 51e12}),
    ("h100", "NVIDIA H100 SXM", 3.35e12, {"bfloat16": 989e12, "float32": 67e12}),
    ("h200", "NVIDIA H200", 4.8e12, {"bfloat16": 989e12, "float32": 67e12}),
    ("a100-sxm4-40gb", "NVIDIA A100 40GB", 1.555e12, {"bfloat16": 312e12, "float32": 19.5e12}),
    ("a100", "NVIDIA A100 80GB", 2.0e12, {"bfloat16": 312e12, "float32": 19.5e12}),
    ("tpu v5 lite", "TPU v5e", 819e9, {"bfloat16": 197e12}),
    ("tpu v5e", "TPU v5e", 819e9, {"bfloat16": 197e12}),
    ("tpu v5", "TPU v5p", 2.76e12, {"bfloat16": 459e12}),
    ("tpu v4", "TPU v4", 1.2e12, {"bfloat16": 275e12}),
]

_LLAMA3_ROPE = RopeConfig(theta=500000.0, kind="llama3", factor=32.0, original_max_position=8192)
_SHAPE = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
)
PRESETS = {
    name: ModelConfig(**dict(zip(_SHAPE, shape, strict=True)), **rest, name=name)
    for name, shape, rest in [
        # name, (V, D, F, layers, heads, kv heads, head dim), the rest
        ("llama3-8b", (128256, 4096, 14336, 32, 32, 8, 128), dict(rope=RopeConfig(theta=500000.0),
            max_position_embeddings=8192)),
        ("llama3-1b", (128256, 2048, 8192, 16, 32, 8, 64), dict(rope=_LLAMA3_ROPE,
            max_position_embeddings=131072, tie_word_embeddings=True)),
        ("smollm2-135m", (49152, 576, 1536, 30, 9, 3, 64), dict(rope=RopeConfig(theta=100000.0),
            max_position_embeddings=8192, tie_word_embeddings=True)),
        ("tiny", (512, 64, 128, 2, 4, 2, 16), dict(max_position_embeddings=1024)),
    ]
}  # fmt: skip
QUANT_ALIASES = {"int8": "q8_0", "int4": "q4_0"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def datasheet(device_kind: str) -> dict | None:
    kind = device_kind.lower()
    for key, name, bandwidth, flops in DATASHEET:
        if key in kind:
            return {"name": name, "bandwidth_Bps": bandwidth, "flops": flops}
    return None


def copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """(bytes read + written) / s of dst = src + 1 over float32 arrays of `nbytes`, best of
    `repeats`. dst is donated, so the output reuses its buffer: a fresh output would be timed
    faulting in new pages on CPU (5x slower there)."""
    import jax
    import jax.numpy as jnp

    src = jnp.ones((nbytes // 4,), jnp.float32)
    dst = jnp.zeros_like(src)
    fn = jax.jit(lambda s, d: s + 1.0, donate_argnums=1, keep_unused=True)
    dst = fn(src, dst).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst = fn(src, dst).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def peak_memory(devices) -> tuple[int, str]:
    stats = [d.memory_stats() or {} for d in devices]
    if all("peak_bytes_in_use" in s for s in stats):
        return sum(s["peak_bytes_in_use"] for s in stats), "device.memory_stats() peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process RSS peak (getrusage ru_maxrss)"


def random_quantized(cfg: ModelConfig, kind: str, dtype, seed: int = 0):
    """Random weights with `cfg`'s shapes, every matrix a QuantArray of `kind` in GGUF's packed
    layout (random codes, scales ~ 1/sqrt(K)): the bytes and arithmetic of a quantized checkpoint
    (the values do not change the speed, so they are not quantized from float weights)."""
    import jax
    import jax.numpy as jnp

    from xlaserve.runtime.llama import is_info, param_info
    from xlaserve.runtime.quant import QuantArray

    leaves, treedef = jax.tree.flatten(param_info(cfg), is_leaf=is_info)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def init(info, key):
        if not info.matrix:
            return jnp.ones(info.shape, dtype)
        *lead, k = info.shape
        kd, ks = jax.random.split(key)
        data = jax.random.bits(kd, (*lead, k if kind == "q8_0" else k // 2), jnp.uint8)
        if kind == "q8_0":
            data = jax.lax.bitcast_convert_type(data, jnp.int8)
        # int8 as `xlaserve convert --quant int8` writes it (one float32 scale per output channel);
        # 4-bit in GGUF's float16-scaled groups of 32
        block, span = (k, 127.0) if kind == "q8_0" else (32, 8.0)
        scale = jax.random.uniform(ks, (*lead, k // block), jnp.float32, 0.5, 1.5) * (1.7 * k**-0.5 / span)
        scale = scale if kind == "q8_0" else scale.astype(jnp.float16)
        mins = -8.0 * scale if kind == "q4_1" else None
        return QuantArray(data=data, scale=scale, min=mins, kind=kind, block=block)

    return jax.tree.unflatten(treedef, [init(i, k) for i, k in zip(leaves, keys, strict=True)])


@dataclass
class Model:
    name: str
    cfg: ModelConfig
    weights: object
    quant: str
    path: Path | None = None
    tokenizer: object = None


def load(args, dtype: str) -> Model:
    import jax.numpy as jnp

    from xlaserve.runtime import llama

    quant = QUANT_ALIASES.get(args.quant, args.quant)
    if args.preset:
        cfg, quant = PRESETS[args.preset], quant or "none"
        if quant == "native":
            raise ValueError(
                "--quant native needs a checkpoint (--model); presets take none, q8_0, q4_0, q4_1"
            )
        if quant == "none":
            return Model(args.preset, cfg, llama.random_weights(cfg, args.seed, jnp.dtype(dtype)), quant)
        return Model(args.preset, cfg, random_quantized(cfg, quant, jnp.dtype(dtype), args.seed), quant)
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


def prefill_flops(cfg: ModelConfig, n: int) -> int:
    """Useful FLOPs of prefilling n tokens: the layers' matmuls, causal attention (q.k and p.v over
    each token's prefix) and the logits of the last token."""
    d, k = cfg.hidden_size, cfg.head_dim
    matmul = d * k * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * cfg.intermediate_size
    attention = 4 * cfg.num_heads * k * n * (n + 1) // 2
    return cfg.num_layers * (2 * matmul * n + attention) + 2 * cfg.vocab_size * d


def step_bytes(model: Model, weights, dtype: str, batch: int, context: int) -> tuple[int, int]:
    """(weight bytes, KV bytes) one decode step of `batch` sequences at `context` tokens reads."""
    import jax.numpy as jnp

    from xlaserve.runtime import llama

    cfg = model.cfg
    weight = llama.weight_bytes(weights)
    if weights.lm_head is not None:  # untied: the embedding table is read at the batch's rows only
        weight += weights.embed.nbytes * batch // cfg.vocab_size - weights.embed.nbytes
    kv = 2 * cfg.num_layers * batch * context * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
    return weight, kv


class Ours:
    """Drives one engine's compiled programs directly."""

    def __init__(self, engine):
        self.engine = engine
        e = engine.ecfg
        self.table = np.arange(e.max_slots * e.pages_per_seq, dtype=np.int32).reshape(e.max_slots, -1)

    def ttft(self, tokens: np.ndarray) -> float:
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
            packed = e.generate(self.table, context, batch)
        to_host(packed)
        return (time.perf_counter() - t0) / steps


def hf_random_llama(cfg: ModelConfig, dtype, device: str):
    """A transformers Llama with `cfg`'s shapes and random weights, built on `device` (an 8B model
    is never materialized on the host). Speed does not depend on the values."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope.theta,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype)


class HF:
    """HF transformers on the same GGUF file (or, for a preset, a LlamaForCausalLM with the same
    shapes and random weights); its strongest configuration on CUDA."""

    def __init__(self, path: Path | None, preset: ModelConfig | None = None):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        self.torch, self.cuda = torch, torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        dtype = torch.bfloat16 if self.cuda else torch.float32
        if preset is not None:
            model = hf_random_llama(preset, dtype, self.device)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.forward, self.static = self.model.forward, {}
        if self.cuda:
            self.forward = torch.compile(self.model.forward, mode="reduce-overhead", fullgraph=True)
        self.describe = {
            "name": f"HF transformers {transformers.__version__}",
            "config": "bf16, static cache, torch.compile(mode='reduce-overhead')"
            if self.cuda
            else "fp32, dynamic cache, eager",
            "torch": torch.__version__,
            "device": self.device,
            "threads": torch.get_num_threads(),
        }

    def _sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def ttft(self, tokens: np.ndarray) -> float:
        torch = self.torch
        ids = torch.tensor(tokens[None].astype(np.int64), device=self.device)
        with torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            out = self.model(input_ids=ids, logits_to_keep=1, use_cache=True)
            int(out.logits[0, -1].argmax())
            return time.perf_counter() - t0

    def _cache(self, batch: int, context: int, start: int):
        from transformers import DynamicCache, StaticCache

        cfg, torch = self.model.config, self.torch
        if self.cuda:  # one static cache per shape (CUDA graphs keep its addresses); zeros are fine
            cache = self.static.get((batch, context))
            if cache is None:
                return self.static.setdefault(
                    (batch, context), StaticCache(config=cfg, max_cache_len=context)
                )
            cache.reset()
            return cache
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        cache = DynamicCache()
        shape = (batch, cfg.num_key_value_heads, start, head_dim)
        for layer in range(cfg.num_hidden_layers):
            kv = torch.full(shape, 1e-3, dtype=self.model.dtype)  # written, so the pages are real
            cache.update(kv, kv.clone(), layer)
        return cache

    def decode(self, batch: int, context: int, steps: int) -> float:
        torch, start = self.torch, context - steps
        with torch.inference_mode():
            cache = self._cache(batch, context, start)
            ids = torch.ones((batch, 1), dtype=torch.long, device=self.device)
            self._sync()
            t0 = time.perf_counter()
            for i in range(steps):
                if self.cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                pos = torch.tensor([start + i], device=self.device)
                out = self.forward(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True)
                ids = out.logits[:, -1:].argmax(-1)
            self._sync()
            return (time.perf_counter() - t0) / steps


def ints(text: str) -> list[int]:
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="alias, .gguf file or HF directory (default: smollm2)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="random weights with this model's shapes")
    p.add_argument(
        "--quant",
        choices=["native", "none", "q8_0", "q4_0", "q4_1", *QUANT_ALIASES],
        help="checkpoints: native (as stored, default) or none (dequantized); presets: none (dense, "
        "default) or q8_0/int8, q4_0/int4, q4_1",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: f32 CPU, bf16 else")
    p.add_argument("--batch-sizes", type=ints, default=[1, 8, 32])
    p.add_argument("--context-lengths", type=ints, default=[128, 512], help="KV tokens per sequence")
    p.add_argument("--prompt-lengths", type=ints, help="prefill lengths (default: the context lengths)")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="longest prefill program (chunk)")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per round")
    p.add_argument("--warmup", type=int, default=4, help="untimed decode steps per configuration")
    p.add_argument("--repeats", type=int, default=3, help="rounds per configuration (median)")
    p.add_argument("--copy-mib", type=int, help="copy-bandwidth array size (default 1024; CPU 256)")
    p.add_argument("--compare", choices=["hf"], help="also run HF transformers, alternating with ours")
    p.add_argument("--mesh", help="tp=N: shard the model over N devices")
    p.add_argument("--attention-impl", choices=["auto", "pallas", "xla"], default="auto")
    p.add_argument("--matmul-impl", choices=["auto", "pallas", "xla"], default="auto")
    p.add_argument("--compile-cache", default="", help="JAX compilation cache ('' = off: true compile times)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(report.RESULTS), help="output directory (default: bench/results)")


def command_line(args) -> str:
    """The command with the options that differ from their defaults."""
    return report.command_line(
        "xlaserve bench decode", add_arguments, args, skip=("model",) if args.preset else ()
    )


def run(args) -> dict:
    import jax

    from xlaserve.runtime import llama
    from xlaserve.runtime.engine import Engine
    from xlaserve.sharding.mesh import device_groups, parse_mesh

    contexts, batches = args.context_lengths, args.batch_sizes
    prompts = args.prompt_lengths or contexts
    if any(c % 16 or c <= max(args.steps, args.warmup) for c in contexts):
        raise ValueError(f"context lengths must be multiples of 16 above --steps ({args.steps}) and --warmup")
    if args.compile_cache:
        from xlaserve.runtime.llm import enable_compile_cache

        enable_compile_cache(args.compile_cache)
    else:
        jax.config.update("jax_compilation_cache_dir", None)
    backend, device = jax.default_backend(), jax.devices()[0]
    load_start = os.getloadavg()[0]  # other work on the machine skews CPU figures: recorded
    spec = parse_mesh(args.mesh)
    if spec.dp > 1:
        raise ValueError("bench decode measures one model replica: give --mesh tp=N")
    mesh = device_groups(spec)[0] if spec.devices > 1 else None
    devices = list(mesh.devices.flat) if mesh is not None else [device]
    dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")

    copy_bytes = (args.copy_mib or (256 if backend == "cpu" else 1024)) << 20
    log(f"copy bandwidth over {copy_bytes >> 20} MiB ...")
    copy_bw = copy_bandwidth(copy_bytes) * len(devices)  # every device copies at the same rate
    sheet = datasheet(device.device_kind)
    log(f"loading {args.preset or args.model}")
    model = load(args, dtype)
    longest = -(-max(*contexts, *prompts) // 16) * 16  # whole pages
    ecfg = EngineConfig(
        max_slots=max(batches),
        slot_buckets=tuple(batches),
        kv_buckets=tuple(contexts),
        max_model_len=longest,
        attn_block=next(b for b in (256, 128, 64, 32, 16) if longest % b == 0),
        prefill_buckets=tuple(sorted({min(n, args.prefill_chunk) for n in prompts})),
        scoring=False,
        dtype=dtype,
        attention_impl=args.attention_impl,
        matmul_impl=args.matmul_impl,
    )
    engine = Engine(model.cfg, model.weights, ecfg, mesh=mesh, progress=log)
    model.weights = None  # the engine holds its own (device) copy
    ours = Ours(engine)
    tokens = {n: prompt_tokens(model, n, args.seed) for n in prompts}
    configs = [(b, c) for c in contexts for b in batches]
    log("warm-up")
    for n in prompts:
        ours.ttft(tokens[n])
    for b, c in configs:
        ours.decode(b, c, args.warmup)
    peak, peak_source = peak_memory(devices)  # before the reference shares the process
    ref = None
    if args.compare == "hf":
        log(
            "loading HF transformers on the same file"
            if not args.preset
            else "building HF Llama, same shapes"
        )
        ref = HF(model.path, model.cfg if args.preset else None)
        for n in prompts:
            ref.ttft(tokens[n])
        for b, c in configs:
            ref.decode(b, c, args.warmup)

    def alternate(fn_ours, fn_ref):
        a, r = [], []
        for _ in range(args.repeats):
            a.append(fn_ours())
            if ref is not None:
                r.append(fn_ref())
        return statistics.median(a), (statistics.median(r) if r else None), a

    peak_flops = (sheet or {}).get("flops", {}).get(dtype)
    prefill, decode, cmp_prefill, cmp_decode = [], [], [], []
    for n in prompts:
        t, t_ref, _ = alternate(lambda n=n: ours.ttft(tokens[n]), lambda n=n: ref.ttft(tokens[n]))
        flops = prefill_flops(model.cfg, n)
        pct_peak = 100 * flops / t / (peak_flops * len(devices)) if peak_flops else None
        prefill.append(dict(prompt_len=n, ttft_s=t, flops=flops, flops_per_s=flops / t, pct_peak=pct_peak))
        log(f"prefill {n:6d} tokens: TTFT {t * 1e3:8.1f} ms" + (f" (HF {t_ref * 1e3:.1f} ms)" if ref else ""))
        if ref is not None:
            cmp_prefill.append(dict(prompt_len=n, xlaserve_ttft_s=t, ref_ttft_s=t_ref, speedup=t_ref / t))
    for b, c in configs:
        t, t_ref, rounds = alternate(
            lambda b=b, c=c: ours.decode(b, c, args.steps), lambda b=b, c=c: ref.decode(b, c, args.steps)
        )
        w, kv = step_bytes(model, engine.weights, dtype, b, c)
        row = dict(batch=b, context=c, step_s=t, step_s_rounds=rounds, tok_s=b / t)
        row.update(weight_bytes_per_step=w, kv_bytes_per_step=kv, bytes_per_step=w + kv)
        row.update(bytes_per_s=(w + kv) / t, pct_copy_bw=100 * (w + kv) / t / copy_bw)
        row["pct_datasheet"] = 100 * (w + kv) / t / (sheet["bandwidth_Bps"] * len(devices)) if sheet else None
        decode.append(row)
        log(
            f"decode batch {b:4d} context {c:6d}: {t * 1e3:8.2f} ms/step {b / t:9.1f} tok/s "
            f"{row['pct_copy_bw']:5.1f}% of copy BW" + (f" (HF {b / t_ref:.1f} tok/s)" if ref else "")
        )
        if ref is not None:
            cmp_decode.append(
                dict(batch=b, context=c, xlaserve_step_s=t, ref_step_s=t_ref, xlaserve_tok_s=b / t)
                | dict(ref_tok_s=b / t_ref, speedup=t_ref / t)
            )

    notes = []
    if model.tokenizer is None:
        notes.append(f"preset {args.preset}: random weights with its shapes, quantization {model.quant}.")
    if sheet is None:
        notes.append(f"no datasheet figures for {device.device_kind}: % of datasheet and of peak are null.")
    if ref is not None and peak_source.startswith("process"):
        notes.append("peak memory was read before the reference was loaded into the same process.")
    result = {
        "kind": "decode",
        "device": device.device_kind,
        "backend": backend,
        "num_devices": len(devices),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        },
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command_line(args),
        "model": model.name,
        "preset": args.preset,
        "dtype": dtype,
        "quant": model.quant,
        "param_count": model.cfg.param_count(),
        "engine": {"attention": engine.ecfg.attention_impl, "matmul": engine.ecfg.matmul_impl},
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "copy_bandwidth_Bps": copy_bw,
        "datasheet": sheet,
        "compile_s": dict(engine.compile_seconds),
        "compile_cache": jax.config.jax_compilation_cache_dir,
        "prefill": prefill,
        "decode": decode,
        "weight_bytes": llama.weight_bytes(engine.weights),
        "kv_cache_bytes": 2 * engine.cache.k.nbytes,
        "peak_memory_bytes": peak,
        "peak_memory_source": peak_source,
        "compare": {"reference": ref.describe, "prefill": cmp_prefill, "decode": cmp_decode} if ref else None,
        "notes": notes,
    }
    path = report.result_path(args.out, f"decode-{report.slug(args.preset or Path(args.model).stem)}")
    images = {t: p.name for t, p in report.plot_names(path).items()}
    md = report.render(result, images)
    print(md)
    report.write(result, path, md)
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
