"""Turn the newest GPU CSV in ``bench/results/`` into the README's results table and a PNG
bar chart, so the README never holds a hand-typed number.

The table lists, per bench/shape/dtype/layout, each provider's median time and its speed-up
over ``eager``; the chart draws those speed-ups. CPU CSVs (``gpu`` column ``cpu-…``) are
ignored: kernel numbers only count from a GPU.
"""

from __future__ import annotations

import csv
import glob
import os
from collections import OrderedDict

START = "<!-- results:start -->"
END = "<!-- results:end -->"

__all__ = ["newest_gpu_csv", "read_rows", "results_markdown", "plot", "update_readme"]


def read_rows(path: str) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def newest_gpu_csv(folder: str) -> str | None:
    """The newest CSV (by its ``date`` column, then file name) whose rows come from a GPU."""
    best = None
    for path in sorted(glob.glob(os.path.join(folder, "*.csv"))):
        rows = read_rows(path)
        if not rows or rows[0].get("gpu", "").startswith("cpu"):
            continue
        key = (rows[0].get("date", ""), os.path.basename(path))
        if best is None or key > best[0]:
            best = (key, path)
    return best[1] if best else None


def _groups(rows):
    groups: OrderedDict = OrderedDict()
    for r in rows:
        if not r.get("median_ms"):
            continue
        key = (r["bench"], r["shape"], r["dtype"], r["layout"])
        groups.setdefault(key, OrderedDict())[r["provider"]] = float(r["median_ms"])
    return groups


def _eager_for(groups, key):
    if "eager" in groups[key]:
        return groups[key]["eager"]
    for other, provs in groups.items():  # eager measured in another layout of the same case
        if other[:3] == key[:3] and "eager" in provs:
            return provs["eager"]
    return None


def results_markdown(path: str) -> str:
    rows = read_rows(path)
    if not rows:
        return "No rows in the newest GPU CSV.\n"
    r0 = rows[0]
    head = (
        f"From `{os.path.relpath(path)}`: {r0['gpu']}, torch {r0['torch']}, triton {r0['triton']}, "
        f"commit {r0['commit']}, {r0['date']}. Median ms (speed-up over eager).\n\n"
    )
    groups = _groups(rows)
    providers = []
    for provs in groups.values():
        for p in provs:
            if p not in providers:
                providers.append(p)
    lines = [
        "| bench | shape | dtype | layout | " + " | ".join(providers) + " |",
        "|---|---|---|---|" + "---:|" * len(providers),
    ]
    for key, provs in groups.items():
        eager = _eager_for(groups, key)
        cells = []
        for p in providers:
            if p not in provs:
                cells.append("")
                continue
            ms = provs[p]
            ratio = f" ({eager / ms:.2f}x)" if eager else ""
            cells.append(f"{ms:.4g}{ratio}")
        lines.append(f"| {' | '.join(key)} | " + " | ".join(cells) + " |")
    mem = [r for r in rows if r.get("peak_mem_mb") and not r.get("median_ms")]
    if mem:
        lines += ["", "| peak memory | shape | dtype | provider | MB |", "|---|---|---|---|---:|"]
        lines += [
            f"| {r['bench']} | {r['shape']} | {r['dtype']} | {r['provider']} | "
            f"{float(r['peak_mem_mb']):.0f} |"
            for r in mem
        ]
    return head + "\n".join(lines) + "\n"


def plot(path: str, out_png: str) -> str:
    """Bar chart of each provider's speed-up over eager, one bar group per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(read_rows(path))
    cases = [(key, provs, _eager_for(groups, key)) for key, provs in groups.items()]
    cases = [c for c in cases if c[2]]
    labels = [" ".join(key) for key, _, _ in cases]
    providers = list(OrderedDict.fromkeys(p for _, provs, _ in cases for p in provs))
    series = OrderedDict(
        (p, [eager / provs[p] if p in provs else 0.0 for _, provs, eager in cases])
        for p in providers
    )
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(labels) + 2), 5))
    width = 0.8 / max(len(series), 1)
    for i, (p, vals) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(labels))], vals, width, label=p)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("speed-up over eager (higher is better)")
    rows = read_rows(path)
    ax.set_title(f"sdvae on {rows[0]['gpu']} ({rows[0]['date']})" if rows else "sdvae")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def update_readme(readme: str, results_dir: str, png_name: str = "speedup.png") -> str:
    """Rewrite the block between the results markers of ``readme``; returns what was written."""
    path = newest_gpu_csv(results_dir)
    if path is None:
        body = "No GPU run has been recorded yet: `bench/results/` holds no GPU CSV.\n"
    else:
        png = plot(path, os.path.join(results_dir, png_name))
        rel_png = os.path.relpath(png, os.path.dirname(os.path.abspath(readme)))
        body = results_markdown(path) + f"\n![speed-up over eager]({rel_png})\n"
    with open(readme) as fh:
        text = fh.read()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} ... {END} block")
    pre, rest = text.split(START, 1)
    _, post = rest.split(END, 1)
    with open(readme, "w") as fh:
        fh.write(f"{pre}{START}\n{body}{END}{post}")
    return body
