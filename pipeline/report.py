"""`gsae report`: baseline and group runs side by side, as Markdown tables and PNG plots."""

from __future__ import annotations

import itertools
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import GsaeError, write_errors
from pipeline.evaluate import eval_argument_changes, read_eval
from pipeline.grouping import layer_span
from pipeline.run import SUMMARY, Run, RunConfig, fingerprint_changes, join, write_atomic
from pipeline.requests import TOP_K_ARCHITECTURES
from stores import ActivationStore, StoreError, read_seconds_writing
from stores.remote import describe_storage_error

# The paper's figures (DESIGN section 1): mean over layers, per-layer baseline vs group SAEs at G*.
PAPER = [
    {"model": "Pythia-160M", "ev_baseline": 0.903, "ev_group": 0.892, "dce_baseline": 5.33, "dce_group": 6.01, "cost": 0.62},
    {"model": "Pythia-410M", "ev_baseline": 0.878, "ev_group": 0.862, "dce_baseline": 5.33, "dce_group": 5.94, "cost": 0.49},
    {"model": "Pythia-1B", "ev_baseline": 0.839, "ev_group": 0.817, "dce_baseline": 5.67, "dce_group": 6.43, "cost": 0.49},
]


COST_NOTE = (
    "Cost, with the paper's formula: total = (A + T·G) ÷ (A + T·L). A is the shared cost of producing the "
    "activations: the cache's recorded model-and-write time (timing.json) scaled to the tokens each SAE "
    "trained on, A = cache seconds × tokens per SAE ÷ cache tokens, at most the whole cache's time (rows read "
    "more than once cost no second forward). T is the cost of training one SAE; "
    "T·G is this run's measured training time for its G SAEs and T·L the per-layer baseline's for its L. "
    "The training-only ratio leaves A out and is ≈ G/L. The grouping's own time (AMAD s) is shown apart."
)


@dataclass
class RunSummary:
    path: str
    label: str
    metric: str | None
    groups: list[list[int]]
    records: list[dict[str, Any]]
    train_seconds: float
    grouping_seconds: float
    amad: float | None
    tokens_per_sae: int
    cache_seconds: float | None  # producing the whole cache (timing.json), None when not recorded
    cache_tokens: int
    cache_fingerprint: dict[str, Any]
    cache_note: str | None = None  # why cache_seconds is None
    sae: dict[str, Any] = field(default_factory=dict)  # architecture, n_latents, k: what the runs must share
    evaluated_with: dict[str, Any] | None = None  # eval.json's arguments (None: an eval.json that records none)
    name: str = ""  # how tables and plots show it: the label, or where two runs share one, with their folders
    # each SAE's layers and the seconds of its own steps (summary.json), for a baseline's time over some layers
    sae_seconds: list[tuple[list[int], float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.name = self.name or self.label

    @property
    def layers(self) -> set[int]:
        return {layer for group in self.groups for layer in group}

    def baseline_seconds(self, baseline: "RunSummary | None") -> float:
        """The baseline's training time over this run's layers: all of it where they are the baseline's; where
        they are fewer, its share of the baseline's SAEs' own step seconds (a run over layers 1–4 beside a
        baseline over 0–5 read 0.35 of its time, partly for the layers it left out, helper-76); NaN where the
        baseline lacks some of them, or has no baseline."""
        if baseline is None or not self.layers <= baseline.layers:
            return float("nan")
        if self.layers == baseline.layers:
            return baseline.train_seconds
        per_layer = {group[0]: seconds for group, seconds in baseline.sae_seconds if len(group) == 1}
        total = sum(seconds for _, seconds in baseline.sae_seconds)
        if not self.layers <= set(per_layer) or not total > 0:  # a summary without per-SAE seconds
            return float("nan")
        return baseline.train_seconds * sum(per_layer[layer] for layer in self.layers) / total

    def cost(self, baseline: "RunSummary | None") -> float:
        """Training time ÷ the baseline's over the same layers (NaN without one)."""
        return self.train_seconds / self.baseline_seconds(baseline)

    def activation_seconds(self) -> float:
        """A: the cache's time scaled to the tokens one SAE trained on, at most the whole cache's: an SAE that
        trained on more tokens than the cache holds read rows again, which ran no forward (NaN when not
        recorded)."""
        if self.cache_seconds is None:
            return float("nan")
        return self.cache_seconds * min(self.tokens_per_sae, self.cache_tokens) / self.cache_tokens

    def total_cost(self, baseline: "RunSummary | None") -> float:
        """The paper's (A + T·G) ÷ (A + T·L), with T·G and T·L the measured training times."""
        if baseline is None:
            return float("nan")
        a = self.activation_seconds()
        return (a + self.train_seconds) / (a + self.baseline_seconds(baseline))

    def mean(self, key: str) -> float:
        values = [r[key] for r in self.records if key in r and r[key] == r[key]]
        return float(np.mean(values)) if values else float("nan")


def load_run(path: str, cache_seconds: float | None = None) -> RunSummary:
    """A finished, evaluated run; ``cache_seconds`` stands in for a cache that recorded no time."""
    config = Run.read_config(path)  # a damaged config.json is one line already
    if config is not None:
        _check_json_files(str(path), config)
    run = Run.open(path, need="evaluated")
    config = run.config
    evaluation = read_eval(run)
    records = evaluation["records"]
    evaluated_with = _evaluated_with(evaluation.get("arguments"), records, config)
    summary = run.summary
    train_seconds = summary.get("train_seconds") if isinstance(summary, dict) else None
    if not isinstance(train_seconds, (int, float)):
        raise GsaeError(f"{join(run.path, SUMMARY)} is damaged (no train_seconds); train the run again")
    amad, grouping_seconds = (0.0, 0.0) if config.grouping is None else _grouping_figures(config)
    cache_note = None
    if cache_seconds is None:
        try:
            cache_seconds = read_seconds_writing(ActivationStore.open(config.cache))
            if cache_seconds is None:
                cache_note = f"the cache {config.cache} recorded no time (no timing.json)"
        except Exception as exc:  # the cache moved, is gone or out of reach: the total cost is left open
            if not isinstance(exc, (StoreError, OSError)) and describe_storage_error(exc) is None:
                raise
            cache_seconds = None
            cache_note = (str(exc) if isinstance(exc, StoreError) and "timing.json" in str(exc)
                          else f"the cache {config.cache} cannot be opened for its timing.json")
    return RunSummary(run.path, config.label, config.metric, config.groups,
                      sorted(records, key=lambda r: r["layer"]), float(train_seconds),
                      grouping_seconds, amad, config.tokens_per_sae, cache_seconds,
                      int(config.cache_fingerprint["tokens"]), config.cache_fingerprint, cache_note,
                      {"architecture": config.architecture, "n_latents": config.n_latents,
                       # k matters only where there is a top-k (relu, jumprelu: unused, and recorded differently),
                       # the penalty's weight only where there is none
                       "k": config.k if config.architecture in TOP_K_ARCHITECTURES else None,
                       "l1_coefficient": None if config.architecture in TOP_K_ARCHITECTURES else config.l1_coefficient},
                      evaluated_with=evaluated_with, sae_seconds=_sae_seconds(summary))


def _sae_seconds(summary: dict[str, Any]) -> list[tuple[list[int], float]]:
    """Each SAE's layers and own step seconds from summary.json ([] where it records them not, or not all)."""
    rows = summary.get("saes")
    if not isinstance(rows, list) or not all(isinstance(row, dict) and isinstance(row.get("layers"), list)
                                             and isinstance(row.get("seconds"), (int, float)) for row in rows):
        return []
    return [(list(row["layers"]), float(row["seconds"])) for row in rows]


def _evaluated_with(arguments: Any, records: list[dict[str, Any]], config: RunConfig) -> dict[str, Any] | None:
    """What an evaluation measured, from the arguments its eval.json records (None where it records none):
    ``tokens`` and ``windows`` as the held-out rows and windows it read (more than the slice holds reads all
    of it), and ``context_length`` as the cache's where it was left out (whole windows)."""
    if not isinstance(arguments, dict):
        return None
    measured = dict(arguments)
    for key, recorded in (("tokens", "tokens"), ("windows", "eval_windows")):  # as read: a slice may hold fewer
        values = {record.get(recorded) for record in records}
        if len(values) == 1 and isinstance(next(iter(values)), int):
            measured[key] = next(iter(values))
    if measured.get("context_length") is None:
        measured["context_length"] = config.source.get("context_length")
    return measured


def _check_json_files(path: str, config: RunConfig) -> None:
    """summary.json and every sae_<i>.json that exists must be a JSON object: one line naming the one
    that is not (a missing one is left to Run.open, which says what state the run is in)."""
    run = Run(path, config)
    for name in [SUMMARY] + [f"sae_{i}.json" for i in range(len(config.groups))]:
        try:
            run.read_json(name)
        except GsaeError as exc:
            raise GsaeError(f"{exc}; train the run again") from None


def _identity(path: str) -> tuple[str, str]:
    """What tells two spellings of one run folder apart from two folders."""
    fs, root = fsspec.core.url_to_fs(str(path))
    if isinstance(fs, LocalFileSystem):
        return "file", os.path.realpath(root)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol, root.rstrip("/")


def check_comparable(paths: list[str], runs: list["RunSummary"] | None = None) -> None:
    """Refuse, in one line naming the runs, a run given twice, or runs from different caches or with
    different tokens per SAE: their figures and cost ratios would not compare like with like."""
    seen: dict[tuple[str, str], str] = {}
    for path in paths:
        key = _identity(path)
        if key in seen:
            same = "" if seen[key] == path else f" (as {seen[key]})"
            raise GsaeError(f"the run {path} is given twice{same}; give each run once")
        seen[key] = path
    if not runs:
        return
    # every pair: a run of an older gsae records fewer settings (cache, evaluation), so a reference run
    # could leave a difference between two others unseen
    for first, other in itertools.combinations(runs, 2):
        differ = fingerprint_changes(first.cache_fingerprint, other.cache_fingerprint)
        if differ:
            raise GsaeError(f"cannot compare {first.path} and {other.path}: they were trained on different caches "
                            f"({'; '.join(differ)})")
        if first.evaluated_with is not None and other.evaluated_with is not None:
            # dead % (never fired on the evaluation's rows) and the means depend on what was evaluated
            evaluated = eval_argument_changes(first.evaluated_with, other.evaluated_with)
            if evaluated:
                raise GsaeError(f"cannot compare {first.path} and {other.path}: they were evaluated otherwise "
                                f"({'; '.join(evaluated)}: what each measured); evaluate them alike with `gsae eval`")
        elif (known := first.evaluated_with or other.evaluated_with) and known.get("downstream_positions") and known.get("windows"):
            # an eval.json recording no arguments is older still: its CE and KL, where it has them, were averaged
            # as before 2026-11-29
            older = first if first.evaluated_with is None else other
            if any("ce_clean" in record for record in older.records):
                raise GsaeError(f"cannot compare {first.path} and {other.path}: the eval.json of {older.path} comes from a "
                                "gsae before 2026-11-29, which averaged CE and KL over other positions; evaluate it "
                                f"again with `gsae eval --run {older.path}`")
    reference = next((r for r in runs if r.label == "baseline"), runs[0])
    for run in runs:
        shape = [f"{key} {reference.sae.get(key)} vs {run.sae.get(key)}" for key in reference.sae
                 if reference.sae.get(key) != run.sae.get(key)]
        if shape:
            raise GsaeError(f"cannot compare {reference.path} and {run.path}: their SAEs differ ({'; '.join(shape)}); "
                            "train them with the same --architecture, --expansion and --k (or --l1-coefficient)")
        if run.tokens_per_sae != reference.tokens_per_sae:
            raise GsaeError(f"cannot compare {reference.path} and {run.path}: {reference.tokens_per_sae:,} vs "
                            f"{run.tokens_per_sae:,} training tokens per SAE; train them with the same --tokens "
                            "and --batch-size")


def _grouping_figures(config: RunConfig) -> tuple[float | None, float]:
    """(AMAD of the run's partition, seconds the grouping took), as recorded when the run was planned.

    Runs from before that record are looked up in the grouping file, and only trusted when the file's
    partition is still the one the run trained (a later `gsae group --force` may have replaced it)."""
    snapshot = config.grouping
    if snapshot.get("amad") is not None:
        return float(snapshot["amad"]), float(snapshot.get("seconds") or 0.0)
    try:
        with fsspec.open(snapshot["file"], "rt") as handle:
            record = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None, 0.0
    point = next((p for p in record.get("curve", []) if p["n_groups"] == len(config.groups)), None)
    if point is None or point["groups"] != config.groups:
        return None, 0.0
    return float(point["amad"]), float(record.get("seconds", 0.0))


NOT_MEASURED = {"delta_ce_percent": "ΔCE not measured (gsae eval --windows 0)",
                "explained_variance_per_token": "per-token EV not recorded (run gsae eval again)"}


def _measured(run: RunSummary, key: str) -> bool:
    """Whether any of the run's records holds ``key`` as a number (not NaN)."""
    return any(isinstance(r.get(key), (int, float)) and r[key] == r[key] for r in run.records)


def _not_measured_panel(ax, key: str) -> None:
    """A panel whose metric no run has: a centred line saying so, and no ticks or grid to misread."""
    ax.text(0.5, 0.5, NOT_MEASURED[key], transform=ax.transAxes, ha="center", va="center",
            fontsize=10, color="0.35")
    ax.set(xticks=[], yticks=[], xlabel="", ylabel="")  # the line names the metric; empty axes' labels would not fit


def _missing_note(ax, runs: list[RunSummary], key: str, no_cost: list[str] = ()) -> None:
    """Where some runs have the metric and some not, or (``no_cost``) no cost ÷ baseline (a layer the baseline
    lacks): name them above the panel (clear of its points), rather than leave them out without a word."""
    missing = [run.name for run in runs if not _measured(run, key)]
    said = ([f"not measured: {', '.join(missing)}"] if missing else []) + \
        ([f"no cost ÷ baseline: {', '.join(no_cost)}"] if no_cost else [])
    if said:
        ax.set_title("; ".join(said), loc="right", fontsize=8, color="0.35")


def per_layer_figure(runs: list[RunSummary]):
    """Per-token EV and ΔCE per layer, group boundaries marked; a panel no run measured says so."""
    from pipeline.plots import plt  # matplotlib only when a report is drawn

    panels = [("explained_variance_per_token", "explained variance (per token)"),
              ("delta_ce_percent", "ΔCE (% of clean CE)")]
    measured = [any(_measured(run, key) for run in runs) for key, _ in panels]
    # a panel nobody measured is a thin strip with its note; the others share the layer axis
    figure, axes = plt.subplots(2, 1, figsize=(8, 6.4 if all(measured) else 4.8), layout="constrained",
                                height_ratios=[3 if m else 1 for m in measured])
    plotted = [ax for ax, m in zip(axes, measured) if m]
    for ax in plotted[1:]:
        ax.sharex(plotted[0])
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        colour = colours[i % len(colours)]
        layers = [r["layer"] for r in run.records]
        for ax, (key, _), m in zip(axes, panels, measured):
            if not m or not _measured(run, key):
                continue
            ax.plot(layers, [r.get(key, np.nan) for r in run.records], marker="o", markersize=3,
                    label=run.name, color=colour)
            if run.label != "baseline":  # group boundaries, dashed in the run's colour so partitions can be told apart
                for group in run.groups[1:]:
                    ax.axvline(group[0] - 0.5, color=colour, alpha=0.35, linestyle="--", linewidth=1)
    for ax, (key, ylabel), m in zip(axes, panels, measured):
        if m:
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            _missing_note(ax, runs, key)
        else:
            _not_measured_panel(ax, key)
    for ax in plotted[:-1]:
        ax.tick_params(labelbottom=False)
    if plotted:
        plotted[-1].set_xlabel("layer")
        plotted[-1].xaxis.get_major_locator().set_params(integer=True)  # layers, not 0.25, 0.5 ... on a short axis
        # the legend where the runs are: the first panel any of them is drawn in
        plotted[0].legend(fontsize=8)
    return figure


def per_layer_plot(runs: list[RunSummary]) -> bytes:
    from pipeline.plots import png_bytes

    return png_bytes(per_layer_figure(runs))


def cost_figure(runs: list[RunSummary], baseline: RunSummary | None):
    """Mean per-token EV and mean ΔCE against the training cost; a panel no run measured says so."""
    from pipeline.plots import plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")  # constrained: no label over a panel
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    label = "training cost ÷ baseline" if baseline else "training seconds"
    panels = [("explained_variance_per_token", "mean explained variance (per token)"),  # as the table and per-layer.png
              ("delta_ce_percent", "mean ΔCE %")]
    for ax, (key, ylabel) in zip(axes, panels):
        ax.set(xlabel=label, ylabel=ylabel)
        if not any(_measured(run, key) for run in runs):
            _not_measured_panel(ax, key)
            continue
        for i, run in enumerate(runs):
            cost, value = run.cost(baseline) if baseline else run.train_seconds, run.mean(key)
            if value != value or cost != cost:
                continue
            ax.scatter(cost, value, color=colours[i % len(colours)])
            ax.annotate(run.name, (cost, value), fontsize=8)
        ax.grid(alpha=0.3)
        _missing_note(ax, runs, key, [run.name for run in runs if baseline and run.cost(baseline) != run.cost(baseline)])
    return figure


def cost_plot(runs: list[RunSummary], baseline: RunSummary | None) -> bytes:
    from pipeline.plots import png_bytes

    return png_bytes(cost_figure(runs, baseline))


@dataclass
class Report:
    folder: str  # a folder or an fsspec URL
    markdown: str  # what report.md holds

    @property
    def tables(self) -> str:
        """The run and per-layer tables, without the paper's figures."""
        return self.markdown.split("\n\nThe paper")[0]


def name_runs(runs: list[RunSummary]) -> None:
    """Set each run's ``name``: its label, and where several runs share a label (two seeds of amad-g3),
    the label with the run's folder: its last part or, where that is the same for two of them, its path."""
    def folder(run: RunSummary) -> str:
        path = run.path.rstrip("/")
        return os.path.realpath(path) if "://" not in path else path  # "." and "../x" as where they are

    by_label: dict[str, list[RunSummary]] = {}
    for run in runs:
        by_label.setdefault(run.label, []).append(run)
    for same in by_label.values():
        tails = Counter(folder(run).rsplit("/", 1)[-1] for run in same)
        for run in same:
            path = folder(run)
            where = path.rsplit("/", 1)[-1] if tails[path.rsplit("/", 1)[-1]] == 1 else path
            # a "|" would end the Markdown table's cell
            run.name = run.label if len(same) == 1 else f"{run.label} ({where})".replace("|", "\\|")


def _cell(value: float | None, fmt: str) -> str:
    """A number for the table; "–" for one that is not known (None or NaN)."""
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def build_report(paths: list[str], out: str, cache_seconds: float | None = None) -> Report:
    """Write ``report.md``, ``per-layer.png`` and ``cost.png`` under ``out`` (a folder or an fsspec URL)."""
    paths = [str(p) for p in paths]
    check_comparable(paths)
    runs = [load_run(p, cache_seconds) for p in paths]
    check_comparable(paths, runs)
    name_runs(runs)
    baseline = next((r for r in runs if r.label == "baseline"), None)
    fs, root = fsspec.core.url_to_fs(out)
    with write_errors(out):  # (write_atomic says its own failures in one line)
        fs.makedirs(root, exist_ok=True)
    write_atomic(join(out, "per-layer.png"), per_layer_plot(runs))
    write_atomic(join(out, "cost.png"), cost_plot(runs, baseline))
    lines = ["# gsae report", "", "| run | G | AMAD | mean EV/token | mean EV pooled | mean ΔCE % | mean KL | "
             "mean L0 | dead % | tokens/SAE | A s | training s | AMAD s | training ÷ baseline | "
             "total ÷ baseline |", "|" + " --- |" * 15]
    for run in runs:
        amad = f"{run.amad:.3f}" if run.amad is not None else "-"
        lines.append(f"| {run.name} | {len(run.groups)} | {amad} | "
                     f"{_cell(run.mean('explained_variance_per_token'), '.3f')} | "
                     f"{_cell(run.mean('explained_variance'), '.3f')} | {_cell(run.mean('delta_ce_percent'), '.2f')} | "
                     f"{_cell(run.mean('kl_divergence'), '.4f')} | {_cell(run.mean('l0'), '.1f')} | "
                     f"{_cell(100 * run.mean('dead_fraction'), '.1f')} | "
                     f"{run.tokens_per_sae:,} | {_cell(run.activation_seconds(), '.1f')} | {run.train_seconds:.1f} | "
                     f"{run.grouping_seconds:.1f} | {_cell(run.cost(baseline), '.3f')} | "
                     f"{_cell(run.total_cost(baseline), '.3f')} |")
    notes = []
    covered = {run.name: sorted({r["layer"] for r in run.records}) for run in runs}
    if len({tuple(layers) for layers in covered.values()}) > 1:
        notes.append("The runs cover different layers (" + "; ".join(
            f"{name}: {layer_span(layers, '–', ', ')}" for name, layers in covered.items())
            + "): each run's means are over its own layers, and its ÷ baseline columns against the baseline's time "
              "over those layers (its share of the baseline SAEs' own step seconds); empty where the baseline lacks "
              "some of them, or records no per-SAE seconds.")
    if sum(run.label == "baseline" for run in runs) > 1:
        notes.append(f"Several baselines: the ÷ baseline columns are against the first given, {baseline.name}.")
    if baseline is None:
        notes.append("No baseline among the runs (a run of `gsae train --baseline`): the ÷ baseline columns are "
                     "left empty.")
    for note in dict.fromkeys(run.cache_note for run in runs if run.cache_note):
        notes.append(f"A s and total ÷ baseline are left empty: {note}; pass --cache-seconds.")
    reread = [run.name for run in runs if run.tokens_per_sae > run.cache_tokens]
    if reread:
        notes.append(f"{'Every run' if len(reread) == len(runs) else ', '.join(reread)} trained on more tokens per "
                     f"SAE than the cache holds ({runs[0].cache_tokens:,}): A s is the whole cache's time, not scaled up.")
    if any(run.mean("delta_ce_percent") != run.mean("delta_ce_percent") for run in runs):
        notes.append("ΔCE and KL are left empty for runs evaluated with `--windows 0`.")
    lines += [""] + notes if notes else []
    lines += ["", COST_NOTE, "", "The paper (Pythia, mean over layers, per-token EV, baseline vs group SAEs at G*; "
              "compute is its total cost A + T·G over A + T·L):", "",
              "| model | EV baseline | EV group | ΔCE % baseline | ΔCE % group | compute ÷ baseline |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {p['model']} | {p['ev_baseline']:.3f} | {p['ev_group']:.3f} | {p['dce_baseline']:.2f} | "
              f"{p['dce_group']:.2f} | {p['cost']:.2f} |" for p in PAPER]
    layers = sorted({r["layer"] for run in runs for r in run.records})
    lines += ["", "## Per layer: per-token explained variance / ΔCE %", "",
              "| layer | " + " | ".join(run.name for run in runs) + " |", "|" + " --- |" * (len(runs) + 1)]
    for layer in layers:
        cells = []
        for run in runs:
            record = next((r for r in run.records if r["layer"] == layer), None)
            cells.append(f"{_cell(record.get('explained_variance_per_token'), '.3f')} / "
                         f"{_cell(record.get('delta_ce_percent'), '.2f')}"
                         if record else "-")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines += ["", "![EV and ΔCE per layer](per-layer.png)", "", "![quality against cost](cost.png)", ""]
    write_atomic(join(out, "report.md"), "\n".join(lines))
    return Report(out, "\n".join(lines))
