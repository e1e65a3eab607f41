"""One progress display for the methods `velora compare` trains (in worker processes or in turn).

On a terminal it is a live rich table on stderr (method, state, step, loss, elapsed, ETA); elsewhere (a log
file, CI) it prints one plain line with every running method at most every ``plain_every_s`` seconds.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class MethodState:
    method: str
    total_steps: int
    log_path: Path
    state: str = "queued"  # queued / running / done / reused / failed
    step: int = 0
    loss: float | None = None
    train_s: float | None = None  # seconds spent in the steps so far (the row's elapsed_s)
    started: float | None = None  # perf_counter when training began here
    finished_text: str = ""
    finished_s: float | None = None  # wall seconds a finished method took here

    def eta_s(self) -> float | None:
        """Remaining seconds at this method's own step pace so far (None before the first step); the
        one-off start-up (imports, model, data) is not extrapolated."""
        if self.state != "running" or self.train_s is None or self.step == 0:
            return None
        return self.train_s / self.step * (self.total_steps - self.step)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressBoard:
    """``board.start()``, then ``running(method)``, ``step(method, row)``, ``done(method, text)``; ``stop()``."""

    def __init__(self, states: list[MethodState], enabled: bool = True, stream=None, live: bool | None = None,
                 plain_every_s: float = 30.0) -> None:
        self.states = {s.method: s for s in states}
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.plain_every_s = plain_every_s
        self._live = None
        self._started = False
        self._last_plain = 0.0

    # ---- events --------------------------------------------------------------------------------------
    def start(self) -> None:
        if not self.enabled:
            return
        self._started = True
        if self.live:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self._table(), console=Console(file=self.stream), refresh_per_second=2,
                              get_renderable=self._table)
            self._live.start()
        else:
            self._last_plain = time.perf_counter()
            self._print_plain()

    def running(self, method: str) -> None:
        state = self.states[method]
        state.state, state.started = "running", time.perf_counter()
        self.tick()

    def step(self, method: str, row: dict[str, float]) -> None:
        state = self.states[method]
        state.step, state.loss = int(row["step"]), float(row["loss"])
        state.train_s = row.get("elapsed_s")
        self.tick()

    def done(self, method: str, text: str, state: str = "done", wall_s: float | None = None) -> None:
        entry = self.states[method]
        entry.state, entry.finished_text, entry.finished_s = state, text, wall_s
        if state in ("done", "reused"):
            entry.step = entry.total_steps
        self.tick()

    def tick(self) -> None:
        """Plain mode: one line when ``plain_every_s`` has passed (the live table redraws by itself)."""
        if not self._started or self.live:
            return
        if time.perf_counter() - self._last_plain >= self.plain_every_s:
            self._last_plain = time.perf_counter()
            self._print_plain()

    def stop(self) -> None:
        self._started = False
        if self._live is not None:
            self._live.stop()
            self._live = None

    # ---- rendering -----------------------------------------------------------------------------------
    def _cells(self, state: MethodState, now: float) -> tuple[str, str, str, str, str]:
        elapsed = state.finished_s
        if state.state == "running" and state.started is not None:
            elapsed = now - state.started
        loss = "–" if state.loss is None else f"{state.loss:.3f}"
        steps = f"{state.step}/{state.total_steps}"
        status = state.finished_text if state.state in ("done", "reused", "failed") else state.state
        return status, steps, loss, duration(elapsed), duration(state.eta_s())

    def _table(self):
        from rich.table import Table

        now = time.perf_counter()
        table = Table(title="velora compare", caption="per-step logs: " + self._log_hint(), caption_justify="left")
        for column in ("method", "state", "step", "loss", "elapsed", "ETA"):
            table.add_column(column, justify="left" if column in ("method", "state") else "right")
        for state in self.states.values():
            table.add_row(state.method, *self._cells(state, now))
        return table

    def _log_hint(self) -> str:
        paths = [s.log_path for s in self.states.values()]
        common = paths[0].parent.parent if paths else Path(".")
        return f"{common}/<method>/log.csv"

    def _print_plain(self) -> None:
        now = time.perf_counter()
        parts = []
        for state in self.states.values():
            if state.state == "running":
                _status, steps, loss, elapsed, eta = self._cells(state, now)
                parts.append(f"{state.method} {steps} loss {loss} ETA {eta}")
        waiting = sum(s.state == "queued" for s in self.states.values())
        finished = sum(s.state in ("done", "reused") for s in self.states.values())
        text = "; ".join(parts) if parts else "no method running yet"
        print(f"progress: {text} ({finished} done, {waiting} queued; per-step logs in {self._log_hint()})",
              file=self.stream, flush=True)
