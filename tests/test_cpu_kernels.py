"""Our C++ quantized GEMV for XLA:CPU (cpu_kernels/): stored values used exactly (a one-hot row gives
back each dequantized weight), against a float64 numpy reference, batch-invariant, reading a layer
of a stack in place; and the engine's decode uses it.

These machines (x86-64 with AVX2, FMA and F16C, g++) must build and run it: a host that cannot is a
failure here, not a skip."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlaserve.cpu_kernels import build
from xlaserve.cpu_kernels.quant_gemv import AVX512_FLAGS, quant_gemv, supported
from xlaserve.runtime import quant, quant_layouts
from xlaserve.runtime.config import Kernels

LAYOUTS = [  # (quantize kind, block, packed in lane order): GGUF's types (checkpoints/ggml_types.py)
    ("q4_1", 32, True),
    ("q4_1", 32, False),
    ("q4_0", 32, True),
    ("q4_0", 32, False),
    ("q8_0", 32, False),
    ("q8_1", 32, False),  # q8_0 with a min (Q5_1, Q5_K)
    ("q8_0", 16, False),  # Q6_K's sub-blocks
    ("q8_0", 64, False),  # per-group int8 (convert --quant int8)
]


# The kernel's codes this host runs: AVX2 everywhere, AVX-512 where the CPU has it ("best" picks it).
HAS_AVX512 = build.cpu_flags() >= AVX512_FLAGS
ISAS = ["avx2", "avx512"] if HAS_AVX512 else ["avx2"]


def test_the_kernel_builds_and_runs_on_this_machine():
    assert build.unavailable() is None, build.unavailable()
    assert build.library().exists()


def _stack(kind, block, packed, layers=3, n=96, k=128, seed=0, scales=jnp.float32):
    """A layer stack in the kernel's layout, its scales and mins as `scales` (GGUF's float16 as
    stored, or float32 as the K-quants' and int8's)."""
    w = np.random.default_rng(seed).standard_normal((layers, n, k)).astype(np.float32)
    q = quant.quantize(w, kind, block)
    q = quant_layouts.to_lanes(q) if packed else quant_layouts.unpack(q)
    cast = lambda a: None if a is None else jnp.asarray(a, scales)
    return dataclasses.replace(q, data=jnp.asarray(q.data), scale=cast(q.scale), min=cast(q.min))


def _call(x, w, layer, isa=None):
    call = lambda x, w, i: quant_gemv(x, *w.arrays, i, **w.layout, packed=w.packed, lanes=w.lanes, isa=isa)
    return jax.jit(call)(x, w, layer)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("scales", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("kind,block,packed", LAYOUTS)
@pytest.mark.parametrize("rows", [16, 48])  # the GEMV rows; over MAX_ROWS, AVX-512's GEMM path
def test_each_weight_is_the_exact_dequantized_value(kind, block, packed, scales, isa, rows):
    # x = the identity: row k of y is column k of W, one product by 1.0 plus zeros: exact
    w = _stack(kind, block, packed, scales=scales)
    want = np.asarray(quant.dequantize(quant.map_quant(lambda a: a[2], w)))  # [N, K]
    k = want.shape[1]
    eye = jnp.eye(k, dtype=jnp.float32)
    got = np.concatenate([np.asarray(_call(eye[i : i + rows], w, 2, isa)) for i in range(0, k, rows)])
    np.testing.assert_array_equal(got, want.T)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind,block,packed", LAYOUTS)
@pytest.mark.parametrize(
    "rows,scales",
    [
        *[(1, jnp.float16), (2, jnp.float32), (3, jnp.float16), (5, jnp.float32), (16, jnp.float16)],
        *[(17, jnp.float32), (40, jnp.float16), (77, jnp.float32)],  # the GEMM path: blocks of 32 rows
    ],
)
def test_products_match_a_float64_reference(kind, block, packed, rows, scales, isa):
    w = _stack(kind, block, packed, scales=scales)
    x = np.random.default_rng(rows).standard_normal((rows, w.shape[-1])).astype(np.float32)
    for layer in (0, 2):
        dense = quant.dequantize(quant.LayerOf(w, jnp.asarray(layer)).sliced())
        ref = x.astype(np.float64) @ np.asarray(dense, np.float64).T
        got = np.asarray(_call(jnp.asarray(x), w, layer, isa))
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("packed", [True, False])
def test_a_rows_result_does_not_depend_on_the_batch_around_it(packed, isa):
    w = _stack("q4_1", 32, packed, n=301)  # odd: AVX-512's rows of W run in pairs, and one alone
    x = jnp.asarray(np.random.default_rng(1).standard_normal((11, w.shape[-1])), jnp.float32)
    whole = np.asarray(_call(x, w, 1, isa))
    for i in range(11):
        np.testing.assert_array_equal(np.asarray(_call(x[i : i + 1], w, 1, isa)), whole[i : i + 1])
    np.testing.assert_array_equal(np.asarray(_call(x[3:8], w, 1, isa)), whole[3:8])
    for n in (0, 299, 300):  # each row of W alone (no pair) gives the same sums
        alone = jax.tree.map(lambda a, n=n: a[:, n : n + 1], w)
        np.testing.assert_array_equal(np.asarray(_call(x, alone, 1, isa))[:, 0], whole[:, n])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("packed", [True, False])
def test_over_max_rows_a_rows_result_does_not_depend_on_the_batch_around_it(packed, isa):
    # 301 rows of W: tiles of 12 with a part-filled last one; 70 rows of x: two blocks of 32 and a
    # last of 6 (one vector), against the same rows in calls of 17 and 33 rows
    w = _stack("q4_1", 32, packed, n=301, k=256)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((70, w.shape[-1])), jnp.float32)
    whole = np.asarray(_call(x, w, 1, isa))
    for lo, hi in ((0, 17), (5, 38), (37, 70), (50, 70)):
        np.testing.assert_array_equal(np.asarray(_call(x[lo:hi], w, 1, isa)), whole[lo:hi])
    alone = jax.tree.map(lambda a: a[:, 299:301], w)
    np.testing.assert_array_equal(np.asarray(_call(x, alone, 1, isa)), whole[:, 299:301])


def test_best_is_avx512_where_the_cpu_has_it_and_avx512_elsewhere_is_refused_by_name():
    """ "best" is AVX-512 on a CPU with it (bit-identical results), AVX2 elsewhere; asking for
    AVX-512 on a CPU without it is an error that names it, never a silent fallback."""
    w = _stack("q4_1", 32, True, n=64)
    x = jnp.asarray(np.random.default_rng(7).standard_normal((3, w.shape[-1])), jnp.float32)
    best = np.asarray(_call(x, w, 0))
    if HAS_AVX512:
        np.testing.assert_array_equal(best, np.asarray(_call(x, w, 0, "avx512")))
        np.testing.assert_allclose(best, np.asarray(_call(x, w, 0, "avx2")), rtol=1e-6, atol=1e-5)
    else:
        np.testing.assert_array_equal(best, np.asarray(_call(x, w, 0, "avx2")))
        with pytest.raises(Exception, match="lacks AVX-512F/DQ"):
            _call(x, w, 0, "avx512")
    with pytest.raises(ValueError, match=r"isa \(or \$XLASERVE_CPU_ISA\) must be one of"):
        _call(x, w, 0, "sse")


def test_the_environment_picks_the_code_for_programs_traced_after_it(monkeypatch):
    w = _stack("q4_1", 32, True, n=64)
    x = jnp.asarray(np.random.default_rng(8).standard_normal((2, w.shape[-1])), jnp.float32)
    for isa in ISAS:
        monkeypatch.setenv("XLASERVE_CPU_ISA", isa)
        np.testing.assert_array_equal(np.asarray(_call(x, w, 1)), np.asarray(_call(x, w, 1, isa)))
    monkeypatch.setenv("XLASERVE_CPU_ISA", "avx")
    with pytest.raises(
        ValueError, match=r"XLASERVE_CPU_ISA\) must be one of \['avx2', 'avx512', 'best'\], not 'avx'"
    ):
        _call(x, w, 1)


@pytest.mark.parametrize("kind", ["q4_0", "q4_1"])
@pytest.mark.parametrize("on_device", [False, True])
def test_the_lane_order_keeps_every_value(kind, on_device):
    w = quant.quantize(np.random.default_rng(3).standard_normal((2, 8, 96)).astype(np.float32), kind, 32)
    if on_device:
        w = jax.tree.map(jnp.asarray, w)
    lanes = quant_layouts.for_backend(w, "cpu", "native")
    assert lanes.lanes and lanes.packed and lanes.data.shape == w.data.shape
    assert lanes.scale.dtype == np.float16  # as GGUF stores it
    np.testing.assert_array_equal(quant.dequantize(lanes), quant.dequantize(w))
    # XLA's path (prefill) reads the lane order too
    x = jnp.asarray(np.random.default_rng(4).standard_normal((40, 96)), jnp.float32)
    one = lambda q: quant.linear(x, quant.map_quant(lambda a: a[1], q), kernels=Kernels(matmul="xla"))
    ref = one(quant_layouts.unpack(w))
    np.testing.assert_allclose(one(lanes), ref, rtol=0, atol=1e-6 * float(jnp.abs(ref).max()))
    # on a mesh the XLA path runs: one value per byte
    assert not quant_layouts.for_backend(w, "cpu", "native", sharded=True).packed


def test_matrices_of_one_input_share_one_call_and_give_each_ones_result():
    """q, k, v (and gate, up) of a layer in one kernel call: each result bit-identical to its own
    call; a matrix of another layout gets a call of its own."""
    q4 = _stack("q4_1", 32, True, n=96, scales=jnp.float16)
    q4b = _stack("q4_1", 32, True, n=40, seed=1, scales=jnp.float32)  # scales' dtype may differ
    q8 = _stack("q8_0", 16, False, n=24, seed=2)
    layer = jnp.asarray(2)  # one layer's index, as the scan gives every matrix of a layer
    ws = [quant.LayerOf(m, layer) for m in (q4, q8, q4b)]
    native = Kernels(matmul="native")
    x = jnp.asarray(np.random.default_rng(5).standard_normal((3, 128)), jnp.float32)
    together = jax.jit(lambda x: quant.linears(x, ws, kernels=native))
    alone = [np.asarray(jax.jit(lambda x, w=w: quant.linear(x, w, kernels=native))(x)) for w in ws]
    for got, want in zip(together(x), alone, strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    hlo = together.lower(x).as_text()
    calls = [line for line in hlo.splitlines() if build.TARGET in line and "custom_call" in line]
    assert len(calls) == 2, calls  # the two Q4_1 stacks together, the int8 one alone
    # many rows: XLA's path, each matrix its own dot, the same values as linear's
    rows = jnp.asarray(np.random.default_rng(6).standard_normal((40, 128)), jnp.float32)
    for got, w in zip(quant.linears(rows, ws, kernels=native), ws, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(quant.linear(rows, w, kernels=native)))


def test_calls_back_to_back_and_from_many_threads_each_get_their_own_result():
    """The pool's helpers stay parked between calls and take the latest one posted (parallel.h):
    calls a few us apart in one program, and programs running at once on several threads, each
    give what the same call gives alone."""
    import concurrent.futures

    w = _stack("q4_1", 32, True, layers=4, n=2048, k=128)  # 4 tasks a call

    @jax.jit
    def chain(x):  # 16 dependent calls: each one's input is the last one's output
        for i in range(16):
            x = _call(x, w, i % 4)[:, :128] * 1e-2
        return x

    xs = [jnp.asarray(np.random.default_rng(s).standard_normal((2, 128)), jnp.float32) for s in range(6)]
    alone = [np.asarray(chain(x)) for x in xs]
    with concurrent.futures.ThreadPoolExecutor(len(xs)) as pool:
        for _ in range(5):
            for got, want in zip(pool.map(lambda x: np.asarray(chain(x)), xs), alone, strict=True):
                np.testing.assert_array_equal(got, want)


def test_layouts_it_does_not_take_are_refused_by_name():
    assert not supported("q8_0", 32, packed=True) and not supported("q4_1", 16, packed=True)
    assert not supported("q4_1", 32, packed=True, lanes=False)  # GGUF's order: XLA's path
    w = _stack("q4_1", 32, False)
    with pytest.raises(ValueError, match=r"x \(1, 64\), data .* do not match"):
        quant_gemv(jnp.zeros((1, 64)), *w.arrays, 0, **w.layout, packed=False)


def test_linear_routes_few_rows_to_the_kernel_and_many_to_it_only_with_avx512(monkeypatch):
    w = _stack("q4_1", 32, False)
    one = quant.LayerOf(w, jnp.asarray(1))
    native = Kernels(matmul="native")
    hlo = lambda rows: (
        jax.jit(lambda x: quant.linear(x, one, kernels=native))
        .lower(jnp.zeros((rows, w.shape[-1])))
        .as_text()
    )
    assert build.TARGET in hlo(4)
    # prefill and batches over MAX_ROWS: the kernel's GEMM path on AVX-512, else XLA's dot
    assert (build.TARGET in hlo(64)) == HAS_AVX512
    monkeypatch.setenv("XLASERVE_CPU_ISA", "avx2")
    assert build.TARGET in hlo(4) and build.TARGET not in hlo(64)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, w.shape[-1])), jnp.float32)
    got = quant.linear(x, one, kernels=native)
    ref = quant.linear(x, one.sliced(), kernels=Kernels(matmul="xla"))
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * float(jnp.abs(ref).max()))


def test_native_is_refused_where_it_cannot_run(monkeypatch):
    from xlaserve.runtime import impls

    with pytest.raises(ValueError, match="matmul_impl='native' native is a CPU kernel"):
        impls.resolve("auto", "native", on_cpu=False)
    with pytest.raises(ValueError, match="attention_impl='native' native is a CPU kernel"):
        impls.resolve("native", "auto", on_cpu=False)
    with pytest.raises(ValueError, match="attention_impl='flash' must be auto, pallas, xla or native"):
        impls.resolve("flash", "auto", on_cpu=True)
    assert impls.resolve("auto", "auto", on_cpu=True) == ("native", "native")
    assert impls.resolve("auto", "auto", on_cpu=False) == ("pallas", "pallas")
    monkeypatch.setattr(impls, "unavailable", lambda: "this CPU lacks avx2")
    with pytest.raises(ValueError, match="matmul_impl='native' cannot run here: this CPU lacks avx2"):
        impls.resolve("auto", "native", on_cpu=True)
    with pytest.raises(ValueError, match="attention_impl='native' cannot run here: this CPU lacks avx2"):
        impls.resolve("native", "xla", on_cpu=True)
    assert impls.resolve("auto", "auto", on_cpu=True) == ("xla", "xla")


def test_the_engines_decode_reads_every_layer_in_place(llm):
    """SmolLM2's decode program: the kernel for every layer matrix and the tied head, and no copy
    of a layer's weights out of the stack (the custom calls take the whole stack)."""
    engine = llm.engine
    assert engine.ecfg.matmul_impl == "native"
    text = next(iter(engine._decode.values())).as_text()
    calls = [line for line in text.splitlines() if build.TARGET in line and "custom-call(" in line]
    assert len(calls) == 4 + 1, calls  # (q, k, v), o, (gate, up), down in the layer loop; the head
    layers = llm.engine.cfg.num_layers
    in_loop = [c for c in calls if f"[{layers}," in c]  # operands: whole [L, N, K] stacks
    assert len(in_loop) == 4, calls
    assert sum(c.count(f"[{layers},") for c in in_loop) == 3 * 7  # data, scale, min of each matrix
