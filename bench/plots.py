"""PNG plots of a decode result (matplotlib, imported lazily: it is only in the test/bench extras).
bench/report.py names the files and links them from the markdown."""

from __future__ import annotations

from pathlib import Path


def plot_decode(result: dict, names: dict[str, Path]) -> list[Path]:
    """tok/s vs batch (a line per context) and % of bandwidth vs context (a line per batch; solid:
    measured copy bandwidth, dashed: datasheet), saved to the two paths of `names` (report.plot_names)
    in that order. Returns the paths written."""
    from matplotlib.figure import Figure  # lazily: only plotting needs matplotlib (Agg via savefig)

    rows = result["decode"]
    batches = sorted({d["batch"] for d in rows})
    contexts = sorted({d["context"] for d in rows})
    where = f"{result.get('model')} on {result.get('device')}"
    paths = list(names.values())

    fig = Figure(figsize=(5.5, 3.6), dpi=90)
    ax = fig.subplots()
    for c in contexts:
        pts = sorted((d["batch"], d["tok_s"]) for d in rows if d["context"] == c)
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"context {c}")
    ax.set(xlabel="batch", ylabel="decode tok/s", title=f"Decode tok/s — {where}")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths[0])

    fig = Figure(figsize=(5.5, 3.6), dpi=90)
    ax = fig.subplots()
    for i, b in enumerate(batches):
        mine = sorted((d["context"], d) for d in rows if d["batch"] == b)
        xs = [c for c, _ in mine]
        ax.plot(xs, [d["pct_copy_bw"] for _, d in mine], marker="o", color=f"C{i}", label=f"batch {b}")
        if all(d.get("pct_datasheet") is not None for _, d in mine):
            ax.plot(xs, [d["pct_datasheet"] for _, d in mine], ls="--", color=f"C{i}")
    label = "% of copy bandwidth (dashed: of datasheet)" if result.get("datasheet") else "% of copy bandwidth"
    ax.set(xlabel="context (tokens)", ylabel=label, title=f"Decode bandwidth — {where}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths[1])
    return paths
