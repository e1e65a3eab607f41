"""Shared test settings: one intra-op thread per test, so the suite's numerics do not depend on the
machine's core count and parallel test runs do not fight over 2 cores; a small real-text corpus file."""

import sysconfig
from pathlib import Path

import pytest
import torch


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
