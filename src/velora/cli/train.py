"""`velora train`: one method, one model, one corpus; progress bar, CSV/TensorBoard log, atomic
checkpoints, ``--resume``, ``--json``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from velora.core.config import INIT_STRATEGIES
from velora.core.subtoken import COEFFICIENT_SCALES
from velora.methods.options import add_option_flags, options_from_flags
from velora.methods.registry import method_names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("run")
    run.add_argument("--method", default="full",
                     help=f"training method, e.g. full, velora, lora, lora+velora, galore, flora, gradnormlorp, "
                          f"+ckpt for gradient checkpointing (all: {', '.join(method_names())})")
    run.add_argument("--model", default="llama-tiny",
                     help="preset (llama-tiny, llama-small, llama-20m, llama-60m, gpt2, ...), a config.json, "
                          "or a local/hub model directory loaded with from_pretrained")
    run.add_argument("--data", default="stdlib",
                     help="'stdlib' (offline default: this Python's stdlib source), 'stdlib-docs', a local text "
                          "file or folder, or hf:<dataset>[:<config>][:<split>]")
    run.add_argument("--tokenizer", default=None,
                     help="bpe (trained locally, cached), byte, a tokenizer.json, or 'model' "
                          "(default: 'model' for a pretrained --model, else bpe)")
    run.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size")
    run.add_argument("--steps", type=int, default=200, help="optimizer steps")
    run.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    run.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    run.add_argument("--accumulation-steps", type=int, default=1, help="micro-batches per optimizer step")
    run.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    run.add_argument("--warmup-steps", type=int, default=10, help="linear warm-up steps")
    run.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine schedule floor as a fraction of --lr")
    run.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay")
    run.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 disables)")
    run.add_argument("--seed", type=int, default=0, help="seed of the model init, batch order and projections")
    run.add_argument("--max-train-chars", type=int, default=3_000_000, help="cap on training text (characters)")
    run.add_argument("--eval-batches", type=int, default=8,
                     help="validation batches per evaluation (0: the whole validation split)")
    run.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: end only)")
    run.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: end only)")
    run.add_argument("--init-from", default=None,
                     help="start from the weights of a run/checkpoint folder of any method (adapters merged, v kept)")
    run.add_argument("--dtype", default="float32", type=_train_dtype, metavar="{float32,bfloat16}",
                     help="weights and activations dtype (fp32 / bf16 spellings accepted too)")
    run.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    run.add_argument("--parallel", default="ddp", choices=("ddp", "fsdp2"),
                     help="under torchrun: ddp (default) replicates the model; fsdp2 shards each decoder block "
                          "(fully_shard) and checkpoints through torch.distributed.checkpoint (docs/integrations.md)")
    _add_velora_arguments(parser.add_argument_group("VeLoRA (+velora methods)"))
    # one flag per option of the method configs (velora.methods.options), generated from their declarations
    add_option_flags(parser.add_argument_group("method options"))
    _add_output_arguments(parser.add_argument_group("output"))


def _add_velora_arguments(velora) -> None:
    velora.add_argument("--sub-token-size", type=int, default=32, help="M, the sub-token size")
    velora.add_argument("--velora-init", default="batch_average_once", choices=INIT_STRATEGIES,
                        help="how the projection vector v is initialised")
    velora.add_argument("--velora-targets", default="paper",
                        help="comma-separated module names or 'paper' (value + MLP down projections)")
    velora.add_argument("--velora-rank", type=int, default=1,
                        help="directions per sub-token, r (default 1, the paper's; saved scalars per token D*r/M)")
    velora.add_argument("--velora-per-group", action="store_true",
                        help="one set of directions per sub-token group instead of one shared by all groups")
    velora.add_argument("--velora-reestimate-every", type=int, default=None, metavar="K",
                        help="re-estimate the directions from the batch every K training forwards (micro-batches; "
                             "1: every forward, which trained 5-7.5 ppl worse under AdamW on compare's model, see "
                             "docs/results.md; default: never, the paper's fixed first-batch v)")
    velora.add_argument("--velora-coefficient-bits", type=int, default=None, choices=(8, 4),
                        help="keep the coefficients z as 8- or 4-bit integers with one scale per token (default: "
                             "in x's dtype, the paper's); at fp32, 8 bits with --velora-rank = M keep the paper's "
                             "bytes with every sub-token whole up to rounding, see docs/velora.md")
    velora.add_argument("--velora-coefficient-scales", default=None, choices=COEFFICIENT_SCALES,
                        help="with --velora-coefficient-bits: token_and_column (default; each coefficient divided "
                             "by its RMS over the batch first, robust to outlier features) or token")


def _add_output_arguments(out) -> None:
    out.add_argument("--out", default=None, help="run folder (default runs/<method>-<time>)")
    out.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its latest checkpoint, with its saved tokenizer")
    out.add_argument("--allow-lr-change", action="store_true",
                     help="with --resume: let --lr / --warmup-steps differ from the saved run (e.g. after a "
                          "divergence); the new schedule holds from the resumed step, recorded in run.json")
    out.add_argument("--allow-data-change", action="store_true",
                     help="with --resume: train on changed --data text, tokenized with the run's saved tokenizer "
                          "(recorded in run.json; no longer identical to an uninterrupted run)")
    out.add_argument("--ignore-memory-check", action="store_true",
                     help="start even when the planned peak memory exceeds the available memory")
    out.add_argument("--stop-at-step", type=int, default=None,
                     help="checkpoint and exit at this step without changing the schedule (resume later)")
    out.add_argument("--json", action="store_true", help="print one JSON object with the results at the end")
    out.add_argument("--no-progress", action="store_true",
                     help="no progress bar (under torchrun only rank 0 draws one anyway)")
    out.add_argument("--no-memory", action="store_true", help="skip the memory measurement at the end")
    out.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    out.add_argument("--diagnose-every", type=int, default=0,
                     help="every N steps log each VeLoRA layer's input energy kept and gradient cosine to "
                          "diagnose.csv (velora diagnose; does not change the run)")


def _train_dtype(name: str) -> str:
    from velora.training.models import canonical_dtype

    try:
        return canonical_dtype(name, ("float32", "bfloat16"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _default_tokenizer(args: argparse.Namespace) -> str:
    """Without --tokenizer: the --init-from run's own tokenizer.json (its embeddings are indexed by it), a
    pretrained model's own tokenizer, else a BPE trained on --data."""
    from velora.training.init_from import source_tokenizer
    from velora.training.loop import _is_pretrained_dir

    saved = source_tokenizer(args.init_from) if args.init_from else None
    if saved is not None:
        return str(saved)
    return "model" if _is_pretrained_dir(args.model) else "bpe"


def config_from_args(args: argparse.Namespace):
    from velora.training.loop import TrainConfig

    options = options_from_flags(args)
    tokenizer = args.tokenizer or _default_tokenizer(args)
    targets = args.velora_targets.split(",") if "," in args.velora_targets else args.velora_targets
    return TrainConfig(
        method=args.method, model=args.model, data=args.data, tokenizer=tokenizer, vocab_size=args.vocab_size,
        max_train_chars=args.max_train_chars, seq_len=args.seq_len, batch_size=args.batch_size,
        accumulation_steps=args.accumulation_steps, steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps,
        min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
        eval_batches=args.eval_batches, eval_every=args.eval_every, save_every=args.save_every,
        init_from=args.init_from, dtype=args.dtype, options=options,
        velora={"sub_token_size": args.sub_token_size, "init": args.velora_init, "target_modules": targets,
                "rank": args.velora_rank, "per_group_directions": args.velora_per_group,
                "reestimate_every": args.velora_reestimate_every,
                "coefficient_bits": args.velora_coefficient_bits,
                **({"coefficient_scales": args.velora_coefficient_scales} if args.velora_coefficient_scales else {})},
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from velora.training.loop import TrainingDiverged, public_result, train

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads={args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
    if args.resume and args.out is None:
        raise ValueError("--resume needs --out DIR, the folder of the run to continue")
    for flag in ("allow_lr_change", "allow_data_change"):
        if getattr(args, flag) and not args.resume:
            raise ValueError(f"--{flag.replace('_', '-')} only applies with --resume; add --resume --out DIR")
    config = config_from_args(args)
    out = args.out or f"runs/{config.method.replace('+', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        result = train(config, out, resume=args.resume, progress=not args.no_progress,
                       stop_at_step=args.stop_at_step, measure=not args.no_memory, device=args.device,
                       allow_lr_change=args.allow_lr_change, allow_data_change=args.allow_data_change,
                       memory_check=not args.ignore_memory_check, diagnose_every=args.diagnose_every,
                       parallel=args.parallel)
    except TrainingDiverged as err:
        print(f"velora train: {err}", file=sys.stderr)
        if args.json:
            print(json.dumps({"status": "diverged", "error": str(err), "out": out}))
        return 1
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # torchrun: rank 0 reports (train() has already left the process group)
    result = public_result(result)
    result["out"] = out
    if args.json:
        print(json.dumps(result))
    else:
        mib = 2**20
        memory = (f", saved activations {result['activation_bytes'] / mib:.2f} MiB, "
                  f"peak {result['peak_bytes'] / mib:.2f} MiB") if result["activation_bytes"] is not None else ""
        speed = f", {result['tokens_per_s']:.0f} tokens/s" if result["tokens_per_s"] is not None else ""
        print(f"{result['method']}: {result['steps']} steps, loss {result['initial_loss']:.3f} -> "
              f"{result['final_loss']:.3f}, validation ppl {result['val_ppl']:.2f}{speed}{memory}; "
              f"results in {out}")
    return 0
