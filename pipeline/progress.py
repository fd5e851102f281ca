"""Rich progress bars shared by the stages: count, rate per second and ETA."""

from __future__ import annotations

import threading
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


def _duration(seconds: float) -> str:
    """H:MM:SS, with the days in front from one day on (``3d 04:05:06``)."""
    days, rest = divmod(int(seconds), 86400)
    clock = time.strftime("%H:%M:%S", time.gmtime(rest))
    return f"{days:,}d {clock}" if days else clock


def _mean_speed(task: Task) -> float | None:
    """Items per second since the task started; rich estimates over recent updates only, so slow rows
    get none. ``task.fields["resumed_at"]``: where a resumed task started counting (not done in this process).
    A finished task's time ends where it finished (rich's ``elapsed`` goes on growing after that)."""
    seconds = task.finished_time if task.finished else task.elapsed
    if not seconds:
        return None
    return (task.completed - task.fields.get("resumed_at", 0)) / seconds


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``512 tok/s``."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        # a finished bar: the rate over the whole task, as the summary gives it (rich's is its last estimate,
        # which leaves out the time before the first update: a resumed cache's first batch, say)
        speed = (_mean_speed(task) or task.finished_speed) if task.finished else (task.speed or _mean_speed(task))
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")


class CountColumn(ProgressColumn):
    """``4,080/6,000``: done of the total, with thousands separators as the plain lines write them (rich's
    MofNCompleteColumn writes ``4080/6000``)."""

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text(f"{task.completed:,.0f}", style="progress.download")
        total = f"{task.total:,.0f}"  # the count padded to the total's width: the bar keeps its place as it fills
        return Text(f"{task.completed:>{len(total)},.0f}/{total}", style="progress.download")


class RemainingColumn(TimeRemainingColumn):
    """rich's ETA, with the days in front from one day on: rich's own shows hours past 24 (``79658:37:49``
    for a huge ``--tokens``)."""

    def render(self, task: Task) -> Text:
        remaining = None if task.finished or task.total is None else task.time_remaining
        if remaining is not None and remaining >= 86400:
            return Text(_duration(remaining), style="progress.remaining")
        return super().render(task)


class LoggedProgress(Progress):
    """A rich Progress that, where its console is not a terminal (a log file, a batch job), also prints
    one plain line per task every ``every`` seconds: rich draws nothing there until the end."""

    def __init__(self, *columns, unit: str = "tok", every: float = 15.0, rate: bool = True, **kwargs):
        """``rate``: the lines name the rate (False where an item takes seconds or more: it reads ``0 unit/s``)."""
        super().__init__(*columns, **kwargs)
        self._unit, self._every, self._rate = unit, every, rate
        self._stopped = threading.Event()
        self._logger: threading.Thread | None = None
        self._running = False

    def start(self) -> None:
        self._running = True
        super().start()
        if not self.disable and not self.console.is_terminal and not self.console.quiet:
            self._stopped.clear()
            self._logger = threading.Thread(target=self._log, name="gsae-progress-log", daemon=True)
            self._logger.start()

    def stop(self) -> None:
        """Stop (again: nothing; rich would print another blank line where the console is not a terminal)."""
        if not self._running:
            return
        self._running = False
        if self._logger is not None:
            self._stopped.set()
            self._logger.join()
            self._logger = None
        super().stop()

    def _log(self) -> None:
        while not self._stopped.wait(self._every):
            for task in self.tasks:
                if task.finished:
                    continue
                speed = task.speed or _mean_speed(task)
                eta = (task.total - task.completed) / speed if speed and task.total else None
                self.console.print(
                    f"{Text.from_markup(task.description).plain}: {task.completed:,.0f}"
                    + (f"/{task.total:,.0f}" if task.total else "") + f" {self._unit}"
                    + (f", {speed:,.0f} {self._unit}/s" if speed and self._rate else "")
                    + f", {_duration(task.elapsed or 0)} elapsed"
                    + (f", ETA {_duration(eta)}" if eta is not None else "")
                    + (f", {task.fields['stats']}" if task.fields.get("stats") else ""),
                    highlight=False, markup=False, soft_wrap=True)


def make_progress(console: Console, unit: str = "tok") -> Progress:
    """A progress bar with count, rate, elapsed time and ETA (and a line every 15 s where the console
    is not a terminal)."""
    return LoggedProgress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        CountColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        RemainingColumn(),
        console=console,
        transient=False,
        unit=unit,
    )
