"""`gsae report`: baseline and group runs side by side, as Markdown tables and PNG plots."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.errors import GsaeError  # noqa: E402
from pipeline.plots import png_bytes  # noqa: E402

# The paper's figures (DESIGN section 1): mean over layers, per-layer baseline vs group SAEs at G*.
PAPER = [
    {"model": "Pythia-160M", "ev_baseline": 0.903, "ev_group": 0.892, "dce_baseline": 5.33, "dce_group": 6.01, "cost": 0.62},
    {"model": "Pythia-410M", "ev_baseline": 0.878, "ev_group": 0.862, "dce_baseline": 5.33, "dce_group": 5.94, "cost": 0.49},
    {"model": "Pythia-1B", "ev_baseline": 0.839, "ev_group": 0.817, "dce_baseline": 5.67, "dce_group": 6.43, "cost": 0.49},
]


@dataclass
class RunSummary:
    path: Path
    label: str
    metric: str | None
    groups: list[list[int]]
    records: list[dict[str, Any]]
    train_seconds: float
    grouping_seconds: float
    amad: float | None
    tokens_per_sae: int

    def cost(self, baseline: "RunSummary | None") -> float:
        """Training time ÷ the baseline's (NaN without a baseline)."""
        return self.train_seconds / baseline.train_seconds if baseline else float("nan")

    def mean(self, key: str) -> float:
        values = [r[key] for r in self.records if key in r and r[key] == r[key]]
        return float(np.mean(values)) if values else float("nan")


def load_run(path: str) -> RunSummary:
    run = Path(path)
    try:
        config = json.loads((run / "config.json").read_text())
        summary = json.loads((run / "summary.json").read_text())
    except FileNotFoundError:
        raise GsaeError(f"{path} is not a finished gsae run (config.json and summary.json expected)") from None
    if not (run / "eval.json").is_file():
        raise GsaeError(f"{path} has no eval.json; run `gsae eval --run {path}` first")
    records = json.loads((run / "eval.json").read_text())["records"]
    amad, grouping_seconds, metric = None, 0.0, None
    if config.get("grouping"):
        metric = config["request"]["metric"]
        grouping_file = Path(config["grouping"])
        if grouping_file.is_file():
            grouping = json.loads(grouping_file.read_text())
            grouping_seconds = float(grouping.get("seconds", 0.0))
            n = len(config["groups"])
            amad = next((p["amad"] for p in grouping["curve"] if p["n_groups"] == n), None)
    else:
        amad = 0.0
    return RunSummary(run, config["label"], metric, config["groups"], sorted(records, key=lambda r: r["layer"]),
                      float(summary["train_seconds"]), grouping_seconds, amad,
                      int(config["steps"] * config["request"]["batch_size"]))


def per_layer_plot(runs: list[RunSummary]) -> bytes:
    figure, axes = plt.subplots(2, 1, figsize=(8, 6.4), sharex=True)
    for run in runs:
        layers = [r["layer"] for r in run.records]
        (line,) = axes[0].plot(layers, [r["explained_variance"] for r in run.records], marker="o", markersize=3,
                               label=run.label)
        axes[1].plot(layers, [r.get("delta_ce_percent", np.nan) for r in run.records], marker="o", markersize=3,
                     label=run.label, color=line.get_color())
        if run.label != "baseline":  # group boundaries, dashed in the run's colour so partitions can be told apart
            for group in run.groups[1:]:
                for ax in axes:
                    ax.axvline(group[0] - 0.5, color=line.get_color(), alpha=0.35, linestyle="--", linewidth=1)
    axes[0].set_ylabel("explained variance")
    axes[1].set_ylabel("ΔCE (% of clean CE)")
    axes[1].set_xlabel("layer")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return png_bytes(figure)


def cost_plot(runs: list[RunSummary], baseline: RunSummary | None) -> bytes:
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for run in runs:
        cost = run.cost(baseline) if baseline else run.train_seconds
        axes[0].scatter(cost, run.mean("explained_variance"))
        axes[0].annotate(run.label, (cost, run.mean("explained_variance")), fontsize=8)
        axes[1].scatter(cost, run.mean("delta_ce_percent"))
        axes[1].annotate(run.label, (cost, run.mean("delta_ce_percent")), fontsize=8)
    label = "training cost ÷ baseline" if baseline else "training seconds"
    axes[0].set(xlabel=label, ylabel="mean explained variance")
    axes[1].set(xlabel=label, ylabel="mean ΔCE %")
    for ax in axes:
        ax.grid(alpha=0.3)
    return png_bytes(figure)


def build_report(paths: list[str], out: str) -> Path:
    """Write ``report.md``, ``per-layer.png`` and ``cost.png`` under ``out``."""
    runs = [load_run(p) for p in paths]
    baseline = next((r for r in runs if r.label == "baseline"), None)
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    (target / "per-layer.png").write_bytes(per_layer_plot(runs))
    (target / "cost.png").write_bytes(cost_plot(runs, baseline))
    lines = ["# gsae report", "", "| run | G | AMAD | mean EV | mean ΔCE % | mean KL | mean L0 | dead % | "
             "tokens/SAE | training s | AMAD s | cost ÷ baseline |", "|" + " --- |" * 12]
    for run in runs:
        amad = f"{run.amad:.3f}" if run.amad is not None else "-"
        lines.append(f"| {run.label} | {len(run.groups)} | {amad} | {run.mean('explained_variance'):.3f} | "
                     f"{run.mean('delta_ce_percent'):.2f} | {run.mean('kl_divergence'):.4f} | {run.mean('l0'):.1f} | "
                     f"{100 * run.mean('dead_fraction'):.1f} | {run.tokens_per_sae:,} | {run.train_seconds:.1f} | "
                     f"{run.grouping_seconds:.1f} | {run.cost(baseline):.3f} |")
    lines += ["", "The paper (Pythia, mean over layers, baseline vs group SAEs at G*):", "",
              "| model | EV baseline | EV group | ΔCE % baseline | ΔCE % group | compute ÷ baseline |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {p['model']} | {p['ev_baseline']:.3f} | {p['ev_group']:.3f} | {p['dce_baseline']:.2f} | "
              f"{p['dce_group']:.2f} | {p['cost']:.2f} |" for p in PAPER]
    layers = sorted({r["layer"] for run in runs for r in run.records})
    lines += ["", "## Per layer: explained variance / ΔCE %", "",
              "| layer | " + " | ".join(run.label for run in runs) + " |", "|" + " --- |" * (len(runs) + 1)]
    for layer in layers:
        cells = []
        for run in runs:
            record = next((r for r in run.records if r["layer"] == layer), None)
            cells.append(f"{record['explained_variance']:.3f} / {record.get('delta_ce_percent', float('nan')):.2f}"
                         if record else "-")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines += ["", "![EV and ΔCE per layer](per-layer.png)", "", "![quality against cost](cost.png)", ""]
    (target / "report.md").write_text("\n".join(lines))
    return target / "report.md"
