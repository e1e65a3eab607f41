"""Helpers shared by the experiments: run folders, markdown tables, JSON and plots."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

MIB = 2**20


def fresh_dir(path: Path) -> Path:
    """An empty run folder. Only folders this harness created (holding its config.json) are wiped."""
    path = Path(path)
    if path.exists():
        if not (path / "config.json").exists() and any(path.iterdir()):
            raise ValueError(f"{path} exists and is not a velora run folder; choose another --out")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def mib(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else n_bytes / MIB


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(v) if not isinstance(v, str) else v for v in row) + " |")
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> None:
    tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what platform knows)."""
    import platform

    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def package_versions(names: Sequence[str] = ("torch", "transformers", "peft", "tokenizers", "safetensors",
                                             "numpy")) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def stdlib_sha256() -> str:
    """Fingerprint of the running Python's standard library (file list and sizes), the default corpus."""
    from velora.training.data import _stdlib_fingerprint, stdlib_files, stdlib_root

    root = stdlib_root()
    return _stdlib_fingerprint(root, stdlib_files(root))


def environment() -> dict[str, Any]:
    """What a result depends on beyond its arguments: results are bitwise only on the same CPU model and library
    versions (float summation order differs between CPU kernels and releases)."""
    import platform

    return {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "machine": platform.machine(),
            "platform": platform.platform(), "packages": package_versions(), "python_stdlib_sha256": stdlib_sha256(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is missing (plots are then skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def smooth(values: Sequence[float], window: int = 10) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def rows_to_console(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str) -> None:
    """Print a table with rich (stdout)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for header in headers:
        table.add_column(header, justify="right" if header not in ("method", "setting") else "left")
    for row in rows:
        table.add_row(*[fmt(v) if not isinstance(v, str) else v for v in row])
    Console(width=160).print(table)
