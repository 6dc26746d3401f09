"""The mixture-of-experts feed-forward the decoder runs in place of the dense one when the config
has experts (`ModelConfig.num_experts`): Qwen2-MoE, Qwen3-MoE, Mixtral.

Per token: router logits in float32, softmax, the top k by probability (`jax.lax.top_k`: ties go to
the lower expert index, as torch.topk resolves them), optionally renormalised to sum to 1; the
token's output is the weighted sum of its k experts' gated feed-forwards, plus (Qwen2-MoE) a shared
expert gated by sigmoid(x . w). Every token reaches every expert it picks: there is no capacity
factor and nothing is dropped, so the output is HF's.

Three ways to run the experts, equal up to summation order (tested against each other); `pick`
chooses one per step shape and backend:
- `grouped`: the k * N (token, expert) pairs sorted by expert and one grouped matmul per projection
  (`jax.lax.ragged_dot`, or our Pallas kernel): prefill on GPU/TPU;
- `gathered`: each pair's expert matrices gathered and multiplied as a batch, so a decode step
  reads only the experts its tokens route to (`routed_bytes`): every backend, fewer pairs than
  (local) experts;
- `dense`: every expert on every token, weighted by a [N, E] combine matrix: prefill on CPU, where
  ragged_dot is no grouped matmul (see `pick`), and the reference of the tests.

Observability: `block` also returns the (token, expert) pairs of real tokens per expert [E] int32;
the decoder stacks them per layer and the programs hand them to the engine (`routed_counts`).

Expert parallelism ("ep" mesh axis, the psum formulation): the experts are split over ep (E / ep on
each device, and their ffn axis over tp when it splits at whole quantization blocks); tokens and
routing are replicated, each device runs its own experts on the pairs routed to them and one psum
over (ep, tp) sums the contributions, the all-reduce a row-parallel dense feed-forward ends in.
The shard_map takes every expert matrix as it is placed, so no expert weight is ever gathered
across devices: where gate/up split their ffn axis over tp and down cannot (a quantization block
that does not divide F / tp), the activations h [M, F / tp] are all-gathered instead.

Dimension letters: N tokens, D hidden, E experts (El: on this device), F expert ffn, S shared
expert ffn, k experts per token, M = N * k (token, expert) pairs, L layers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from xlaserve.pallas_kernels import grouped_matmul as gmm
from xlaserve.pallas_kernels import tpu_grouped_matmul as tpu_gmm
from xlaserve.runtime.config import Kernels, ModelConfig
from xlaserve.runtime.models.params import declare_stacked
from xlaserve.runtime.quant import QuantArray, dequantize, map_quant

Matrix = jax.Array | QuantArray
HIGHEST = jax.lax.Precision.HIGHEST
# lhs [M, D] ragged along M, rhs [El, out, in]: contract lhs 1 with rhs 2, groups on rhs 0
_RAGGED = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((1,), (2,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0]
)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Experts:
    """One MoE feed-forward per layer, stacked over layers. The routers stay float (never
    quantized, as llama.cpp keeps them): routing is bit-for-bit the checkpoint's."""

    router: jax.Array  # [L, E, D]
    gate: Matrix  # [L, E, F, D]
    up: Matrix  # [L, E, F, D]
    down: Matrix  # [L, E, D, F]
    shared_gate: Matrix | None = None  # [L, S, D]
    shared_up: Matrix | None = None  # [L, S, D]
    shared_down: Matrix | None = None  # [L, D, S]
    shared_router: jax.Array | None = None  # [L, 1, D]: the shared expert's sigmoid gate


def declare(cfg: ModelConfig) -> Experts:
    n, d, e, f, s = (
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_experts,
        cfg.expert_size,
        cfg.shared_expert_intermediate_size,
    )
    mat = lambda *dims: declare_stacked(range(n), *dims, matrix=True)
    shared = s > 0
    return Experts(
        router=declare_stacked(range(n), (e, None), (d, "embed"), matrix=False),
        gate=mat((e, "experts"), (f, "ffw"), (d, "embed")),
        up=mat((e, "experts"), (f, "ffw"), (d, "embed")),
        down=mat((e, "experts"), (d, "embed"), (f, "ffw")),
        shared_gate=mat((s, "ffw"), (d, "embed")) if shared else None,
        shared_up=mat((s, "ffw"), (d, "embed")) if shared else None,
        shared_down=mat((d, "embed"), (s, "ffw")) if shared else None,
        shared_router=declare_stacked(range(n), (1, None), (d, "embed"), matrix=False) if shared else None,
    )


def route(x, router, cfg: ModelConfig):
    """x [N, D], router [E, D] -> (weights float32 [N, k], expert ids int32 [N, k]), as HF routes:
    float32 softmax over all experts, top k of the probabilities, renormalised if the config says."""
    logits = jnp.einsum("nd,ed->ne", x.astype(jnp.float32), router.astype(jnp.float32), precision=HIGHEST)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, ids = jax.lax.top_k(probs, cfg.num_experts_per_tok)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    return weights, ids.astype(jnp.int32)


def routed_counts(ids, valid, experts: int):
    """ids [N, k] int32, valid [N] bool -> int32 [E]: how many real tokens chose each expert
    (padding and idle slots are routed too, but not counted)."""
    ones = jnp.repeat(valid.astype(jnp.int32), ids.shape[1])  # pair j is token j // k
    return jnp.zeros((experts,), jnp.int32).at[ids.reshape(-1)].add(ones)


def _dense(w: Matrix, dtype):
    return dequantize(w, dtype) if isinstance(w, QuantArray) else w.astype(dtype)


def _local(ids, weights, e0: int | jax.Array, el: int):
    """Pairs flattened [M]: expert ids relative to this device's first expert `e0`, whether the
    expert is here, and the routing weight (0 for an expert elsewhere)."""
    rel = ids.reshape(-1) - e0
    here = (rel >= 0) & (rel < el)
    return rel, here, jnp.where(here, weights.reshape(-1), 0.0)


def ragged_dot(a, b: Matrix, sizes):
    """The XLA grouped matmul: a [M, in] sorted by expert, b [El, out, in], sizes [El] -> [M, out]
    float32 (zeros past sum(sizes)). Quantized experts are dequantized whole first."""
    return jax.lax.ragged_dot_general(
        a, _dense(b, a.dtype), sizes, _RAGGED, precision=HIGHEST, preferred_element_type=jnp.float32
    )


def grouped_matmul(kernels: Kernels):
    """The grouped matmul (`ragged_dot`'s arguments and result) that `kernels` pick: with
    matmul == "pallas" our Pallas kernel (Triton's, or Mosaic's on TPU) reads dense or packed
    experts as stored, dequantizing in its tiles; experts it does not take, unpacked (CPU layout)
    ones, and the "xla" matmul use ragged_dot."""
    if kernels.matmul != "pallas":
        return ragged_dot
    tpu = kernels.pallas_platform == "tpu"

    def mm(a, b: Matrix, sizes):
        if isinstance(b, QuantArray) and not b.packed:
            return ragged_dot(a, b, sizes)
        rhs, scale, mins = b.arrays if isinstance(b, QuantArray) else (b, None, None)
        layout = b.layout if isinstance(b, QuantArray) else {"kind": None, "block": None}
        _, n, k = b.shape
        why = (
            tpu_gmm.unsupported(n, k, **layout, has_mins=mins is not None, dtype=rhs.dtype)
            if tpu
            else gmm.unsupported(n, k, **layout, has_mins=mins is not None)
        )
        if why is not None:
            return ragged_dot(a, b, sizes)
        kernel = tpu_gmm.grouped_matmul if tpu else gmm.grouped_matmul
        return kernel(a, rhs, sizes, scale, mins, **layout, interpret=kernels.interpret)

    return mm


def _same(h):
    return h


def grouped(x, ids, weights, gate, up, down, *, e0=0, act=jax.nn.silu, mm=ragged_dot, to_down=_same):
    """Sorted by expert, one grouped matmul `mm` (`ragged_dot`, or `grouped_matmul`'s kernel) per
    projection. x [N, D], ids/weights [N, k], expert matrices of this device's El experts
    ([El, F, D], [El, F, D], [El, D, F]) -> [N, D] float32: the weighted sum over the pairs whose
    expert is here. `to_down` takes h [..., F of gate/up] to the F slice `down` holds (a mesh
    where they are split differently)."""
    n, k = ids.shape
    el, dtype = gate.shape[0], x.dtype
    rel, here, w = _local(ids, weights, e0, el)
    key = jnp.where(here, rel, el)  # pairs of other devices' experts sort last, into no group
    order = jnp.argsort(key, stable=True)  # [M]
    sizes = jnp.zeros((el + 1,), jnp.int32).at[key].add(1)[:el]  # pairs per local expert
    xs = jnp.take(x, order // k, axis=0)  # [M, D]
    h = act(mm(xs, gate, sizes).astype(dtype)) * mm(xs, up, sizes).astype(dtype)  # [M, F]
    y = mm(to_down(h), down, sizes)  # [M, D] float32; rows past sum(sizes) are zeros
    y = jnp.where(here[order][:, None], y * w[order][:, None], 0.0)
    back = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))  # inverse permutation
    return jnp.take(y, back, axis=0).reshape(n, k, -1).sum(1)


def gathered(x, ids, weights, gate, up, down, *, e0=0, act=jax.nn.silu, to_down=_same):
    """Each pair's expert matrices gathered ([M, F, D] ...): reads only the routed experts (decode).
    Same arguments and result as `grouped`."""
    n, k = ids.shape
    el, dtype = gate.shape[0], x.dtype
    rel, here, w = _local(ids, weights, e0, el)
    idx = jnp.clip(rel, 0, el - 1)
    take = lambda m: _dense(
        map_quant(lambda a: jnp.take(a, idx, axis=0), m)
        if isinstance(m, QuantArray)
        else jnp.take(m, idx, axis=0),
        dtype,
    )
    xs = jnp.repeat(x, k, axis=0)  # [M, D], pair j is token j // k
    mm = lambda a, b, spec: jnp.einsum(spec, a, b, precision=HIGHEST, preferred_element_type=jnp.float32)
    h = act(mm(xs, take(gate), "md,mfd->mf").astype(dtype)) * mm(xs, take(up), "md,mfd->mf").astype(dtype)
    y = mm(to_down(h), take(down), "mf,mdf->md")
    y = jnp.where(here[:, None], y * w[:, None], 0.0)
    return y.reshape(n, k, -1).sum(1)


def dense(x, ids, weights, gate, up, down, *, e0=0, act=jax.nn.silu, to_down=_same):
    """Every expert on every token, combined by the routing weights (intermediates [N, El, F]):
    CPU prefill, and the reference of the tests. Same arguments and result as `grouped`."""
    el, dtype = gate.shape[0], x.dtype
    rel, _, w = _local(ids, weights, e0, el)
    combine = jnp.zeros((x.shape[0] * ids.shape[1], el), jnp.float32)
    combine = combine.at[jnp.arange(rel.shape[0]), jnp.clip(rel, 0, el - 1)].add(w)
    combine = combine.reshape(*ids.shape, el).sum(1)  # [N, El]
    mm = lambda spec, a, b: jnp.einsum(spec, a, _dense(b, dtype), precision=HIGHEST)
    h = act(mm("nd,efd->nef", x, gate)) * mm("nd,efd->nef", x, up)
    y = mm("nef,edf->ned", to_down(h), down).astype(jnp.float32)
    return jnp.einsum("ned,ne->nd", y, combine, precision=HIGHEST)


IMPLS = {"grouped": grouped, "gathered": gathered, "dense": dense}


def pick(pairs: int, experts: int, backend: str) -> str:
    """The expert path for a step of `pairs` (token, expert) pairs over `experts` experts (those on
    one device under ep) compiled for `backend`. Fewer pairs than experts: `gathered`, which reads
    at most `pairs` experts' weights (decode). Else `grouped` on GPU/TPU, where ragged_dot is a
    grouped matmul (or our Pallas kernel runs), and `dense` on CPU: there XLA lowers ragged_dot to
    a masked dense dot over every group (jax's `_ragged_dot_general_impl`: [E, M, D] operands), k
    times dense's flops and memory. Measured on CPU (`python -m xlaserve.bench.moe`, E=128, k=8,
    D=512, F=192; bench/results/cpu-moe-2026-12-03.json): gathered 38 ms vs dense 63 at 64 pairs,
    73 vs 68 at 128, 142 vs 80 at 256; dense beats grouped 1.7-3.5x at every size from 8 to 512
    pairs (130 vs 456 ms at 512)."""
    if pairs < experts:
        return "gathered"
    return "dense" if backend == "cpu" else "grouped"


def routed_bytes(cfg: ModelConfig, tokens: int, bytes_per_weight: float) -> tuple[float, float]:
    """(expert weight bytes one decode step of `tokens` tokens reads at most on the gathered path,
    what a dense pass over every expert reads), for all layers."""
    per_expert = 3 * cfg.hidden_size * cfg.expert_size * bytes_per_weight * cfg.num_layers
    read = min(tokens * cfg.num_experts_per_tok, cfg.num_experts)
    return read * per_expert, cfg.num_experts * per_expert


def _ep_specs(kernels: Kernels):
    """On a mesh: (the experts' mesh axis, the mesh axis gate/up split their ffn (output) axis over,
    the one down splits its ffn (input) axis over); None where not split. Down's may be None where
    gate/up's is not: its input axis splits only at whole quantization blocks."""
    ep = "ep" if kernels.mesh.shape.get("ep", 1) > 1 else None
    gate, up = kernels.spec("layers.moe.gate")[0], kernels.spec("layers.moe.up")[0]
    if gate != up:  # equal shapes, and an output axis is never cut at quantization blocks
        raise ValueError(f"the experts' gate and up split their ffn axis differently: {gate} vs {up}")
    return ep, gate, kernels.spec("layers.moe.down")[1]


def _reshard_f(h, *, have: str | None, want: str | None):
    """Inside the shard_map: h [..., F / |have|], the ffn slice gate/up computed, -> the slice of F
    down holds, [..., F / |want|]: the activations all-gathered over `have`, then cut along `want`."""
    if have == want:
        return h
    if have is not None:
        h = jax.lax.all_gather(h, have, axis=h.ndim - 1, tiled=True)
    if want is not None:
        part = h.shape[-1] // jax.lax.axis_size(want)
        h = jax.lax.dynamic_slice_in_dim(h, jax.lax.axis_index(want) * part, part, axis=h.ndim - 1)
    return h


def block(x, w: Experts, *, cfg: ModelConfig, kernels: Kernels, act, mm, valid=None, impl: str | None = None):
    """The MoE feed-forward of one layer: x [B, T, D] -> ([B, T, D] (x's dtype), the real tokens
    routed to each expert int32 [E]). valid [B, T] bool marks the real tokens (None: all). `mm` is
    the decoder's matmul by weight name (for the shared expert); `impl` forces one of `IMPLS`."""
    b, t, d = x.shape
    xf = x.reshape(-1, d)
    weights, ids = route(xf, w.router, cfg)
    valid = jnp.ones((b * t,), bool) if valid is None else valid.reshape(-1)
    counts = routed_counts(ids, valid, cfg.num_experts)
    experts = w.gate, w.up, w.down
    mesh = kernels.mesh
    ep, f_in, f_out = _ep_specs(kernels) if mesh is not None else (None, None, None)
    el = cfg.num_experts // (mesh.shape["ep"] if ep else 1)  # experts on one device
    # the Pallas grouped matmul is a grouped matmul wherever it runs (interpreted on CPU in tests)
    backend = kernels.pallas_platform if kernels.matmul == "pallas" else kernels.target
    name = impl or pick(xf.shape[0] * cfg.num_experts_per_tok, el, backend)
    run = functools.partial(IMPLS[name], act=act)
    if name == "grouped":  # Pallas kernels run per device: under the shard_map below on a mesh
        run = functools.partial(run, mm=grouped_matmul(kernels))
    if mesh is None:
        y = run(xf, ids, weights, *experts)
    else:
        from jax.sharding import PartitionSpec as P

        summed = tuple(a for a in (ep, f_out) if a is not None)  # down's partial sums

        def local(xf, ids, weights, gate, up, down):
            e0 = jax.lax.axis_index("ep") * el if ep else 0
            y = run(
                xf,
                ids,
                weights,
                gate,
                up,
                down,
                e0=e0,
                to_down=functools.partial(_reshard_f, have=f_in, want=f_out),
            )
            return jax.lax.psum(y, summed) if summed else y

        # the experts as placed (runtime/placement.py), so XLA moves none of them between devices
        spec = lambda m, s: map_quant(lambda _: s, m) if isinstance(m, QuantArray) else s
        in_specs = (P(), P(), P(), spec(w.gate, P(ep, f_in, None)), spec(w.up, P(ep, f_in, None)))
        in_specs += (spec(w.down, P(ep, None, f_out)),)
        y = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=P(), check_vma=False)(
            xf, ids, weights, *experts
        )
    y = y.astype(x.dtype)
    if w.shared_router is not None:
        s = mm(
            act(mm(xf, w.shared_gate, "moe.shared_gate")) * mm(xf, w.shared_up, "moe.shared_up"),
            w.shared_down,
            "moe.shared_down",
        )
        gate = jax.nn.sigmoid(
            jnp.einsum("nd,od->no", xf, w.shared_router.astype(xf.dtype), precision=HIGHEST)
        )
        y = y + gate * s
    return y.reshape(b, t, d), counts
