"""What a new user meets first: `velora demo`, `velora --version`, and the sub-packages reachable from
``import velora``."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch


def _reference_activation_bytes(method: str, batch: int, seq: int, sub_token_size: int) -> int:
    """The meter on a freshly built demo model (byte tokenizer: 256 byte ids + end-of-text), with the loss kept
    alive until the block ends (saved bytes depend on shapes only, not on the trained weights)."""
    from velora import VeLoRAConfig, apply_velora
    from velora.memory import SavedActivationMeter
    from velora.training.models import build_config, build_model

    torch.manual_seed(0)
    model = build_model(build_config("llama-small", vocab_size=257))
    if method == "velora":
        apply_velora(model, VeLoRAConfig(sub_token_size=sub_token_size, target_modules="paper"))
    # a batch of its own storage, as train's token blocks give: the embedding keeps the ids, and the meter counts them
    tokens = torch.randint(0, 257, (batch, seq))  # (B, S)
    with SavedActivationMeter(model) as meter:
        loss = model(input_ids=tokens, labels=tokens).loss
    del loss
    return meter.total_bytes


def test_demo_prints_the_meters_bytes(capsys):
    from velora.cli import main

    settings = ["--steps", "5", "--batch", "2", "--seq", "32", "--sub-token-size", "32"]
    assert main(["demo", *settings, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    measured = {row["method"]: row["activation_bytes"] for row in report["rows"]}
    expected = {method: _reference_activation_bytes(method, 2, 32, 32) for method in ("full", "velora")}
    assert measured == expected
    assert expected["full"] > expected["velora"] > 2**20  # a real graph, not the few bytes of a freed one
    assert report["activation_saving"] == pytest.approx(1 - expected["velora"] / expected["full"])
    # the demo is `velora train`'s loop on its data path: the same losses, bitwise
    import argparse

    from velora.cli.demo import demo_config
    from velora.training.loop import train

    args = argparse.Namespace(steps=5, batch=2, seq=32, sub_token_size=32)
    losses = [loss for _, loss in train(demo_config("velora", args), measure=False, memory_check=False,
                                        tensorboard=False)["loss_curve"]]
    assert report["rows"][1]["initial_loss"] == losses[0] and report["rows"][1]["final_loss"] == sum(losses) / 5

    assert main(["demo", *settings]) == 0
    table = capsys.readouterr().out
    printed = [float(value) for value in re.findall(r"([\d.]+) MiB", table)]
    assert printed == [round(expected["full"] / 2**20, 2), round(expected["velora"] / 2**20, 2)]
    assert f"keeps {1 - expected['velora'] / expected['full']:.1%} fewer" in table


@pytest.mark.parametrize("flag, value, message", [
    ("--batch", "0", "--batch=0 must be between 1 and 64"),
    ("--seq", "0", "--seq=0 must be between 2 and 2048"),
    ("--seq", "1000000", "--seq=1000000 must be between 2 and 2048"),
    ("--sub-token-size", "0", "--sub-token-size=0 must be >= 1"),
])
def test_demo_rejects_bad_sizes_in_one_line(flag, value, message, capsys):
    from velora.cli import main

    assert main(["demo", flag, value]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_version_flag(capsys):
    import velora
    from velora.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"velora {velora.__version__}"
    run = subprocess.run([sys.executable, "-m", "velora", "--version"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == f"velora {velora.__version__}"


@pytest.mark.slow
def test_subpackages_reachable_and_import_stays_light():
    """``velora.integrations`` / ``velora.memory`` / ``velora.optim`` resolve on first use; a bare ``import velora``
    pulls in neither transformers nor those sub-packages (checked in a fresh interpreter)."""
    # velora.integrations.distributed, not .hf: reaching hf imports transformers (~5 s of CPU in a fresh
    # interpreter); test_hf_trainer uses velora.integrations.hf itself
    code = ("import sys, velora; "
            "before = sorted(m for m in ('transformers', 'velora.integrations', 'velora.memory', 'velora.optim') "
            "if m in sys.modules); "
            "names = (velora.integrations.distributed.run_local.__name__, velora.memory.SavedActivationMeter.__name__, "
            "velora.optim.Flora.__name__); "
            "print(before, names, 'transformers' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[] ('run_local', 'SavedActivationMeter', 'Flora') False"
    import velora

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        velora.nope  # noqa: B018
    assert {"integrations", "memory", "optim"} <= set(dir(velora))
