"""Plots from a benchmark's JSON: output tokens/s and time to first token, by workload and
system. `python -m bench.plot bench/results/run.json` redraws a saved run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SYSTEMS = ("ptmoe", "ptmoe-api", "vllm", "vllm-lora", "transformers")


def workload_label(workload: dict) -> str:
    return f"N={workload['num_adapters']}\n{workload['popularity']}\n{workload['arrival']}"


def plot_results(report: dict, out: Path) -> None:
    labels = list(dict.fromkeys(workload_label(r["workload"]) for r in report["results"]))
    present = [s for s in SYSTEMS if any(r["system"] == s for r in report["results"])]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.8 * len(labels) * 2), 4.5))
    width = 0.8 / max(len(present), 1)
    for panel, (metric, title) in enumerate([("output_tokens_per_second", "output tokens/s"),
                                             ("ttft_p50", "time to first token p50 (s)")]):
        ax = axes[panel]
        for k, system in enumerate(present):
            values = {workload_label(r["workload"]): r[metric] for r in report["results"]
                      if r["system"] == system}
            xs = [i + k * width for i, label in enumerate(labels) if values.get(label) is not None]
            ys = [values[label] for label in labels if values.get(label) is not None]
            ax.bar(xs, ys, width, label=system)
        ax.set_xticks([i + width * (len(present) - 1) / 2 for i in range(len(labels))], labels,
                      fontsize=8)
        ax.set_title(title)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"{report['model']}, {report['dtype']}, {report['machine']['cpus']} CPUs"
                 + (f", {report['machine']['cuda']}" if report["machine"].get("cuda") else ""))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    path = Path(sys.argv[1])
    plot_results(json.loads(path.read_text()), path.with_suffix(".png"))
