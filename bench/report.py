"""Benchmark reports: every benchmark writes its result as JSON with a markdown rendering beside it
(and, for decode, PNG plots: bench/plots.py draws them), and BENCHMARKS.md at the repository root
is generated from all the JSON files in bench/results/:

    python -m xlaserve.bench.report --write-benchmarks-md

A result says what it is in "kind" ("decode", "serve"; files written before this module say it in
"benchmark": "compare_hf", "offline"). A kind this module does not know is still rendered: its
scalar fields as a list and each list of records as a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
from pathlib import Path

from xlaserve.bench import plots

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (for file names)."""
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "unknown"


def device_slug(device_kind: str) -> str:
    """File-name prefix for a device, as bench/kernels.py writes it: 'NVIDIA H100 80GB HBM3' ->
    'h100-80gb-hbm3', 'TPU v5 lite' -> 'tpu-v5-lite', 'cpu' -> 'cpu'."""
    return slug(str(device_kind).lower().replace("nvidia ", ""))


def device_info() -> dict:
    """The first device: platform, kind (the CPU's name on CPU), count and the file-name slug."""
    import platform

    import jax

    d = jax.devices()[0]
    name = d.device_kind if d.platform != "cpu" else (platform.processor() or platform.machine())
    return {
        "platform": d.platform,
        "kind": name,
        "count": jax.device_count(),
        "slug": device_slug(d.device_kind),
    }


def result_path(out, name: str) -> Path:
    """Where a benchmark writes its result: `out` itself when it names a .json file, else
    <out, default bench/results>/<device slug>-<name>-<date>.json."""
    import jax

    out = Path(out) if out else RESULTS
    if out.suffix == ".json":
        return out
    return (
        out / f"{device_slug(jax.devices()[0].device_kind)}-{name}-{datetime.date.today().isoformat()}.json"
    )


def command_line(prefix: str, add_arguments, args, skip=()) -> str:
    """`prefix` and the options of `args` that differ from the defaults `add_arguments` declares
    (what to type to run the same benchmark again)."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    defaults = vars(p.parse_args([]))
    parts = [prefix]
    for key, value in vars(args).items():
        if key not in defaults or value == defaults[key] or key in skip:
            continue
        value = ",".join(map(str, value)) if isinstance(value, list | tuple) else value
        parts.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(parts)


def kind(result: dict) -> str:
    return str(result.get("kind") or result.get("benchmark") or "unknown")


def write(result: dict, json_path: Path | str, markdown: str | None = None) -> list[Path]:
    """Write result as JSON and its markdown (default: `render(result)`) next to it; decode results
    also get their plots. Returns the paths written."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md = json_path.with_suffix(".md")
    md.write_text((markdown if markdown is not None else render(result)) + "\n")
    written = [json_path, md]
    if kind(result) == "decode" and result.get("decode"):
        try:
            written += plots.plot_decode(result, plot_names(json_path))
        except ImportError as e:  # matplotlib is only in the test/bench extras
            print(f"no plots: {e}")
    for path in written:
        print(f"wrote {path}")
    return written


# -- rendering --------------------------------------------------------------------------------------


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:,.0f}"


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.1f}"


def pct(x) -> str:
    return "–" if x is None else f"{x:.1f}%"


def ratio(a, b) -> str:
    return "–" if not a or not b else f"{a / b:.2f}x"


def plot_names(json_path: Path) -> dict[str, Path]:
    """A decode result's plots by title: PNG files beside its JSON."""
    stem = json_path.with_suffix("")
    return {
        "tok/s vs batch": stem.with_name(stem.name + "-tok_s.png"),
        "% of bandwidth vs context": stem.with_name(stem.name + "-bandwidth.png"),
    }


def render_decode(r: dict, images: dict[str, str] | None = None) -> str:
    bw, sheet = r.get("copy_bandwidth_Bps"), r.get("datasheet") or {}
    out = [
        f"{r.get('model')} ({r.get('dtype')}, weights {r.get('quant')}) on {r.get('device')} "
        f"x{r.get('num_devices', 1)}, jax {r.get('jax_version')}, {r.get('date')}"
        + (
            f" (1-min load average at start / end: {load['start']:.1f} / {load['end']:.1f})."
            if (load := r.get("machine", {}).get("load_average_1min"))
            else "."
        ),
        "",
        f"Copy bandwidth measured at start (dst = src + 1 over large arrays, bytes read + written): "
        f"{fmt(bw / 1e9 if bw else None)} GB/s; datasheet: "
        + (
            f"{sheet['name']}, {fmt(sheet.get('bandwidth_Bps', 0) / 1e9)} GB/s"
            if sheet.get("name")
            else "none for this device"
        )
        + (
            f". Weights {fmt(r['weight_bytes'] / 2**20)} MiB, KV cache {fmt(r['kv_cache_bytes'] / 2**20)} MiB"
            if r.get("weight_bytes")
            else ""
        )
        + ". Peak memory: "
        + (
            f"{fmt(r['peak_memory_bytes'] / 2**30)} GiB ({r.get('peak_memory_source')})."
            if r.get("peak_memory_bytes")
            else "not available."
        ),
        "",
        "Decode (one compiled decode step per token, every sequence at the given context):",
        "",
        table(
            ["batch", "context", "step ms", "tok/s", "MiB read/step", "GB/s", "% copy BW", "% datasheet"],
            [
                [
                    d["batch"],
                    d["context"],
                    ms(d["step_s"]),
                    f"{d['tok_s']:.1f}",
                    f"{d['bytes_per_step'] / 2**20:.1f}",
                    f"{d['bytes_per_s'] / 1e9:.2f}",
                    pct(d.get("pct_copy_bw")),
                    pct(d.get("pct_datasheet")),
                ]
                for d in r.get("decode", [])
            ],
        ),
    ]
    if r.get("prefill"):
        out += [
            "",
            "Prefill (one prompt; TTFT includes the first token's copy to the host):",
            "",
            table(
                ["prompt tokens", "TTFT ms", "TFLOP/s", "% peak"],
                [
                    [
                        p["prompt_len"],
                        ms(p["ttft_s"]),
                        f"{p['flops_per_s'] / 1e12:.3f}",
                        pct(p.get("pct_peak")),
                    ]
                    for p in r["prefill"]
                ],
            ),
        ]
    cmp = r.get("compare") or {}
    if cmp.get("decode"):
        ref = cmp.get("reference", {})
        out += [
            "",
            f"Against {ref.get('name', 'the reference')} ({ref.get('config', '')}), same run, "
            f"alternating, medians of {r.get('repeats')}:",
            "",
            table(
                ["batch", "context", "xlaserve tok/s", "reference tok/s", "speedup"],
                [
                    [
                        c["batch"],
                        c["context"],
                        f"{c['xlaserve_tok_s']:.1f}",
                        f"{c['ref_tok_s']:.1f}",
                        f"**{c['speedup']:.2f}x**" if c["batch"] == 1 else f"{c['speedup']:.2f}x",
                    ]
                    for c in cmp["decode"]
                ],
            ),
        ]
        if cmp.get("prefill"):
            out += [
                "",
                table(
                    ["prompt tokens", "xlaserve TTFT ms", "reference TTFT ms", "speedup"],
                    [
                        [
                            c["prompt_len"],
                            ms(c["xlaserve_ttft_s"]),
                            ms(c["ref_ttft_s"]),
                            f"{c['speedup']:.2f}x",
                        ]
                        for c in cmp["prefill"]
                    ],
                ),
            ]
    compile_s = r.get("compile_s") or {}
    if compile_s:
        slowest = max(compile_s, key=compile_s.get)
        out += [
            "",
            f"Compile: {len(compile_s)} programs in {sum(compile_s.values()):.1f} s "
            f"(slowest {slowest}: {compile_s[slowest]:.1f} s); persistent cache "
            f"{'on' if r.get('compile_cache') else 'off'}.",
        ]
    for note in r.get("notes", []):
        out += ["", f"Note: {note}"]
    for title, src in (images or {}).items():
        out += ["", f"![{title}]({src})"]
    return "\n".join(out)


def render_serve(r: dict) -> str:
    head = f"Server: {r.get('server')}; {r.get('max_tokens')} new tokens per request; {r.get('date')}."
    return head + "\n\n" + (r.get("table") or render_generic(r))


def render_compare_hf(r: dict) -> str:
    rows = [
        [
            x["batch"],
            f"{x['xlaserve_decode_tok_s']:.1f} / {x['hf_decode_tok_s']:.1f} "
            f"({ratio(x['xlaserve_decode_tok_s'], x['hf_decode_tok_s'])})",
            f"{x['xlaserve_throughput_tok_s']:.1f} / {x['hf_throughput_tok_s']:.1f} "
            f"({ratio(x['xlaserve_throughput_tok_s'], x['hf_throughput_tok_s'])})",
            f"{ms(x['xlaserve_ttft_s'])} / {ms(x['hf_ttft_s'])}",
        ]
        for x in r.get("rows", [])
    ]
    head = (
        f"{r.get('model')} on {r.get('device')} ({r.get('machine', {}).get('cpus', '?')} CPUs), "
        f"engine {r.get('engine', {}).get('dtype')}, against HF {r.get('hf', {}).get('dtype')} "
        f"`generate`, {r.get('date')}; medians of {r.get('repeats')}."
    )
    return (
        head
        + "\n\n"
        + table(
            [
                "batch",
                "decode tok/s per sequence: xlaserve / HF",
                "throughput tok/s: xlaserve / HF",
                "TTFT ms: xlaserve / HF",
            ],
            rows,
        )
    )


def render_offline(r: dict) -> str:
    rows = [
        [
            x["slots"],
            f"{x['xlaserve']['output_tok_s']:.1f}",
            f"{x['hf']['output_tok_s']:.1f}" if "hf" in x else "–",
            f"{x['speedup']:.2f}x" if "speedup" in x else "–",
        ]
        for x in r.get("throughput", [])
    ]
    out = [
        f"{r.get('model')} on {r.get('device')}, {r.get('num_prompts')} prompts ({r.get('prompt_words')} "
        f"words), {r.get('max_tokens')} new tokens each, {r.get('date')}.",
        "",
        table(["slots / HF batch", "xlaserve tok/s", "HF tok/s", "ratio"], rows),
    ]
    if r.get("shared_prefix_ttft"):
        out += [
            "",
            "Shared system prompt:",
            "",
            table(
                ["prefix cache", "requests", "prefill tokens computed", "TTFT p50 s", "TTFT p90 s"],
                [
                    [
                        "on" if s["prefix_cache"] else "off",
                        s["requests"],
                        s["prefill_tokens_computed"],
                        s["ttft_p50_s"],
                        s["ttft_p90_s"],
                    ]
                    for s in r["shared_prefix_ttft"]
                ],
            ),
        ]
    return "\n".join(out)


def render_generic(r: dict) -> str:
    """Any result: scalars (and a dict's scalars) as a list; a list of records, or a dict of
    records, as a table of their scalar columns. Deeper nesting is left to the JSON."""
    scalar = lambda v: v is None or isinstance(v, str | int | float | bool)
    lines, tables = [], []

    def records(key: str, named: list[tuple[str | None, dict]]) -> None:
        cols = list(dict.fromkeys(c for _, rec in named for c, v in rec.items() if scalar(v)))
        head = ([""] if named[0][0] is not None else []) + cols
        rows = [([name] if name is not None else []) + [rec.get(c) for c in cols] for name, rec in named]
        tables.extend(["", f"{key}:", "", table(head, rows)])

    for key, value in r.items():
        if key == "table":
            continue
        if scalar(value):
            lines.append(f"- {key}: {fmt(value)}")
        elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            records(key, [(None, x) for x in value])
        elif isinstance(value, dict) and value and all(isinstance(x, dict) for x in value.values()):
            records(key, list(value.items()))
        elif isinstance(value, dict) and any(scalar(x) for x in value.values()):
            lines.append(f"- {key}: " + ", ".join(f"{k} {fmt(x)}" for k, x in value.items() if scalar(x)))
    return "\n".join(lines + tables)


def device_name(r: dict) -> str:
    d = r.get("device") or r.get("backend") or r.get("client_machine", {}).get("backend", "")
    return str(d.get("slug") or d.get("platform") or d) if isinstance(d, dict) else str(d)


RENDERERS = {"serve": render_serve, "compare_hf": render_compare_hf, "offline": render_offline}


def render(result: dict, images: dict[str, str] | None = None) -> str:
    """Markdown for one result; `images` maps plot titles to links (decode)."""
    k = kind(result)
    if k == "decode":
        return render_decode(result, images)
    return RENDERERS.get(k, render_generic)(result)


def title(result: dict, name: str) -> str:
    return f"{kind(result)}: {result.get('model') or result.get('server') or name}"


def benchmarks_md(results_dir: Path, out_path: Path) -> str:
    """BENCHMARKS.md: every JSON result in results_dir, newest first, links relative to out_path."""
    files = sorted(Path(results_dir).glob("*.json"))
    loaded = []
    for f in files:
        try:
            loaded.append((f, json.loads(f.read_text())))
        except (OSError, ValueError) as e:
            loaded.append((f, {"kind": "unreadable", "error": str(e)}))
    loaded.sort(key=lambda fr: (str(fr[1].get("date", "")), fr[0].name), reverse=True)
    rel = lambda p: Path(os.path.relpath(p, out_path.parent)).as_posix()
    out = [
        "# Benchmarks",
        "",
        "Generated from the JSON files in `bench/results/` by "
        "`python -m xlaserve.bench.report --write-benchmarks-md`; do not edit by hand. Each section "
        "links the raw result, which records the command, device and versions.",
        "",
    ]
    out += [f"- [{title(r, f.name)}](#{slug(f.stem)}) — `{f.name}`" for f, r in loaded]
    for f, r in loaded:
        images = None
        if kind(r) == "decode":
            images = {t: rel(p) for t, p in plot_names(f).items() if p.exists()}
        out += [
            "",
            f'<a id="{slug(f.stem)}"></a>',
            f"## {title(r, f.name)} — {device_name(r)}, {str(r.get('date', ''))[:10]}",
            "",
            f"Source: [{rel(f)}]({rel(f)})" + (f"; command: `{r['command']}`" if r.get("command") else ""),
            "",
            render(r, images),
        ]
    return "\n".join(out) + "\n"


def write_benchmarks_md(results_dir: Path = RESULTS, out_path: Path = ROOT / "BENCHMARKS.md") -> Path:
    out_path = Path(out_path)
    out_path.write_text(benchmarks_md(Path(results_dir), out_path))
    print(f"wrote {out_path}")
    return out_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write-benchmarks-md", action="store_true", help="generate BENCHMARKS.md")
    p.add_argument("--results", default=str(RESULTS), help="directory of result JSON files")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("files", nargs="*", help="result JSON files to print as markdown")
    args = p.parse_args(argv)
    for f in args.files:
        print(render(json.loads(Path(f).read_text())))
    if args.write_benchmarks_md:
        write_benchmarks_md(Path(args.results), Path(args.out))
    elif not args.files:
        p.error("nothing to do: give --write-benchmarks-md or result files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
