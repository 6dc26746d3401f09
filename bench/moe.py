"""Mixture-of-experts benchmark on 8 simulated CPU devices, one run, one JSON in bench/results/:

    python -m xlaserve.bench.moe [--out DIR] [--repeats N] [--smoke]

(`--smoke`: a tiny layer and one timed call per figure, to check that it runs; tests do.)

1. Expert parallelism: one MoE layer at ep=8 and at ep=4,tp=2, for a decode-sized (8 tokens) and a
   prefill-sized (512 tokens) batch, with
   (a) the psum formulation the runtime uses (runtime/models/moe.py): tokens replicated, each
       device runs its experts on the pairs routed to them, one all-reduce of [N, D] over (ep, tp);
       also as the runtime ran it before (`psum_before`: its expert path picked against all E
       experts, grouped at prefill even on CPU);
   (b) an all-to-all dispatch/combine: each ep rank routes its N/ep tokens, sends every (token,
       expert) pair to the rank holding the expert (`jax.lax.all_to_all`, a dropless buffer of all
       its N/ep * k pairs per destination, since equal splits are all it takes), the experts run,
       the results come back the same way, and an all-gather makes the output replicated again
       (the next layer's attention wants it so); at tp=2 the expert partial sums are psum'd over tp.
   Both are checked against the single-device reference. Besides CPU times (8 "devices" sharing
   2 cores: they say little), the bytes each device sends per layer are computed from the shapes
   (bfloat16 activations), which is what decides on a real interconnect; also for
   `ragged_all_to_all` (pairs only, no padding), which XLA:CPU does not implement in jax 0.10.2
   ("HLO opcode ragged-all-to-all is not supported by XLA:CPU ThunkEmitter"), so it is not timed.

   Choice: the psum formulation stays. With the activations replicated by tensor-parallel
   attention it exchanges nothing before the experts and 2 (G-1)/G N D values after them per
   device, G = ep * tp. An all-to-all sends each of a rank's N/ep tokens to its k experts' ranks
   and back, then all-gathers the outputs: ragged (pairs only) that is 2 (ep-1)/ep (N/ep) k D +
   (ep-1)/ep N D at tp=1 (`exchange_bytes`), less than the all-reduce only when k < ep/2: more for
   Qwen3-MoE (k=8: 2.6 vs 1.75 N D at ep=8), less for Mixtral (k=2 at ep=8: 1.3 vs 1.75 N D). The
   only all-to-all XLA:CPU runs, equal splits, must pad every destination to all of a rank's pairs
   (dropless), which sends ep times that: 8.5-12x the all-reduce's bytes here. So (b) is kept in this
   benchmark only: ragged_all_to_all is the candidate for small-k models on GPU/TPU, untested
   here, and all-to-all pays off most where tokens are already sharded over the ep ranks
   (data-parallel attention, which the runtime does not have).

   Each device picks its expert path (`moe.pick`) against its own experts, E / ep: at decode
   (8 tokens, 64 pairs) and ep=8 that is 16 experts, so it runs `dense` over its 16 experts (reads
   16 experts' slices) instead of `gathered` over all 64 pairs (copying 64 slices, those of other
   devices' experts clipped to a local one and masked), which made psum's decode 2-4x slower than
   the all-to-all's in the first 2026-12-03 run (`psum_before` repeats that run's choice;
   that run is kept as cpu-moe-2026-12-03-before.json). In the second run (2 shared cores, load
   average 6-8): psum's decode 143 ms against psum_before's 743 ms at ep=8, 64 vs 340 at
   ep=4,tp=2 (the all-to-all: 104 and 187); prefill 0.69 s vs 3.9 s and 2.3 s vs 8.1 s, the
   all-to-all 4.4 s and 6.7 s.

2. The expert paths on one device, at the shapes of Qwen3-30B-A3B's MoE (128 experts, top 8) scaled
   to hidden 512, expert ffn 192 so that a layer fits a CPU: `grouped` (sorted ragged_dot),
   `gathered` (each pair's experts gathered) and `dense` (every expert on every token), for 1 to 64
   tokens (8 to 512 pairs: across the 128 experts where `moe.pick` switches), with the expert bytes
   a step reads on the gathered path against a pass over all experts (`moe.routed_bytes`), also for
   the full-size preset in bf16. `picked` marks what `moe.pick` runs on this backend.

Dimension letters as in moe.py: N tokens, D hidden, E experts, F expert ffn, k experts per token.
"""

from __future__ import annotations

import os

DEVICES = 8
_FLAG = f"--xla_force_host_platform_device_count={DEVICES}"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):  # before JAX starts its CPU backend
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from xlaserve.bench import report  # noqa: E402
from xlaserve.bench.kernels import timed  # noqa: E402
from xlaserve.runtime.config import ModelConfig  # noqa: E402
from xlaserve.runtime.models import moe  # noqa: E402
from xlaserve.runtime.models.presets import PRESETS  # noqa: E402

PRESET = "qwen3-30b-a3b"
# the preset's MoE (E=128, k=8, renormalised) with hidden and expert ffn scaled down
CFG = ModelConfig(
    1024, 512, 192, 1, 8, 4, 64, architecture="qwen3_moe", num_experts=128, num_experts_per_tok=8,
    moe_intermediate_size=192, norm_topk_prob=True,
)  # fmt: skip
# --smoke: the same layer shrunk (E=8, k=2), tokens divisible by ep=8 for the all-to-all
SMOKE = ModelConfig(
    64, 32, 16, 1, 2, 2, 16, architecture="qwen3_moe", num_experts=8, num_experts_per_tok=2,
    moe_intermediate_size=16, norm_topk_prob=True,
)  # fmt: skip
MESHES = {"ep=8": (8, 1), "ep=4,tp=2": (4, 2)}
BATCHES = {"decode": 8, "prefill": 512}
SMOKE_BATCHES = {"decode": 8, "prefill": 16}
TOKENS = (1, 4, 8, 16, 32, 64)  # the expert paths, one device
SMOKE_TOKENS = (1, 4)
ACT_BYTES = 2  # bfloat16 activations on an accelerator


def layer(rng, cfg: ModelConfig = CFG):
    """Random router [E, D] and experts ([E, F, D], [E, F, D], [E, D, F]), float32."""
    e, f, d = cfg.num_experts, cfg.expert_size, cfg.hidden_size
    shapes = ((e, d), (e, f, d), (e, f, d), (e, d, f))
    return [jnp.asarray(rng.normal(size=s).astype(np.float32) * s[-1] ** -0.5) for s in shapes]


def psum_layer(mesh: Mesh, cfg: ModelConfig = CFG, before: bool = False):
    """(a): the runtime's formulation. x [N, D] replicated -> [N, D] replicated. `before`: the
    expert path picked as the runtime picked it before 2026-12-03's change, against all E experts
    instead of the device's E / ep and as if every backend had a grouped matmul (`gathered` over
    every pair at decode, `grouped` at prefill)."""
    el = cfg.num_experts // mesh.shape["ep"]

    def local(x, router, gate, up, down):
        weights, ids = moe.route(x, router, cfg)
        path = (
            moe.pick(ids.size, cfg.num_experts, "gpu")
            if before
            else moe.pick(ids.size, el, jax.default_backend())
        )
        impl = moe.IMPLS[path]  # as runtime/models/moe.py
        y = impl(x, ids, weights, gate, up, down, e0=jax.lax.axis_index("ep") * el)
        return jax.lax.psum(y, ("ep", "tp"))

    specs = (P(), P(), P("ep", "tp", None), P("ep", "tp", None), P("ep", None, "tp"))
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False))


def a2a_layer(mesh: Mesh, cfg: ModelConfig = CFG):
    """(b): all-to-all dispatch and combine, dropless. x [N, D] replicated (N divisible by ep) ->
    [N, D] replicated."""
    ep, tp = mesh.shape["ep"], mesh.shape["tp"]
    el, k = cfg.num_experts // ep, cfg.num_experts_per_tok

    def local(x, router, gate, up, down):
        nl = x.shape[0] // ep
        xl = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index("ep") * nl, nl)  # this rank's tokens
        weights, ids = moe.route(xl, router, cfg)  # [nl, k]
        m = nl * k
        dest = ids.reshape(-1) // el  # [m]: the rank holding each pair's expert
        onehot = jax.nn.one_hot(dest, ep, dtype=jnp.int32)
        rank = (jnp.cumsum(onehot, 0) * onehot).sum(1) - 1  # the pair's row in its destination buffer
        send = jnp.zeros((ep, m, xl.shape[1]), xl.dtype).at[dest, rank].set(jnp.repeat(xl, k, axis=0))
        expert = jnp.full((ep, m), -1, jnp.int32).at[dest, rank].set(ids.reshape(-1) % el)  # -1: empty
        recv = jax.lax.all_to_all(send, "ep", 0, 0)  # [ep, m, D]: row block j from rank j
        got = jax.lax.all_to_all(expert, "ep", 0, 0).reshape(-1, 1)
        ones = jnp.ones(got.shape, jnp.float32)
        y = moe.grouped(recv.reshape(-1, xl.shape[1]), got, ones, gate, up, down)  # [ep * m, D]
        if tp > 1:  # each tp rank holds F / tp of every local expert: partial sums
            y = jax.lax.psum(y, "tp")
        back = jax.lax.all_to_all(y.reshape(ep, m, -1), "ep", 0, 0)  # each pair's result, home again
        pairs = back[dest, rank] * weights.reshape(-1, 1)  # [m, D]
        out = pairs.reshape(nl, k, -1).sum(1)
        return jax.lax.all_gather(out, "ep", tiled=True)  # [N, D]

    specs = (P(), P(), P("ep", "tp", None), P("ep", "tp", None), P("ep", None, "tp"))
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False))


FORMULATIONS = {
    "psum": psum_layer,
    "psum_before": lambda mesh, cfg: psum_layer(mesh, cfg, before=True),
    "all_to_all": a2a_layer,
}


def exchange_bytes(n: int, ep: int, tp: int, cfg: ModelConfig = CFG, b: int = ACT_BYTES) -> dict:
    """Bytes one device sends per MoE layer (ring collectives: an all-reduce of S bytes over G
    devices sends 2 (G-1)/G S, an all-gather of S (G-1)/G S, an all-to-all of S (ep-1)/ep S)."""
    d, k, g = cfg.hidden_size, cfg.num_experts_per_tok, ep * tp
    m = n // ep * k  # pairs an ep rank routes
    gather = (ep - 1) / ep * n * d * b
    padded = ep * m  # rows of the dropless buffers, per direction
    return {
        "psum": 2 * (g - 1) / g * n * d * b,
        "psum_before": 2 * (g - 1) / g * n * d * b,
        "all_to_all": 2 * (ep - 1) / ep * padded * d * b + 2 * (tp - 1) / tp * padded * d * b + gather,
        "ragged_all_to_all": 2 * (ep - 1) / ep * m * d * b + 2 * (tp - 1) / tp * m * d * b + gather,
    }


def expert_parallel(rng, repeats: int, cfg: ModelConfig = CFG, batches=BATCHES) -> list[dict]:
    router, *experts = layer(rng, cfg)
    reference = jax.jit(
        lambda x: moe.dense(x, *moe.route(x, router, cfg)[::-1], *experts)
    )  # route returns (weights, ids); the paths take (ids, weights)
    rows = []
    for mesh_name, (ep, tp) in MESHES.items():
        mesh = Mesh(np.array(jax.devices()[: ep * tp]).reshape(ep, tp), ("ep", "tp"))
        for batch, n in batches.items():
            x = jnp.asarray(rng.normal(size=(n, cfg.hidden_size)).astype(np.float32))
            want = np.asarray(reference(x))
            sent = exchange_bytes(n, ep, tp, cfg)
            for name, make in FORMULATIONS.items():
                fn = make(mesh, cfg)
                err = float(np.abs(np.asarray(fn(x, router, *experts)) - want).max())
                seconds = timed(fn, x, router, *experts, repeats=repeats)
                rows.append(
                    dict(mesh=mesh_name, batch=batch, tokens=n, formulation=name, seconds=seconds,
                         max_abs_err=err, bytes_sent_per_device=sent[name])
                )  # fmt: skip
                print(rows[-1], flush=True)
            rows.append(
                dict(mesh=mesh_name, batch=batch, tokens=n, formulation="ragged_all_to_all",
                     seconds=None, max_abs_err=None, bytes_sent_per_device=sent["ragged_all_to_all"],
                     note="not implemented by XLA:CPU (jax 0.10.2): bytes from the shapes only")
            )  # fmt: skip
    return rows


def expert_paths(rng, repeats: int, cfg: ModelConfig = CFG, tokens=TOKENS) -> list[dict]:
    router, *experts = layer(rng, cfg)
    full = PRESETS[PRESET]
    rows = []
    for n in tokens:
        x = jnp.asarray(rng.normal(size=(n, cfg.hidden_size)).astype(np.float32))
        weights, ids = moe.route(x, router, cfg)
        read, dense = moe.routed_bytes(cfg, n, 4)
        full_read, full_dense = moe.routed_bytes(full, n, 2)
        per_expert = dense / cfg.num_experts
        touched = len(np.unique(np.asarray(ids)))
        want = np.asarray(moe.dense(x, ids, weights, *experts))
        pick = moe.pick(n * cfg.num_experts_per_tok, cfg.num_experts, jax.default_backend())
        for name, impl in moe.IMPLS.items():
            fn = jax.jit(impl)
            err = float(np.abs(np.asarray(fn(x, ids, weights, *experts)) - want).max())
            picked = pick == name
            # gathered reads the experts its pairs route to (at most `read`); the others read all
            rows.append(
                dict(tokens=n, path=name, picked=picked, max_abs_err=err, experts_touched=touched,
                     seconds=timed(fn, x, ids, weights, *experts, repeats=repeats),
                     bytes_read=touched * per_expert if name == "gathered" else dense,
                     bytes_read_bound=read, bytes_dense=dense,
                     preset_bytes_read_bound=full_read, preset_bytes_dense=full_dense)
            )  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def render(result: dict) -> str:
    c = result["config"]
    mb = lambda x: "-" if x is None else f"{x / 1e6:.3f}"
    maybe = lambda x, f: "-" if x is None else f(x)
    ep_rows = [
        [r["mesh"], r["batch"], r["tokens"], r["formulation"], maybe(r["seconds"], report.ms),
         mb(r["bytes_sent_per_device"]), maybe(r["max_abs_err"], report.fmt)]
        for r in result["expert_parallel"]
    ]  # fmt: skip
    path_rows = [
        [r["tokens"], r["path"] + (" (picked)" if r["picked"] else ""), report.ms(r["seconds"]),
         r["experts_touched"], mb(r["bytes_read"]), mb(r["bytes_dense"]),
         f'{mb(r["preset_bytes_read_bound"])} / {mb(r["preset_bytes_dense"])}']
        for r in result["expert_paths"]
    ]  # fmt: skip
    return "\n\n".join(
        [
            f"# MoE benchmark ({result['device']['kind']}, {DEVICES} simulated devices)",
            f"`{result['command']}`; layer: E={c['experts']}, k={c['top_k']}, D={c['hidden']}, "
            f"F={c['expert_ffn']}, float32 (bytes sent: bfloat16 activations)",
            "## Expert parallelism: psum vs all-to-all",
            report.table(["mesh", "batch", "N", "formulation", "time", "MB sent/device", "max err"], ep_rows),
            "## Expert paths, one device (bytes: expert weights read per layer and step)",
            report.table(
                ["N", "path", "time", "experts", "MB read", "MB dense", f"{PRESET} bf16 MB (bound/dense)"],
                path_rows,
            ),
        ]
    )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="output folder or .json file (default: bench/results)")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed calls per measurement (median; 5, smoke 1)"
    )
    p.add_argument("--smoke", action="store_true", help="a tiny layer, one call per figure: does it run")
    args = p.parse_args(argv)
    if jax.device_count() < DEVICES:
        raise SystemExit(
            f"need {DEVICES} devices, have {jax.device_count()}: start JAX with XLA_FLAGS={_FLAG}"
        )
    cfg = SMOKE if args.smoke else CFG
    repeats = args.repeats or (1 if args.smoke else 5)
    rng = np.random.default_rng(0)
    flags = (" --smoke" if args.smoke else "") + (f" --repeats {args.repeats}" if args.repeats else "")
    result = {
        "kind": "moe",
        "command": "python -m xlaserve.bench.moe" + flags,
        "device": report.device_info(),
        "jax": jax.__version__,
        "smoke": args.smoke,
        "config": {"preset": PRESET, "hidden": cfg.hidden_size, "expert_ffn": cfg.expert_size,
                   "experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok},
        "expert_parallel": expert_parallel(
            rng, repeats, cfg, SMOKE_BATCHES if args.smoke else BATCHES
        ),
        "expert_paths": expert_paths(rng, repeats, cfg, SMOKE_TOKENS if args.smoke else TOKENS),
    }  # fmt: skip
    report.write(result, report.result_path(args.out, "moe-smoke" if args.smoke else "moe"), render(result))
    return result


if __name__ == "__main__":
    main()
