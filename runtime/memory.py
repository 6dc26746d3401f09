"""The memory plan: how weights, the KV page pool and activations share one device's memory.

Per device (a tp mesh splits the weights and, where the kv heads divide, the cache):

    budget      = device memory x memory_fraction
    weights     = the bytes of one device's weight shards (from the shapes and shardings)
    KV          = pages x bytes per page (K and V of page_size tokens, every layer)
    (a draft model for speculative decoding adds its weights, and its K/V to each page: its cache
    has as many pages, runtime/draft.py)
    activations = an estimate of the largest program's temporaries (`activation_bytes`)
    headroom    = budget - weights - KV - activations, which must be ≥ 0

The other (1 - memory_fraction) is left for what the plan does not model: the runtime's own
allocations, XLA's workspaces, fragmentation.

Sizing (`size`): a max_slots or num_pages the caller gave must fit, or ValueError names the numbers.
What the caller left out is chosen: max_slots = as many sequences of max_model_len as fit, at most
DEFAULT_SLOTS for the backend; the pool (num_pages None) holds every slot at max_model_len.

Device memory: EngineConfig.device_memory when given (planning another machine's run); else on
GPU/TPU the allocator's limit (`memory_stats()["bytes_limit"]`, of the smallest device); on CPU the
host's RAM, shared by the mesh's devices.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass

import jax
import numpy as np

from xlaserve.runtime.config import EngineConfig, ModelConfig
from xlaserve.runtime.quant import QuantArray

DEFAULT_FRACTION = 0.9
# max_slots when not given, at most (fewer when fewer sequences of max_model_len fit). On CPU an
# idle decode row costs nearly as much as a busy one, so few; an accelerator's decode step costs
# the weights' read whatever the batch, so many.
DEFAULT_SLOTS = {"cpu": 8, "gpu": 64, "tpu": 64}
GiB, MiB = 1 << 30, 1 << 20
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12}
_UNITS |= {"tb": 1e12, "kib": 1 << 10, "mib": MiB, "gib": GiB, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """'141GiB', '80GB', '1.5TiB', '17179869184' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and m.group(2).lower()
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(
            f"memory size {text!r} must be a positive number with a unit: B, KB, MB, GB, TB, KiB, "
            "MiB, GiB, TiB (e.g. 141GiB)"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


def device_memory(devices, backend: str) -> tuple[int, str]:
    """(bytes per device, where the figure comes from) for the devices one engine runs on (those of
    this process: on several hosts each plans for its own)."""
    local = [d for d in devices if d.process_index == jax.process_index()] or list(devices)
    if backend != "cpu":
        limits = [(d.memory_stats() or {}).get("bytes_limit") for d in local]
        if all(limits):
            return min(limits), f"{local[0].device_kind} bytes_limit"
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return ram // len(local), "host RAM" if len(local) == 1 else f"host RAM / {len(local)} devices"


def shard_bytes(tree) -> int:
    """Bytes one device holds of a pytree of arrays or ShapeDtypeStructs (the largest shard of each
    leaf; a leaf without a sharding is whole)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def _split(leaf) -> int:
    """How many ways a leaf is split over devices."""
    sharding = getattr(leaf, "sharding", None)
    return (
        1
        if sharding is None
        else math.prod(leaf.shape) // max(1, math.prod(sharding.shard_shape(leaf.shape)))
    )


def activation_bytes(cfg: ModelConfig, ecfg: EngineConfig, weights, tp: int, score_tokens: int) -> int:
    """An estimate (not a measurement) of the temporaries alive at once in the largest program, per
    device: the logits and sampling buffers of decode (and of speculative verify, K+1 positions a
    slot), the feed-forward and attention of the longest prefill chunk, the logits of a scoring
    call (`score_tokens` tokens), plus the dequantized copy of the largest quantized matrix where
    the XLA path dequantizes it. A batched prefill call (prefill_calls.py) holds no more tokens
    than the longest chunk and samples no more rows than decode, so these bound it too."""
    b = np.dtype(ecfg.dtype).itemsize
    v, d, f = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size
    hq, hkv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    hq_dev, hkv_dev = (hq // tp, hkv // tp) if hkv % tp == 0 else (hq, hkv)
    xla_attention = ecfg.attention_impl in ("xla", "native")  # native: a quantized cache takes XLA's

    def tokens(n: int, kv: int) -> int:
        """n query tokens against kv keys: hidden states (f32 copies), q/k/v, feed-forward, scores
        and, on the XLA path, the gathered K/V."""
        own = n * (4 * 4 * d + (hq + 2 * hkv) * dh * b + 3 * f * b // tp)
        scores = 2 * 4 * n * hq_dev * kv
        gathered = 2 * kv * hkv_dev * dh * b if xla_attention else 0
        return own + scores + gathered

    s, kv = ecfg.max_slots, ecfg.kv_buckets[-1]
    decode = s * (4 * 4 * v + 2 * v) + s * tokens(1, kv)  # logits, softmax, sort, log-probs; seen
    t = ecfg.prefill_buckets[-1]
    prefill = tokens(t, ecfg.attn_block_for(t)) + 4 * v
    score = score_tokens * (3 * 4 * v) + tokens(score_tokens, ecfg.attn_block) if score_tokens else 0
    k1 = max(ecfg.speculative_k, default=-1) + 1  # verify's positions per slot (0: no verify)
    verify = s * k1 * (8 * 4 * v) + s * tokens(k1, kv) if k1 else 0  # logits and accept's [S, K+1, V]
    dequant = 0
    if ecfg.matmul_impl in ("xla", "native"):  # native: prefill's many rows still take XLA's path
        for w in jax.tree.leaves(weights, is_leaf=lambda x: isinstance(x, QuantArray)):
            if isinstance(w, QuantArray):
                n, k = w.shape[-2:]
                dequant = max(dequant, n * k * (4 + b) // _split(w.data))
    return max(decode, prefill, score, verify) + dequant


@dataclass(frozen=True)
class MemoryPlan:
    """One device's share of an engine (bytes)."""

    device_bytes: int
    source: str  # where device_bytes comes from
    fraction: float
    devices: int  # devices of the mesh (each holds what is below)
    weights: int  # a draft model's included (`draft_weights`)
    page_bytes: int  # K and V (and their scales) of one page, every layer, on one device; a draft's too
    pages: int
    page_size: int  # tokens
    slots: int
    max_model_len: int
    activations: int
    # of weights and page_bytes: a draft model's, whose K/V cache has as many pages (runtime/draft.py)
    draft_weights: int = 0
    draft_page_bytes: int = 0

    @property
    def budget(self) -> int:
        return int(self.device_bytes * self.fraction)

    @property
    def kv(self) -> int:
        return self.pages * self.page_bytes

    @property
    def headroom(self) -> int:
        return self.budget - self.weights - self.kv - self.activations

    def describe(self) -> str:
        per = f"per device ({self.devices} devices)" if self.devices > 1 else "per device"
        return (
            f"memory plan {per}: {fmt(self.device_bytes)} ({self.source}) x {self.fraction:g} = "
            f"{fmt(self.budget)}: weights {fmt(self.weights)}, KV {fmt(self.kv)} ({self.pages} pages of "
            f"{self.page_size} tokens; {self.slots} slots, max_model_len {self.max_model_len}), "
            f"activations ~{fmt(self.activations)}, headroom {fmt(self.headroom)}"
            + (
                f"; weights and KV include a draft model's {fmt(self.draft_weights)} and "
                f"{fmt(self.pages * self.draft_page_bytes)}"
                if self.draft_weights
                else ""
            )
        )


def plan(
    cfg,
    ecfg: EngineConfig,
    weights,
    cache_page,
    device: tuple[int, str],
    tp: int,
    score_tokens: int,
    draft: tuple[int, int] = (0, 0),
):
    """The plan of a resolved config. `weights`: abstract weights with their shardings;
    `cache_page`: an abstract KVCache of one page (K, V [L, 1, P, H, D]) with its shardings; `draft`:
    (weight bytes, bytes a page) per device of a draft model with a cache of as many pages, or
    zeros. A draft's programs run between the target's, so its temporaries are not added (a draft
    is the smaller model: the target's are the larger)."""
    return MemoryPlan(
        device_bytes=device[0],
        source=device[1],
        fraction=ecfg.memory_fraction or DEFAULT_FRACTION,
        devices=tp,
        weights=shard_bytes(weights) + draft[0],
        page_bytes=shard_bytes(cache_page.per_token()) + draft[1],
        pages=ecfg.total_pages,
        page_size=ecfg.page_size,
        slots=ecfg.max_slots,
        max_model_len=ecfg.max_model_len,
        activations=activation_bytes(cfg, ecfg, weights, tp, score_tokens),
        draft_weights=draft[0],
        draft_page_bytes=draft[1],
    )


def size(cfg: ModelConfig, raw: EngineConfig, backend: str, make_plan) -> tuple[EngineConfig, MemoryPlan]:
    """`raw` resolved for `backend`, with max_slots (when left out) sized to what fits, and its plan;
    ValueError naming the numbers unless the plan fits. `make_plan(ecfg)`: the plan of a resolved
    config (`plan` with the engine's weights and cache)."""
    resolved = raw.resolve(cfg, backend)
    if raw.max_slots is None:
        most = max((DEFAULT_SLOTS.get(backend, 8), *(raw.slot_buckets or ())))
        trial = make_plan(dataclasses.replace(raw, max_slots=most).resolve(cfg, backend))
        fit = most
        if raw.num_pages is None:  # each slot brings a sequence of max_model_len's pages
            spare = trial.budget - trial.weights - trial.activations
            fit = max(0, spare) // (trial.page_bytes * resolved.pages_per_seq)
        slots = max(1, min(most, fit))  # none fits: one, refused below with the numbers
        buckets = tuple(b for b in raw.slot_buckets or () if b <= slots) or None
        resolved = dataclasses.replace(raw, max_slots=slots, slot_buckets=buckets).resolve(cfg, backend)
    final = make_plan(resolved)
    if final.headroom < 0:
        raise ValueError(refusal(final, raw, resolved.pages_per_seq))
    return resolved, final


def refusal(p: MemoryPlan, raw: EngineConfig, seq_pages: int) -> str:
    """Why a plan does not fit, with the numbers, and what would."""
    need = p.weights + p.kv + p.activations
    head = (
        f"the engine does not fit in memory: weights {fmt(p.weights)} + KV {fmt(p.kv)} ({p.pages} pages x "
        f"{fmt(p.page_bytes)}) + activations ~{fmt(p.activations)} = {fmt(need)} per device, more than "
        f"{fmt(p.budget)} ({fmt(p.device_bytes)} {p.source} x memory_fraction {p.fraction:g})"
    )
    spare = p.budget - p.weights - p.activations
    if spare < p.page_bytes * seq_pages:
        least = (p.weights + p.activations + p.page_bytes * seq_pages) / p.fraction
        return (
            f"{head}; not even one sequence of max_model_len={p.max_model_len} fits. Allowed: device "
            f"memory ≥ {fmt(least)} at this fraction, a smaller max_model_len, quantized weights, or a "
            f"tensor-parallel mesh (tp=N) to split the weights"
        )
    pages = spare // p.page_bytes
    given = f"num_pages={raw.num_pages}" if raw.num_pages is not None else f"max_slots={raw.max_slots}"
    return (
        f"{head}; {given} was asked for. Allowed: num_pages ≤ {pages}, or max_slots ≤ "
        f"{pages // seq_pages} (each slot with room for max_model_len={p.max_model_len} tokens), or a "
        f"smaller max_model_len, or a larger memory_fraction"
    )
