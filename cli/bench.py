"""`xlaserve bench serve|decode|kv-cache`: the benchmarks of xlaserve.bench behind the command line
(a load test of a server over gRPC or HTTP; the decode/prefill roofline of a compiled engine)."""

from __future__ import annotations


def register(sub, load: bool = True) -> None:
    """Adds `bench` and its benchmarks' flags. With load=False (another command was given) only the
    `bench` entry is listed, so xlaserve.bench (which imports JAX) is not imported."""
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    if not load:
        return
    from xlaserve.bench import decode, kv_cache, serve

    p = bench.add_parser(
        "serve", help="load-test a server over gRPC or HTTP (TTFT, ITL, e2e percentiles, tok/s)"
    )
    serve.add_arguments(p)
    p.set_defaults(func=lambda a: serve.run(a) and 0)
    p = bench.add_parser(
        "decode", help="decode/prefill roofline: step time, tok/s, %% of memory bandwidth, TTFT, compile time"
    )
    decode.add_arguments(p)
    p.set_defaults(func=lambda a: decode.run(a) and 0)
    p = bench.add_parser(
        "kv-cache", help="quantized KV cache: perplexity, greedy agreement and memory against full precision"
    )
    kv_cache.add_arguments(p)
    p.set_defaults(func=lambda a: kv_cache.run(a) and 0)
