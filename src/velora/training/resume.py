"""The run folder: what ``--resume`` checks before it continues a run, and the run record it keeps (``run.json``).

``run.json`` holds the fingerprint of the training text, the tokenizer's identity and a history of starts
and resumes (with what an explicit flag allowed to change). ``config.json`` stays the plain ``TrainConfig``.

A resume:
* needs ``--out`` to be an existing run folder with a checkpoint, not a finished run;
* uses the tokenizer saved in the run folder (never retrains one) and refuses changed training text
  (another file content, another Python's stdlib) unless ``allow_data_change``;
* refuses changed arguments, except ``lr`` / ``warmup_steps`` with ``allow_lr_change`` (the schedule is a
  pure function of the step, so the new values hold from the resumed step on).
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from velora.training.runfiles import STEP_FOLDER, ensure_folder, remove_stale_temporaries, write_atomic

LR_FIELDS = ("lr", "warmup_steps")
# fingerprint entries that say where the text lies, not what it is
LOCATION_KEYS = frozenset({"path", "stdlib_root"})


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a run-folder file; one line naming the file when it is not one."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore it or start the run over") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a JSON object; restore it or start over")
    return data


def checkpoint_step(checkpoint: Path) -> int:
    if not STEP_FOLDER.fullmatch(checkpoint.name):
        raise ValueError(f"checkpoint folder {checkpoint} is not named step-NNNNNNN; pass a run folder")
    return int(checkpoint.name.split("-")[1])


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its VeLoRA section as the whole ``VeLoRAConfig`` it builds: a section that spells out a
    default (the CLI writes every VeLoRA flag) equals one that leaves it out (an older run, the Python API)."""
    from velora.core.config import VeLoRAConfig

    if not isinstance(config.get("velora"), dict):
        return config
    try:
        return {**config, "velora": VeLoRAConfig.from_dict(config["velora"]).to_dict()}
    except (TypeError, ValueError):  # not a config this version builds: compared as written
        return config


def check_resume_arguments(previous: dict[str, Any], current: dict[str, Any], saved_config: Path,
                           allow_lr_change: bool, allow_data_change: bool) -> dict[str, list[Any]]:
    """The allowed changes ``{field: [old, new]}``; raises for any other difference."""
    previous, current = _comparable(previous), _comparable(current)
    differs = sorted(k for k, v in current.items() if previous.get(k) != v)
    allowed = (set(LR_FIELDS) if allow_lr_change else set()) | ({"data"} if allow_data_change else set())
    refused = [k for k in differs if k not in allowed]
    if refused:
        hint = ("; only --lr and --warmup-steps may change on resume, with --allow-lr-change" if
                set(refused) <= set(LR_FIELDS) else "")
        raise ValueError(f"--resume: the arguments differ from the saved run in {refused}; pass the same "
                         f"arguments as {saved_config}{hint}")
    return {k: [previous.get(k), current[k]] for k in differs}


def check_not_finished(out: Path, step: int, steps: int, stop_at_step: int | None) -> None:
    if step >= steps:
        raise ValueError(f"--resume: {out} is finished ({step} of {steps} steps); nothing to continue. To train "
                         f"longer start a new run from it: --init-from {out} --out NEW_DIR (--steps cannot change "
                         "on resume: it shapes the learning-rate schedule)")
    if stop_at_step is not None and stop_at_step <= step:
        raise ValueError(f"--stop-at-step {stop_at_step} is not after the resumed step {step}; pass a later step")


def _identity(fingerprint: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fingerprint.items() if k not in LOCATION_KEYS}


def check_same_data(out: Path, fingerprint: dict[str, Any], allow_data_change: bool) -> bool:
    """True when the text differs from the one the run started on (allowed); raises unless allowed."""
    record_path = out / "run.json"
    if not record_path.exists():
        return False  # a run from before run.json existed: nothing to compare against
    saved = _identity(read_json(record_path).get("data_fingerprint", {}))
    current = _identity(fingerprint)
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if not changed:
        return False
    if allow_data_change:
        return True
    shown = ", ".join(f"{k}: {str(saved.get(k))[:24]} -> {str(current.get(k))[:24]}" for k in changed[:3])
    raise ValueError(f"--resume: the training text changed since this run started ({shown}); resume with the "
                     "same --data and Python, or pass --allow-data-change to train on the new text with the run's "
                     f"saved tokenizer ({out / 'tokenizer.json'})")


def saved_tokenizer(out: Path):
    """The tokenizer the run was trained with (``out/tokenizer.json``), under its recorded name; None for a
    run folder that has none yet."""
    from velora.training.tokenizer import load_tokenizer

    path = out / "tokenizer.json"
    if not path.exists():
        return None
    tokenizer = load_tokenizer(str(path))
    record = out / "run.json"
    if record.exists():
        tokenizer.name = read_json(record).get("tokenizer", {}).get("name", tokenizer.name)
    return tokenizer


def record_run(out: Path, step: int, fingerprint: dict[str, Any], tokenizer, changes: dict[str, Any]) -> None:
    """Write ``run.json``: on a fresh start the data fingerprint and tokenizer; on a resume one more history
    entry (with what was allowed to change). The first fingerprint stays the reference for later resumes
    unless the data change was allowed, in which case the new text becomes the reference."""
    path = out / "run.json"
    record = read_json(path) if step > 0 and path.exists() else {"version": 1, "history": []}
    event = {"event": "resume" if step > 0 else "start", "step": step,
             "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **({"changed": changes} if changes else {})}
    record["history"].append(event)
    if step == 0 or "data_changed" in changes or "data_fingerprint" not in record:
        record["data_fingerprint"] = fingerprint
    record["tokenizer"] = {"name": tokenizer.name, "identity": tokenizer.identity(),
                           "vocab_size": tokenizer.vocab_size}
    write_atomic(path, json.dumps(record, indent=2))


def open_run_folder(config, out: Path, resume: bool, stop_at_step: int | None, allow_lr_change: bool,
                    allow_data_change: bool, main_process: bool = True) -> tuple[Path | None, dict[str, Any]]:
    """Check the run folder against the resume rules, remove stale temporaries, write ``config.json``. Returns the
    checkpoint to resume from (None for a fresh run) and the changes the flags allowed. Only the main process
    (``main_process``) writes or removes files."""
    from velora.training.checkpoint import Checkpointer

    if resume and not out.is_dir():
        raise ValueError(f"--resume: {out} does not exist; pass the --out folder of the run to continue")
    ensure_folder(out)
    if main_process:
        remove_stale_temporaries(out)  # left by a run killed mid-write (or by a full disk)
    saved_config = out / "config.json"
    checkpoint, changes = None, {}
    if resume:
        checkpoint = Checkpointer(out).latest()
        if checkpoint is None:
            raise ValueError(f"--resume: {out} has no checkpoint; run without --resume first")
        changes = check_resume_arguments(read_json(saved_config), config.to_dict(), saved_config, allow_lr_change,
                                         allow_data_change)
        check_not_finished(out, checkpoint_step(checkpoint), config.steps, stop_at_step)
    elif Checkpointer(out).latest() is not None:
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if main_process:
        write_atomic(saved_config, json.dumps(config.to_dict(), indent=2))
    return checkpoint, changes


UNSTARTED_FILES = frozenset({"config.json", "run.json", "tokenizer.json"})  # what a start writes before step 1


def remove_unstarted_folder(out: Path) -> None:
    """Remove the run folder a fresh start created when that start failed before its first step (a bad model
    config, missing data, the memory check): only if it holds nothing but what a start writes, never a
    checkpoint, a log or a file of the user's."""
    if out.is_dir() and not out.is_symlink() and {p.name for p in out.iterdir()} <= UNSTARTED_FILES:
        shutil.rmtree(out, ignore_errors=True)


@contextmanager
def removed_if_start_fails(out: Path | None, resume: bool, main_process: bool):
    """Around a run's start: a folder this start creates is removed again if the start raises
    (``remove_unstarted_folder``); a resumed run's or an existing folder is never touched."""
    fresh = out is not None and not resume and not out.exists() and not out.is_symlink()
    top = out
    while fresh and not top.parent.exists():  # the highest folder this start will create (runs/ for the default)
        top = top.parent
    try:
        yield
    except BaseException:
        if fresh and main_process:
            remove_unstarted_folder(out)
            for folder in [out, *out.parents]:  # the now-empty parents it created, up to ``top``
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
                if folder == top:
                    break
        raise


def record_start(out: Path, step: int, corpus, tokenizer, changes: dict[str, Any], resumed: bool,
                 allow_data_change: bool) -> None:
    """Save the run's tokenizer and add this start (or resume) to ``run.json``, noting allowed changes."""
    write_atomic(out / "tokenizer.json", tokenizer.to_str())
    data_changed = resumed and check_same_data(out, corpus.fingerprint, allow_data_change)
    allowed = {**changes, **({"data_changed": True} if data_changed else {})}
    record_run(out, step, corpus.fingerprint, tokenizer, allowed)
