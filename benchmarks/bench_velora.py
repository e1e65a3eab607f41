"""VeLoRA side by side: saved-activation memory and training-step time, measured in one run.

Workload (the reference): LLaMA-style decoder, hidden 512, 4 layers, 8 heads, intermediate 1344, vocab 1024
(small so the LM head does not dominate), seq 256, batch 4, fp32, 2 threads, random init.

Variants
- full                      every weight trains, plain layers
- full + VeLoRA             velora-torch on v_proj and down_proj, sub_token_size M=32 (the paper's targets)
- full + VeLoRA (all 7)     informative only, not the paper's setting: every projection compressed, to show
                            how the step time scales with the share of weight-gradient work VeLoRA replaces
- full + VeLoRA M=4         informative: the paper's targets at M=4, `velora compare`'s sub-token size
- ... M=4, r=4, 8-bit z     informative: the same bytes spent on precision (VeLoRAConfig.coefficient_bits=8,
                            rank = M): every sub-token kept whole up to rounding, at M=4's saved bytes; with
                            the library's per-column then per-token scales, and with per-token scales only
- peft LoRA                 peft LoRA r=8 on all linear layers, lora_dropout=0
- peft LoRA + peft VeLoRA   peft's own LoRA variant (LoraConfig(velora_config=...)), init batch_average_once,
                            M=32 on every layer (num_groups=D/32: 16 for d=512; the down_proj layers, D=1344,
                            are set to 42 groups after construction because peft takes one num_groups per adapter)
- peft LoRA + VeLoRA        the same peft LoRA with velora-torch on every lora_A, M=32, init batch_average_once;
                            the parent layers run velora-torch's fused LoRA node (velora.core.lora_fused, the default)
- ... unfused               informative: the same with VeLoRAConfig(fuse_lora=False), i.e. peft's own LoRA forward
                            around velora-torch's lora_A, to show what the compression alone costs or saves
- QLoRA                     every projection a bitsandbytes NF4 Linear4bit (double quantisation, compute dtype = the
                            model's), peft's bnb LoRA r=8 on it (velora.methods.lora.qlora, what
                            `--method qlora` trains)
- QLoRA + VeLoRA            the same with velora-torch on every lora_A (adapter mode, M=32); each peft bnb layer runs
                            as velora-torch's fused LoRA node on the 4-bit base (bnb.matmul_4bit forward, the weight
                            dequantized again in backward, as bitsandbytes does)
- ... unfused               informative: the same with VeLoRAConfig(fuse_lora=False), peft's own bnb forward around
                            velora-torch's lora_A (what this row measured before the 4-bit node existed)

The bound on full + VeLoRA: the weight-gradient matmuls of v_proj and down_proj (Gᵀx, (O×T)·(T×D)) are the work
the factored backward removes. They are timed alone in the same process after the round-robin, and
1 − (their time)/(full step) is printed as the best step ratio any implementation of this layer choice can reach.

Saved-activation bytes: unique storages handed to autograd during one forward, parameters and buffers
excluded (velora.memory.SavedActivationMeter). Step time: zero_grad + forward + backward + AdamW step; the variants run
round-robin within each round (order reversed every other round) so machine noise hits all of them alike,
and each ratio is the median of the per-round ratios against the variant's baseline.

    python benchmarks/bench_velora.py            # reference workload, writes benchmarks/results/velora.md
    python benchmarks/bench_velora.py --quick    # tiny smoke run (seconds, 1 thread), nothing written
    python benchmarks/bench_velora.py --only QLoRA --out F   # some variants (+ their baselines) only

--quick only checks that everything runs: at that size the per-call Python cost of autograd Functions dominates
and its step ratios say nothing about the reference workload.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from velora import VeLoRAConfig, apply_velora
from velora.memory import SavedActivationMeter

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "velora.md")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- workload ----------------------------------------------------------------------------------------


@dataclass
class Workload:
    hidden: int = 512
    intermediate: int = 1344
    heads: int = 8
    layers: int = 4
    vocab: int = 1024
    seq: int = 256
    batch: int = 4
    sub_token_size: int = 32
    lora_rank: int = 8


QUICK = Workload(hidden=128, intermediate=352, heads=4, layers=2, vocab=256, seq=64, batch=2)


def build_base(work: Workload, seed: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=work.hidden,
        intermediate_size=work.intermediate,
        num_attention_heads=work.heads,
        num_key_value_heads=work.heads,
        num_hidden_layers=work.layers,
        vocab_size=work.vocab,
        max_position_embeddings=work.seq,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(dtype=dtype)
    model.train()
    return model


def peft_lora(model: nn.Module, work: Workload, velora_config=None) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=work.lora_rank, lora_alpha=2 * work.lora_rank, target_modules=ALL_LINEAR,
                        lora_dropout=0.0, velora_config=velora_config)
    return get_peft_model(model, config)


def peft_velora(model: nn.Module, work: Workload) -> nn.Module:
    """peft's own VeLoRA variant at M = sub_token_size on every adapted layer."""
    from peft import VeloraConfig

    groups = work.hidden // work.sub_token_size
    model = peft_lora(model, work, VeloraConfig(num_groups=groups, init_type="batch_average_once"))
    for module in model.modules():
        embeds = getattr(module, "lora_velora_embed", None)
        if embeds is None:
            continue
        in_features = module.in_features
        if in_features % work.sub_token_size:
            raise ValueError(f"in_features={in_features} is not a multiple of M={work.sub_token_size}")
        for adapter in list(module.lora_velora_num_groups):
            # one num_groups per peft adapter: give D=intermediate layers their M-sized groups too
            module.lora_velora_num_groups[adapter] = in_features // work.sub_token_size
            embeds[adapter] = torch.zeros(work.sub_token_size, dtype=embeds[adapter].dtype,
                                          device=embeds[adapter].device)
    return model


def velora_full(model: nn.Module, work: Workload) -> nn.Module:
    return apply_velora(model, VeLoRAConfig(sub_token_size=work.sub_token_size,
                                            target_modules=["v_proj", "down_proj"]))


def velora_full_m4(model: nn.Module, work: Workload, bits: int | None = None,
                   scales: str = "token_and_column") -> nn.Module:
    """The paper's targets at M = 4 (compare's setting), rank 1; or rank = M = 4 with ``bits``-bit coefficients
    (``scales``: VeLoRAConfig.coefficient_scales)."""
    quantised = {} if bits is None else {"coefficient_bits": bits, "coefficient_scales": scales}
    return apply_velora(model, VeLoRAConfig(sub_token_size=4, rank=1 if bits is None else 4,
                                            target_modules=["v_proj", "down_proj"], **quantised))


def velora_full_all(model: nn.Module, work: Workload) -> nn.Module:
    return apply_velora(model, VeLoRAConfig(sub_token_size=work.sub_token_size, target_modules=ALL_LINEAR))


def velora_adapter(model: nn.Module, work: Workload, fuse_lora: bool = True, fidelity: bool = False) -> nn.Module:
    """velora-torch VeLoRA on every lora_A at M = sub_token_size; with ``fidelity``, the same bytes spent as r = 4
    per-group SVD directions with 8-bit z (issue 17's fine-tuning configuration, bench_fidelity_finetune.py)."""
    options = dict(rank=4, coefficient_bits=8, init="svd", per_group_directions=True) if fidelity else {}
    return apply_velora(peft_lora(model, work), VeLoRAConfig(sub_token_size=work.sub_token_size,
                                                             target_modules=ALL_LINEAR, mode="adapter",
                                                             fuse_lora=fuse_lora, **options))


def qlora(model: nn.Module, work: Workload, velora: bool = False, fuse_lora: bool = True) -> nn.Module:
    """bitsandbytes NF4 base (double quantisation, compute dtype = the model's), peft LoRA on every projection;
    with ``velora``, velora-torch on every lora_A (the fused 4-bit LoRA node unless ``fuse_lora=False``)."""
    from velora.methods.lora.qlora import quantize_base_linears

    quantize_base_linears(model)
    model = peft_lora(model, work)
    if velora:
        apply_velora(model, VeLoRAConfig(sub_token_size=work.sub_token_size, target_modules=ALL_LINEAR,
                                         mode="adapter", fuse_lora=fuse_lora))
    return model


VARIANTS: dict[str, Callable[[nn.Module, Workload], nn.Module]] = {
    "full": lambda model, work: model,
    "full + VeLoRA (v_proj, down_proj)": velora_full,
    "full + VeLoRA (all 7 projections)": velora_full_all,
    "full + VeLoRA M=4 (informative)": velora_full_m4,
    "full + VeLoRA M=4, r=4, 8-bit z (informative)": lambda model, work: velora_full_m4(model, work, 8),
    "full + VeLoRA M=4, r=4, 8-bit z, per-token scales (informative)":
        lambda model, work: velora_full_m4(model, work, 8, "token"),
    "peft LoRA": peft_lora,
    "peft LoRA + peft VeLoRA": peft_velora,
    "peft LoRA + velora-torch VeLoRA": velora_adapter,
    "peft LoRA + velora-torch VeLoRA, unfused (informative)": lambda model, work: velora_adapter(model, work, False),
    "peft LoRA + velora-torch VeLoRA, r=4 per-group 8-bit z (informative)":
        lambda model, work: velora_adapter(model, work, fidelity=True),
    "QLoRA (bitsandbytes NF4 + peft LoRA)": qlora,
    "QLoRA + velora-torch VeLoRA": lambda model, work: qlora(model, work, velora=True),
    "QLoRA + velora-torch VeLoRA, unfused (informative)": lambda model, work: qlora(model, work, True, False),
}
BASELINE = {  # ratios are taken against the plain method the variant extends
    "full": "full",
    "full + VeLoRA (v_proj, down_proj)": "full",
    "full + VeLoRA (all 7 projections)": "full",
    "full + VeLoRA M=4 (informative)": "full",
    "full + VeLoRA M=4, r=4, 8-bit z (informative)": "full",
    "full + VeLoRA M=4, r=4, 8-bit z, per-token scales (informative)": "full",
    "peft LoRA": "peft LoRA",
    "peft LoRA + peft VeLoRA": "peft LoRA",
    "peft LoRA + velora-torch VeLoRA": "peft LoRA",
    "peft LoRA + velora-torch VeLoRA, unfused (informative)": "peft LoRA",
    "peft LoRA + velora-torch VeLoRA, r=4 per-group 8-bit z (informative)": "peft LoRA",
    "QLoRA (bitsandbytes NF4 + peft LoRA)": "QLoRA (bitsandbytes NF4 + peft LoRA)",
    "QLoRA + velora-torch VeLoRA": "QLoRA (bitsandbytes NF4 + peft LoRA)",
    "QLoRA + velora-torch VeLoRA, unfused (informative)": "QLoRA (bitsandbytes NF4 + peft LoRA)",
}


# ---- measurement -------------------------------------------------------------------------------------


def saved_activation_bytes(model: nn.Module, batch: torch.Tensor) -> int:
    """Unique bytes one forward keeps for backward, by the library's meter (parameters and buffers excluded)."""
    with SavedActivationMeter(model) as meter:
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return meter.total_bytes


def make_step(model: nn.Module, batch: torch.Tensor) -> Callable[[], float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def run(work: Workload, warmup: int, rounds: int, threads: int, seed: int,
        only: list[str] | None = None) -> list[dict]:
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, work.vocab, (work.batch, work.seq), generator=generator)  # (B, N)

    chosen = chosen_variants(only)
    models = {name: wrap(build_base(work, seed), work) for name, wrap in VARIANTS.items() if name in chosen}
    saved = {name: saved_activation_bytes(model, batch) for name, model in models.items()}
    steps = {name: make_step(model, batch) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    cpu_times: dict[str, list[float]] = {name: [] for name in models}
    for round_index in range(warmup + rounds):
        order = list(steps)
        if round_index % 2:  # alternate the order too, so no variant always runs right after the same one
            order.reverse()
        for name in order:
            start, cpu_start = time.perf_counter(), time.process_time()
            steps[name]()
            elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu_start
            if round_index >= warmup:
                times[name].append(elapsed)
                cpu_times[name].append(cpu_elapsed)

    removed_ms = removed_weight_grad_ms(work, repeats=max(rounds, 5)) if "full" in models else None
    rows = []
    for name in models:
        base = BASELINE[name]
        median = statistics.median(times[name])
        rows.append(dict(
            name=name,
            baseline=base,
            saved_mib=saved[name] / 2**20,
            saved_ratio=saved[name] / saved[base],
            step_ms=1e3 * median,
            # paired: the ratio within each round (both ran under the same machine load), then the median
            step_ratio=statistics.median(a / b for a, b in zip(times[name], times[base])),
            # CPU seconds of this process: less sensitive to other jobs taking the cores than wall time
            cpu_ratio=statistics.median(a / b for a, b in zip(cpu_times[name], cpu_times[base])),
            # fastest step against fastest step: noise from other jobs only ever adds time
            min_ratio=min(times[name]) / min(times[base]),
            # per-round ratio spread: how much the side-by-side ratio moved between rounds
            ratio_min=min(a / b for a, b in zip(times[name], times[base])),
            ratio_max=max(a / b for a, b in zip(times[name], times[base])),
        ))
    if "full" in times:
        full_ms = 1e3 * statistics.median(times["full"])
        rows.append(dict(bound=True, removed_ms=removed_ms, full_ms=full_ms, ratio=1 - removed_ms / full_ms))
    return rows


def chosen_variants(only: list[str] | None) -> list[str]:
    """The variants whose name contains one of ``only`` (all when None), with the baselines they need."""
    if only is None:
        return list(VARIANTS)
    picked = [name for name in VARIANTS if any(part.lower() in name.lower() for part in only)]
    if not picked:
        raise ValueError(f"--only {only} matches no variant; variants are {list(VARIANTS)}")
    return [name for name in VARIANTS if name in picked or name in {BASELINE[p] for p in picked}]


def removed_weight_grad_ms(work: Workload, repeats: int) -> float:
    """Median time of the Gᵀx matmuls of every v_proj and down_proj in one step: what the factored backward skips."""
    tokens = work.batch * work.seq
    generator = torch.Generator().manual_seed(1)
    grad_out = torch.randn(tokens, work.hidden, generator=generator)  # (T, O): both layers output d
    inputs = [torch.randn(tokens, work.hidden, generator=generator),  # (T, D) v_proj input
              torch.randn(tokens, work.intermediate, generator=generator)]  # (T, ff) down_proj input
    samples = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for _ in range(work.layers):
            for layer_input in inputs:
                grad_out.t().mm(layer_input)  # (O, T) @ (T, D) -> (O, D)
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples[1:])  # the first call warms the allocator


def markdown(rows: list[dict], work: Workload, warmup: int, rounds: int, threads: int,
             load: tuple[float, float]) -> str:
    lines = [
        f"Workload: LLaMA-style d={work.hidden}, {work.layers} layers, {work.heads} heads, ff={work.intermediate}, "
        f"vocab={work.vocab}, seq={work.seq}, batch={work.batch}, fp32, {threads} threads, "
        f"M={work.sub_token_size}, LoRA r={work.lora_rank}; AdamW. Step = zero_grad + forward + backward + "
        f"optimizer step; {rounds} timed round-robin rounds after {warmup} warm-up rounds; ratios are the median "
        f"of the per-round ratios. torch {torch.__version__}, {platform.machine()}.",
        "",
        "| variant | vs | saved activations (MiB) | saved ratio | step (ms) | step ratio | CPU-time ratio "
        "| fastest-step ratio | per-round ratio range |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    bound = next((row for row in rows if row.get("bound")), None)
    for row in rows:
        if row.get("bound"):
            continue
        lines.append(
            f"| {row['name']} | {row['baseline']} | {row['saved_mib']:.1f} | {row['saved_ratio']:.3f} | "
            f"{row['step_ms']:.0f} | {row['step_ratio']:.3f} | {row['cpu_ratio']:.3f} | {row['min_ratio']:.3f} | "
            f"{row['ratio_min']:.2f}–{row['ratio_max']:.2f} |"
        )
    if bound is not None:
        lines += ["", f"Bound for full + VeLoRA (v_proj, down_proj): the weight-gradient matmuls it removes take "
                  f"{bound['removed_ms']:.0f} ms of the {bound['full_ms']:.0f} ms full step (timed alone, same "
                  f"threads), so no implementation of this layer choice can go below {bound['ratio']:.3f}x full."]
    lines += ["", f"Load average (1 min) before / after: {load[0]:.2f} / {load[1]:.2f} "
              "(other jobs on the machine make the wall-clock ratios noisy; the CPU-time ratio is steadier)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps; prints only")
    parser.add_argument("--rounds", type=int, default=None, help="timed round-robin rounds (default 15, quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default 2; quick 1: tiny ops on 2 busy cores measure only OpenMP waits)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help=f"markdown file to write (default {RESULTS}; none with --quick)")
    parser.add_argument("--only", default=None,
                        help="comma list: run only the variants whose name contains one (plus their baselines), "
                             "e.g. --only QLoRA")
    args = parser.parse_args()
    work = QUICK if args.quick else Workload()
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    threads = args.threads if args.threads is not None else (1 if args.quick else 2)
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds={rounds} must be >= 1 and warmup={warmup} >= 0")

    load_before = os.getloadavg()[0]
    only = [part.strip() for part in args.only.split(",") if part.strip()] if args.only else None
    rows = run(work, warmup, rounds, threads, args.seed, only)
    table = markdown(rows, work, warmup, rounds, threads, (load_before, os.getloadavg()[0]))
    print(table)
    out = args.out if args.out is not None else (None if args.quick else RESULTS)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            fh.write("# VeLoRA benchmark\n\n" + table)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
