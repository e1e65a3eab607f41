"""The `velora compare` output folder: which arguments its results belong to, and which methods are done.

``compare.json`` records the shared setting and every method's TrainConfig. A re-run with the same arguments
reuses each method whose ``runs/<method>/result.json`` is complete and retrains the rest; a run with other
arguments is refused (one line) instead of mixing or overwriting results.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from velora.experiments.common import write_json

RECORD = "compare.json"
# what a compare run writes into its folder (``--fresh`` removes exactly these)
OUTPUTS = ("runs", "results.json", "results.md", "compare.png", RECORD)


def run_folder(out: Path, method: str) -> Path:
    return Path(out) / "runs" / method.replace("+", "-")


def _plain(data: Any) -> Any:
    """``data`` as it reads back from JSON (tuples become lists), so saved and new configs compare equal."""
    return json.loads(json.dumps(data, default=str))


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    return [f"{prefix}{key} ({old.get(key)!r} -> {new.get(key)!r})" for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key)]


def _clear(out: Path) -> None:
    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def prepare_folder(out: Path, setting: dict[str, Any], configs: dict[str, dict[str, Any]], fresh: bool,
                   say) -> None:
    """Check ``out`` can take this run (refusing other arguments in one line) and record it in compare.json."""
    out = Path(out)
    setting, configs = _plain(setting), _plain(configs)
    record_path = out / RECORD
    if out.exists() and any(out.iterdir()):
        if not record_path.exists():
            earlier = (out / "results.json").exists() and (out / "runs").is_dir()
            if not earlier:
                raise ValueError(f"--out {out} is not empty and is not a velora compare folder; choose an empty "
                                 "or new --out")
            if not fresh:
                raise ValueError(f"--out {out} holds a velora compare from an older version (no {RECORD}); pass "
                                 "--fresh to replace it or choose another --out")
            _clear(out)
            say(f"--fresh: replaced the earlier results in {out}")
        elif fresh:
            _clear(out)
            say(f"--fresh: replaced the earlier results in {out}")
        else:
            record = json.loads(record_path.read_text())
            differs = _differences(record["setting"], setting)
            for method, config in configs.items():
                # a finished method must match (fields the setting does not already name: the lr, ...); an
                # unfinished one (stopped, or failed) may be retried with other method options
                if method in record["methods"] and _completed(run_folder(out, method)):
                    old = {k: v for k, v in record["methods"][method].items() if k not in setting}
                    differs += _differences(old, {k: v for k, v in config.items() if k not in setting},
                                            prefix=f"{method}.")
            if differs:
                raise ValueError(f"--out {out} holds a velora compare with other arguments ({'; '.join(differs)}); "
                                 "choose another --out, or pass --fresh to replace it")
            configs = {**record["methods"], **configs}
    out.mkdir(parents=True, exist_ok=True)
    write_json(record_path, {"setting": setting, "methods": configs})


def _completed(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "result.json").read_text()).get("status") == "completed"
    except (OSError, json.JSONDecodeError):
        return False


def finished_result(run_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The earlier result of this method when it completed with exactly ``config``, else None."""
    path = Path(run_dir) / "result.json"
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:  # half-written by a killed run: train it again
        return None
    complete = result.get("status") == "completed" and "wall_s" in result
    return result if complete and result.get("config") == _plain(config) else None
