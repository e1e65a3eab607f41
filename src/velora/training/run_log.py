"""What a run reports while it trains: ``log.csv`` and TensorBoard events (``RunLog``, process rank 0 only) and a
progress bar on stderr (``Progress``)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from velora.training.runfiles import RunFolderError, open_for_append, refuse_symlink, why, write_atomic

LOG_COLUMNS = ("step", "loss", "ppl", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s")


class RunLog:
    """CSV log (always) and TensorBoard events (when tensorboard is installed)."""

    def __init__(self, out_dir: Path, resume_step: int, tensorboard: bool = True) -> None:
        self.path = out_dir / "log.csv"
        refuse_symlink(self.path)
        rows = []
        if resume_step > 0 and self.path.exists():
            with open(self.path) as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        text = io.StringIO()
        writer = csv.DictWriter(text, LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(self.path, text.getvalue())  # drop rows past the resumed step
        self.rows = [{k: float(v) for k, v in r.items()} for r in rows]
        self._fh = open_for_append(self.path)  # O_NOFOLLOW: never appends through a symlink
        self._writer = csv.DictWriter(self._fh, LOG_COLUMNS)
        self._tb = None
        if tensorboard:
            refuse_symlink(out_dir / "tensorboard")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                self._tb = None

    def write(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        try:
            self._writer.writerow(row)
            self._fh.flush()
        except OSError as err:
            raise RunFolderError(f"cannot append to {self.path}: {why(err)}") from None
        if self._tb is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                self._tb.add_scalar(f"train/{key}", row[key], int(row["step"]))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._tb is not None:
            self._tb.add_scalar(tag, value, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A rich progress bar on stderr (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, start: int, title: str) -> None:
        self._bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
                             console=Console(stderr=True), transient=False)
        self._task = self._bar.add_task(title, total=total, completed=start, stats="")
        self._bar.start()

    def update(self, step: int, stats: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, stats=stats)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def rss_mib() -> float:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    except ImportError:  # Windows
        return float("nan")
