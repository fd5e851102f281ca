"""`gsae run`: the paper's comparison on one cache, reusing whatever already exists.

Group (amad and uniform), train the per-layer baseline, AMAD partitions at G* and its neighbours and a
uniform partition at G*, evaluate each run, and write the report. The cache is never rebuilt; a run
with a summary.json is not retrained, one with a checkpoint is resumed, one with an eval.json made with
this command's evaluation arguments is not re-evaluated (one made with others, or recording none, is).
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.errors import GsaeError
from pipeline.evaluate import (check_eval_arguments, check_held_out, eval_argument_changes, eval_arguments, evaluate_run,
                                read_eval)
from pipeline.group import GroupingInUse, run_group
from pipeline.grouping import layer_span, parse_layers, partition_text
from pipeline.report import Report, build_report
from pipeline.run import STATES, Run, join, write_atomic
from pipeline.requests import EVAL_TOKENS, GroupRequest, PaperRequest, TrainRequest
from pipeline.train import check_existing, check_sae_shape, plan, train, validate_request
from stores import ActivationStore
from stores.held_out import split_chunks


def _check(request: PaperRequest) -> None:
    """Refuse, before any grouping or training, what a training run or an evaluation below would refuse
    later (by their own checks), and group counts the cache cannot have."""
    validate_request(TrainRequest(cache=request.cache, tokens=request.tokens, expansion=request.expansion,
                                  batch_size=request.batch_size, baseline=True))
    check_eval_arguments(EVAL_TOKENS, request.windows, None)
    given = f"--groups '{','.join(map(str, request.groups))}'"
    if any(g < 1 for g in request.groups):
        raise GsaeError(f"{given}: every G must be 1 or more (got {min(request.groups)})")
    if len(set(request.groups)) < len(request.groups):
        raise GsaeError(f"{given}: G {next(g for g in request.groups if request.groups.count(g) > 1)} is given twice")
    store = ActivationStore.open(request.cache)
    check_sae_shape(store.d_model, request.expansion, None)
    n_grouped = len(parse_layers(request.layers, store.n_layers))  # the layers run groups (in the attributes)
    if request.groups:
        if max(request.groups) > n_grouped:
            raise GsaeError(f"{given}: G can be at most {n_grouped}, the number of grouped layers of {request.cache} "
                            f"(got {max(request.groups)})")
    try:  # the held-out slice every run below is evaluated on
        held_out = split_chunks(store, TrainRequest.eval_fraction)[1]
    except ValueError as exc:
        raise GsaeError(str(exc)) from None
    check_held_out(store, store.chunk_rows(held_out[0])[0], request.windows)


def run_paper(request: PaperRequest, console: Any) -> Report:
    _check(request)
    layers = f" --layers {request.layers}" if request.layers is not None else ""
    try:
        amad = run_group(GroupRequest(cache=request.cache, metric="amad", layers=request.layers), console).grouping
        run_group(GroupRequest(cache=request.cache, metric="uniform", layers=request.layers), console)
    except GroupingInUse as exc:  # `gsae run` has no --force: it groups with `gsae group`'s other defaults
        raise GsaeError(f"{exc.problem}; `gsae run` groups with `gsae group`'s defaults: {exc.action} first with "
                        f"`gsae group --cache {request.cache} --metric {exc.metric}{layers} --force`") from None
    chosen, n_layers = amad.chosen, len(amad.layers)
    counts = request.groups or sorted({max(1, chosen - 1), chosen, min(n_layers, chosen + 1)})
    plans = [("baseline", dict(baseline=True))]
    plans += [(f"amad-g{n}", dict(groups=n, metric="amad")) for n in counts]
    plans += [(f"uniform-g{chosen}", dict(groups=chosen, metric="uniform"))]
    slug = request.cache.rstrip("/").rsplit("/", 1)[-1]
    steps = []  # every run folder checked before any trains: a refusal does not come after hours of training
    for label, options in plans:
        path = join(request.out, f"{slug}-{label}")
        train_request = TrainRequest(cache=request.cache, tokens=request.tokens, expansion=request.expansion,
                                     batch_size=request.batch_size, out=str(path), **options)
        config = Run.read_config(path)
        if config is not None:  # as `gsae train` will: stop at a finished or checkpointed run made otherwise
            check_existing(Run(path, config), train_request, plan(train_request)[0])
        state = Run(path, config).state if config is not None else None
        steps.append((label, path, train_request, config, state))
    console.print(f"layers {layer_span(amad.layers, '–')}: G* = {chosen} by AMAD, {partition_text(amad.groups_for(chosen))}")
    wanted = eval_arguments(tokens=EVAL_TOKENS, windows=request.windows)  # what evaluate_run below is asked
    runs = []
    models: dict = {}  # the language model, loaded by the first evaluation, for the others
    for label, path, train_request, config, state in steps:
        if state is None or STATES.index(state) < STATES.index("trained"):
            verb = "continuing" if config is not None else "training"
            console.print(f"[bold]{verb} {label}[/] → {path}")
            train(train_request, console)  # an unfinished run with the same arguments continues
        else:
            console.print(f"{label}: trained already ({path})")
            if Run(path, config).has_checkpoints():  # a kill after its summary left them: train removes them
                train(train_request, console)  # (only then: a trained run may lie where this process cannot write)
        reason = _evaluation_needed(Run.open(path), wanted)
        if reason is not None:
            console.print(f"evaluating {label}" + (f" again: {reason}" if reason else ""))
            evaluate_run(path, tokens=wanted["tokens"], windows=wanted["windows"],
                         context_length=wanted["context_length"], console=console, models=models)
        else:
            console.print(f"{label}: evaluated already, with these arguments")
        runs.append(path)
    report = build_report(runs, join(request.out, f"{slug}-report"))
    write_atomic(join(report.folder, "runs.json"), json.dumps(runs, indent=1))
    return report


def _evaluation_needed(run: Run, wanted: dict[str, Any]) -> str | None:
    """None when ``run`` holds an evaluation made with ``wanted``; otherwise why it is (re-)evaluated
    ("" when it has none yet)."""
    if run.state != "evaluated":
        return ""
    try:
        recorded = (read_eval(run) or {}).get("arguments")
    except GsaeError as exc:
        return str(exc).split(";")[0]
    if not isinstance(recorded, dict):
        return "its eval.json does not record the arguments it was made with"
    changes = eval_argument_changes(recorded, wanted)
    return f"its eval.json was made with other arguments ({'; '.join(changes)})" if changes else None
