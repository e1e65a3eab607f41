"""The frozen control rows of the fine-tuning benches (issue 17), run alone beside the LoRA reference.

`velora bench layers | init | subtoken | convergence` each carry the control row now; this script runs only what a
reader needs to put the control beside the stored tables without re-running every bench: the shared base model
(`velora bench`'s, 200 steps), the LoRA reference of layers/init/subtoken (it must reproduce the stored 247.82,
which shows the base and data are the same), their common control (v_proj + down_proj LoRA-A frozen, 80 steps) and
the convergence bench's control (4 epochs, per-epoch ppl).

    python benchmarks/bench_controls.py --out /tmp/controls
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from velora.experiments import ablation
from velora.experiments.ablation import Variant
from velora.experiments.common import write_json
from velora.experiments.control import frozen_control
from velora.experiments.convergence import convergence_variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (the base model is cached in it)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    say = ablation.stderr_say
    base = ablation.ensure_base(args.out / "shared", ablation.BASE_STEPS, False, say)
    steps = ablation.FINETUNE["steps"]
    convergence, steps_per_epoch = convergence_variants(base, None)
    variants = [Variant("LoRA (no VeLoRA)", ablation.finetune_config(base, "lora", steps=steps)),
                frozen_control(base, steps), convergence[2]]
    rows = ablation.run_variants(variants, args.out, False, say)
    summary = {row["label"] if index < 2 else "convergence: " + row["label"]:
               {"val_ppl": row["val_ppl"], "activation_bytes": row["activation_bytes"],
                "val_history": row["val_history"]} for index, row in enumerate(rows)}
    summary["steps_per_epoch"] = steps_per_epoch
    write_json(args.out / "results.json", summary)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
