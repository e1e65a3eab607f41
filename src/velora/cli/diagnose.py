"""`velora diagnose`: build a model as `velora train` does, set v on a first batch, report on a second batch
how much of each VeLoRA layer's input energy and weight gradient the directions keep (velora.core.fidelity)."""

from __future__ import annotations

import argparse
import json

from velora.core.config import INIT_STRATEGIES
from velora.core.subtoken import COEFFICIENT_SCALES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llama-tiny",
                        help="preset (llama-tiny, llama-small, gpt2, ...), a config.json, or a local model directory")
    parser.add_argument("--method", default="velora",
                        help="a method with +velora, e.g. velora, lora+velora, galore+velora (default velora)")
    parser.add_argument("--data", default="stdlib", help="'stdlib', a local text file or folder, or hf:<dataset>")
    parser.add_argument("--tokenizer", default=None,
                        help="bpe, byte, a tokenizer.json, or 'model' (default: 'model' for a pretrained --model)")
    parser.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size")
    parser.add_argument("--max-train-chars", type=int, default=3_000_000, help="cap on training text (characters)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch (default 8)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--sub-token-size", type=int, default=32, help="M, the sub-token size (default 32)")
    parser.add_argument("--rank", type=int, default=1, help="directions per layer, r (default 1, the paper's)")
    parser.add_argument("--per-group", action="store_true",
                        help="one set of directions per sub-token group (VeLoRAConfig.per_group_directions)")
    parser.add_argument("--coefficient-bits", type=int, default=None, choices=(8, 4),
                        help="keep z as 8- or 4-bit integers with one scale per token (VeLoRAConfig.coefficient_bits; "
                             "default: x's dtype, the paper's)")
    parser.add_argument("--coefficient-scales", default=None, choices=COEFFICIENT_SCALES,
                        help="with --coefficient-bits: token_and_column (default) or token (one scale per token only)")
    parser.add_argument("--init", default="batch_average_once", choices=INIT_STRATEGIES,
                        help="how v is initialised (default batch_average_once, the paper's)")
    parser.add_argument("--targets", default="paper",
                        help="comma-separated module names or 'paper' (value + MLP down projections)")
    parser.add_argument("--seed", type=int, default=0, help="model init and batch order seed")
    parser.add_argument("--train-steps", type=int, default=0,
                        help="train this many steps (lr --lr, the method's optimizer) before diagnosing; a LoRA A has "
                             "no gradient while B is still zero, so adapters need a few (default 0)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of --train-steps (default 1e-3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _config(args: argparse.Namespace):
    from velora.methods.registry import parse_method
    from velora.training.loop import TrainConfig, _is_pretrained_dir

    if not parse_method(args.method).velora:
        raise ValueError(f"--method {args.method!r} has no VeLoRA layers to diagnose; add +velora "
                         f"(e.g. {args.method}+velora)")
    tokenizer = args.tokenizer or ("model" if _is_pretrained_dir(args.model) else "bpe")
    targets = args.targets.split(",") if "," in args.targets else args.targets
    return TrainConfig(method=args.method, model=args.model, data=args.data, tokenizer=tokenizer,
                       vocab_size=args.vocab_size, max_train_chars=args.max_train_chars, seq_len=args.seq,
                       batch_size=args.batch, steps=1, seed=args.seed, lr=args.lr,
                       velora={"sub_token_size": args.sub_token_size, "rank": args.rank, "init": args.init,
                               "target_modules": targets, "per_group_directions": args.per_group,
                               "coefficient_bits": args.coefficient_bits,
                               **({"coefficient_scales": args.coefficient_scales} if args.coefficient_scales else {})})


def _train_steps(model, config, data, steps: int) -> None:
    """Plain optimizer steps on batches 1..steps (no schedule, no clipping): enough to move LoRA's B off zero."""
    import torch

    from velora.methods.registry import build_optimizer

    if steps < 0:
        raise ValueError(f"--train-steps={steps} must be >= 0")
    optimizer = build_optimizer(model, config.method, config.method_options())
    for index in range(1, steps + 1):
        batch = data.train.batch(index, config.batch_size)  # (B, T)
        with torch.enable_grad():
            model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from velora.core.fidelity import diagnose
    from velora.methods.registry import prepare_model
    from velora.training.loop import build_base_model, load_data

    config = _config(args)
    torch.manual_seed(config.seed)  # the model `velora train` would start from
    data = load_data(config)
    model = prepare_model(build_base_model(config, data.tokenizer.vocab_size), config.method,
                          config.method_options())
    model.train()
    first = data.train.batch(0, config.batch_size)  # (B, T)
    with torch.enable_grad():
        model(input_ids=first, labels=first)  # the first training forward builds v (no backward, no update)
    _train_steps(model, config, data, args.train_steps)
    report = diagnose(model, data.train.batch(1 + args.train_steps, config.batch_size))
    if args.json:
        print(json.dumps({"model": config.model, "method": config.method, "velora": config.velora,
                          "batch": config.batch_size, "seq": config.seq_len, **report.to_dict()}))
    else:
        trained = f"trained {args.train_steps} steps on batches 1-{args.train_steps}, " if args.train_steps else ""
        print(f"{config.method} on {config.model}: v set on batch 0, {trained}diagnosed on batch "
              f"{1 + args.train_steps} ({config.batch_size} x {config.seq_len} tokens)\n")
        print(report.to_markdown())
    return 0
