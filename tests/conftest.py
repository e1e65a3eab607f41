"""Shared test settings: one intra-op thread per test, so the suite's numerics do not depend on the
machine's core count and parallel test runs do not fight over 2 cores; a small real-text corpus file."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from rank_results import once_per_session


def pytest_collection_modifyitems(config, items):
    """Run the tests marked ``slow`` (8-30 s each: subprocess launches, whole small experiments) and the
    gloo modules' first tests (they start a 2-rank spawn) first: under ``-n`` the workers then share them at the
    start instead of one worker finishing a long test while the other idles at the end."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("slow") else 1)  # stable: the file order otherwise


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """~45 KB of real text: a few standard-library modules concatenated (read at run time, never shipped)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("".join((root / name).read_text() for name in ("textwrap.py", "bisect.py", "colorsys.py",
                                                                     "fnmatch.py", "keyword.py")))
    return path


@pytest.fixture(scope="session")
def torchrun_train(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One `torchrun --nproc_per_node 2 -m velora train` (gloo on CPU, FLoRA compressed accumulation + VeLoRA, JSON
    report, progress bar on), shared by every test of a launch under torchrun: a launch starts three interpreters
    (~25 s of CPU). Returns (its --out folder, the finished process with stdout and stderr)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "velora", "train", "--method", "flora+velora", "--model", "llama-tiny",
               "--tokenizer", "byte", "--max-train-chars", "100000", "--steps", "4", "--batch-size", "2",
               "--seq-len", "32", "--accumulation-steps", "2", "--flora-accumulation", "--flora-rank", "8",
               "--lr", "3e-3", "--warmup-steps", "1", "--eval-batches", "1", "--no-memory",
               "--json", "--out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}

    def launch(folder: Path) -> None:
        done = subprocess.run([*command, str(folder / "run")], capture_output=True, text=True, timeout=240, env=env)
        (folder / "process.json").write_text(json.dumps([done.returncode, done.stdout, done.stderr]))

    folder = once_per_session(tmp_path_factory, "torchrun", launch)  # once, whichever xdist worker asks first
    returncode, stdout, stderr = json.loads((folder / "process.json").read_text())
    return folder / "run", subprocess.CompletedProcess(command, returncode, stdout, stderr)
