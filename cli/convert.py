"""`xlaserve convert SRC --out DIR`: convert a GGUF file or an HF directory to an xlaserve (orbax)
checkpoint, optionally quantized (int8 per channel, int4 in groups), then report what quantizing
cost in perplexity (cli/quality.py)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from xlaserve.checkpoints import registry
from xlaserve.cli.common import Progress


def cmd_convert(args) -> int:
    from xlaserve.checkpoints import convert
    from xlaserve.cli import quality

    src = registry.resolve(args.src, log=lambda m: print(m, file=sys.stderr))
    status = Progress()

    def bar(i: int, n: int, name: str) -> None:
        filled = 30 * i // max(n, 1)
        status(f"[{'#' * filled}{'.' * (30 - filled)}] {i}/{n} {name}")

    status(f"reading {src}")
    t0 = time.perf_counter()
    meta = convert.convert(
        src,
        args.out,
        quant=args.quant,
        scheme=args.scheme,
        group_size=args.group_size,
        dtype=args.dtype,
        force=args.force,
        progress=bar,
    )
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    q = meta["quantization"]
    scheme = "/".join(str(x) for x in (q["method"], q["scheme"], q["group_size"]) if x)
    status.done(
        f"wrote {args.out} ({size / 2**20:.1f} MiB, {scheme}, kinds {','.join(q['kinds']) or 'dense'}) "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    if args.report:
        report = quality.quality_report(src, args.out, args.report_text)
        print(quality.format_report(report))
        if args.output == "json":
            print(json.dumps({"checkpoint": str(args.out), "quantization": q, "quality": report}))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a GGUF file or an HF directory to an xlaserve (orbax) checkpoint, optionally quantized",
    )
    p.add_argument("src", help="alias (smollm2), a .gguf file or an HF checkpoint directory")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument(
        "--quant",
        choices=("keep", "none", "int8", "int4"),
        default="keep",
        help="keep: as the source stores it (GGUF blocks stay); none: dense; int8: per output channel; "
        "int4: groups along the input axis (default: %(default)s)",
    )
    p.add_argument("--scheme", choices=("sym", "asym"), default="sym", help="int8/int4 rounding scheme")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=32, help="int4 group size")
    p.add_argument("--dtype", choices=("bf16", "f32"), default="f32", help="dense weights' dtype")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-report", dest="report", action="store_false", help="skip the perplexity report")
    p.add_argument(
        "--report-text", help="text for the perplexity report (default: the packaged data/two_cities.txt)"
    )
    p.add_argument("--output", choices=("text", "json"), default="text", help="also print the report as JSON")
    p.set_defaults(func=cmd_convert)
