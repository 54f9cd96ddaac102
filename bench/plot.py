"""Plots from a benchmark's JSON: output tokens/s and time per output token, by workload and
system. `python -m bench.plot bench/results/run.json` redraws a saved run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.systems import SYSTEMS  # noqa: E402


def workload_label(row: dict) -> str:
    return f"N={row['num_adapters']}\n{row['popularity']}\n{row['arrival']}"


def series_label(row: dict) -> str:
    return row["system"] + (f" T={row['prompt_length']}" if row.get("prompt_length") else "")


def plot_results(report: dict, out: Path) -> None:
    """Medians over the rounds: throughput and time per output token, by workload; one bar
    per system and soft prompt length."""
    rows = sorted(report["medians"], key=lambda r: (SYSTEMS.index(r["system"]),
                                                    r.get("prompt_length") or 0))
    labels = list(dict.fromkeys(workload_label(r) for r in rows))
    series = list(dict.fromkeys(series_label(r) for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 1.2 * len(labels) * len(series)), 4.5))
    width = 0.8 / max(len(series), 1)
    for panel, (metric, scale, title) in enumerate([
            ("output_tokens_per_second", 1, "output tokens/s (median of rounds)"),
            ("tpot_p50", 1000, "time per output token p50 (ms)")]):
        ax = axes[panel]
        for k, name in enumerate(series):
            values = {workload_label(r): r[metric] for r in rows if series_label(r) == name}
            xs = [i + k * width for i, label in enumerate(labels) if values.get(label) is not None]
            ys = [values[label] * scale for label in labels if values.get(label) is not None]
            ax.bar(xs, ys, width, label=name)
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))], labels,
                      fontsize=8)
        ax.set_title(title)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{report['model']}, {report['dtype']}, {report['machine']['cpus']} CPUs"
                 + (f", {report['machine']['cuda']}" if report["machine"].get("cuda") else ""))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    path = Path(sys.argv[1])
    plot_results(json.loads(path.read_text()), path.with_suffix(".png"))
