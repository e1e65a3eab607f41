"""Memory per rank and bytes communicated per step: DDP vs FSDP2 for AdamW, Flora, GaLoreAdamW and compressed
accumulation, measured in one run, plus the same figures by formula for LLaMA-7B at 8 ranks.

Part 1 (measured): 2 gloo processes on this machine train a LLaMA preset (default llama-20m, 4 blocks of width 256,
vocab 8192) for a few steps per variant. Per rank we count bytes, not RSS: parameters (this rank's shards under
FSDP2), gradients (after the last backward of a step), optimizer state and accumulation buffers; RSS after the
variant is printed too (it includes the interpreter, torch and every earlier variant). Communication: for DDP a
comm hook sends DDP's gradient buckets through ``dist.all_reduce``; that, FSDP2's and our optimizers' own
collectives go through torch.distributed functions wrapped inside one ``with`` block (FSDP2's all-gather /
reduce-scatter, the optimizers' all-reduce / gather / broadcast). Bytes are converted to what one rank sends on a ring:
all-reduce 2(W-1)/W x n, all-gather (W-1) x its shard, reduce-scatter (W-1)/W x n, broadcast and gather n.

Part 2 (formula): the same categories for LLaMA-7B (32 blocks, 4096 / 11008, vocab 32000) at 8 ranks, fp32.

    PYTHONPATH=src python benchmarks/bench_fsdp.py                  # llama-20m, 2 ranks, 3 steps
    PYTHONPATH=src python benchmarks/bench_fsdp.py --quick          # llama-tiny, 2 steps (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from velora.integrations.distributed import run_local

VARIANTS = ("adamw", "flora", "galore", "accumulate")
RANK, GAP, MICRO = 64, 2, 2  # projection rank, GaLore refresh gap (steps 0, 2), micro-batches of "accumulate"
_WRAPPED = {"all_reduce": lambda t, w: 2 * (w - 1) / w * t, "all_gather_single": lambda t, w: (w - 1) * t,
            "reduce_scatter_single": lambda t, w: (w - 1) / w * t, "broadcast": lambda t, w: t,
            "gather": lambda t, w: t}


def _nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


@contextlib.contextmanager
def counting_collectives(counter: Counter):
    """Wrap the torch.distributed collectives FSDP2 and our optimizers call; restore them on exit."""
    originals = {name: getattr(dist, name) for name in _WRAPPED}

    def wrap(name, original):
        def counted(*args, **kwargs):
            if name.endswith("_single"):  # (output, input): count what this rank sends
                tensor = kwargs["input"] if "input" in kwargs else args[1]
            else:
                tensor = kwargs["tensor"] if "tensor" in kwargs else args[0]
            counter[name] += _WRAPPED[name](_nbytes(tensor), dist.get_world_size())
            return original(*args, **kwargs)
        return counted

    try:
        for name, original in originals.items():
            setattr(dist, name, wrap(name, original))
        yield counter
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _ddp_mean_hook(state: Counter, bucket):
    """DDP's mean all-reduce through ``dist.all_reduce``, so ``counting_collectives`` sees every bucket."""
    buffer = bucket.buffer()  # the flat gradients DDP all-reduces
    buffer.div_(dist.get_world_size())
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda fut: fut.value()[0])


_ddp_mean_hook.__annotations__ = {"state": Counter, "bucket": dist.GradBucket,
                                      "return": torch.futures.Future[torch.Tensor]}


def _local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _optimizer(variant: str, model):
    from velora.optim import Flora, GaLoreAdamW
    from velora.optim.projections import projectable_split

    if variant == "flora":
        return Flora(model.parameters(), lr=1e-3, rank=RANK, kappa=GAP, base="adamw")
    if variant == "galore":
        matrices, others = projectable_split(model)
        return GaLoreAdamW([dict(params=matrices, rank=RANK, update_proj_gap=GAP), dict(params=others)], lr=1e-3)
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


def _build(preset: str, variant: str, parallel: str, counter: Counter):
    from velora.integrations.fsdp2 import shard_model
    from velora.optim import CompressedGradAccumulator as Accumulator
    from velora.optim.projections import projectable_parameters
    from velora.training.models import build_config, build_model

    torch.manual_seed(0)
    model = build_model(build_config(preset))
    runner = model
    if parallel == "fsdp2":
        shard_model(model, torch.device("cpu"))
    else:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(model)
        runner.register_comm_hook(counter, _ddp_mean_hook)
    accumulator = None
    if variant == "accumulate":
        accumulator = Accumulator(projectable_parameters(model), rank=RANK, accumulation_steps=MICRO, seed=0)
    return model, runner, _optimizer(variant, model), accumulator


def _step(runner, accumulator, optimizer, batches: torch.Tensor, parallel: str) -> int:
    """One optimizer step; returns the gradient bytes held after the last backward."""
    micro = len(batches)
    for index, batch in enumerate(batches):  # (B, T) each
        last = index == micro - 1
        context = runner.no_sync() if parallel == "ddp" and not last else contextlib.nullcontext()
        with context:
            (runner(input_ids=batch, labels=batch).loss / micro).backward()
    grad_bytes = sum(_nbytes(_local(p.grad)) for p in optimizer.param_groups[0]["params"] if p.grad is not None)
    grad_bytes += sum(_nbytes(_local(p.grad)) for g in optimizer.param_groups[1:] for p in g["params"]
                      if p.grad is not None)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_bytes


def _variant(preset: str, variant: str, parallel: str, steps: int, ids: torch.Tensor) -> dict:
    from velora.optim.sharded_svd import COMM_TALLY
    from velora.training.run_log import rss_mib

    counter = Counter()
    model, runner, optimizer, accumulator = _build(preset, variant, parallel, counter)
    micro = MICRO if variant == "accumulate" else 1
    per_step, grad_bytes = [], 0
    with counting_collectives(counter):
        for step in range(steps):
            counter.clear()
            COMM_TALLY.reset()
            grad_bytes = max(grad_bytes, _step(runner, accumulator, optimizer, ids[step, :micro], parallel))
            per_step.append({"bytes": int(sum(counter.values())), "kinds": {k: int(v) for k, v in counter.items()},
                             "galore_refresh_payload": dict(COMM_TALLY.bytes)})
    state_bytes = sum(_nbytes(_local(v)) for s in optimizer.state.values() for v in s.values()
                      if isinstance(v, torch.Tensor))  # this rank's shards (a replicated tensor counted whole)
    return {"variant": variant, "parallel": parallel,
            "param_bytes": sum(_nbytes(_local(p)) for p in model.parameters()), "grad_bytes": grad_bytes,
            "state_bytes": state_bytes, "accumulator_bytes": accumulator.buffer_bytes() if accumulator else 0,
            "comm_per_step": per_step, "rss_mib": rss_mib()}


def _worker(process_rank: int, world: int, preset: str, steps: int, out: str) -> None:
    from velora.training.models import build_config

    torch.set_num_threads(1)
    vocab = build_config(preset).vocab_size
    ids = torch.randint(0, vocab, (steps, MICRO, 2, 64), generator=torch.Generator().manual_seed(process_rank))
    rows = [_variant(preset, variant, parallel, steps, ids) for parallel in ("ddp", "fsdp2") for variant in VARIANTS]
    if process_rank == 0:
        Path(out).write_text(json.dumps(rows))


# ---- part 2: LLaMA-7B at 8 ranks by formula (fp32) -----------------------------------------------------------

def llama7b_shapes() -> tuple[list[tuple[int, int]], list[tuple[int, int]], int]:
    """(block matrices, embedding + head, 1-D parameter count) of LLaMA-7B."""
    hidden, inner, layers, vocab = 4096, 11008, 32, 32000
    block = [(hidden, hidden)] * 4 + [(inner, hidden)] * 2 + [(hidden, inner)]  # q k v o, gate up, down
    return block * layers, [(vocab, hidden)] * 2, layers * 2 * hidden + hidden


def formula(world: int, rank: int, micro: int = MICRO) -> list[dict]:
    """Per-rank bytes and ring bytes sent per step for LLaMA-7B, the categories part 1 measures."""
    blocks, outer, vector = llama7b_shapes()
    block_numel = sum(n * m for n, m in blocks)
    total = block_numel + sum(n * m for n, m in outer) + vector
    root_numel = total - block_numel
    ring_all_reduce = 2 * (world - 1) / world * 4 * total
    fsdp_comm = (world - 1) / world * 4 * (2 * block_numel + root_numel) + (world - 1) / world * 4 * total
    rows = []
    for parallel in ("ddp", "fsdp2"):
        shard = world if parallel == "fsdp2" else 1
        for variant in VARIANTS:
            state = 8 * total / shard  # AdamW: two fp32 moments
            extra_comm, buffers = 0.0, 0.0
            if variant == "flora":  # every matrix: full second moment + (kept, r) momentum
                kept = [n / shard if parallel == "fsdp2" else max(n, m) for n, m in blocks + outer]
                state = 4 * total / shard + 4 * vector / shard + sum(4 * k * rank for k in kept)
            if variant == "galore":  # block matrices: "std" side; others AdamW
                state = 8 * (total - block_numel) / shard
                for n, m in blocks:
                    left = n < m
                    low = rank * m if left else n * rank / shard
                    state += 8 * low + 4 * (n if left else m) * rank
                    if left and parallel == "fsdp2":
                        extra_comm += 2 * (world - 1) / world * 4 * rank * m
            if variant == "accumulate":
                buffers = sum(4 * (n / shard if parallel == "fsdp2" else max(n, m)) * rank for n, m in blocks)
            comm = ring_all_reduce if parallel == "ddp" else fsdp_comm * (micro if variant == "accumulate" else 1)
            rows.append({"variant": variant, "parallel": parallel, "param_bytes": 4 * total / shard,
                         "grad_bytes": 4 * total / shard, "state_bytes": state, "accumulator_bytes": buffers,
                         "comm_per_step": comm + extra_comm})
    refresh = sum(4 * n * m / world + 4 * (n if n < m else m) * rank for n, m in blocks)  # gather + broadcast
    rows.append({"variant": "galore refresh (extra, fsdp2)", "parallel": "fsdp2", "comm_per_step": refresh})
    return rows


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def _mib(value: float) -> str:
    return f"{value / 2**20:.2f}"


def table(rows: list[dict], unit) -> list[str]:
    lines = ["| variant | parallel | params | grads | optimizer state | acc. buffers | total | comm / step |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "param_bytes" not in row:
            lines.append(f"| {row['variant']} | {row['parallel']} | | | | | | {unit(row['comm_per_step'])} |")
            continue
        comm = row["comm_per_step"]
        if isinstance(comm, list):  # measured: a step without a GaLore refresh and the largest (a refresh)
            steady, largest = min(step["bytes"] for step in comm), max(step["bytes"] for step in comm)
            comm = unit(steady) + (f" (refresh step {unit(largest)})" if largest > steady else "")
        else:
            comm = unit(comm)
        total = row["param_bytes"] + row["grad_bytes"] + row["state_bytes"] + row["accumulator_bytes"]
        lines.append(f"| {row['variant']} | {row['parallel']} | {unit(row['param_bytes'])} | "
                     f"{unit(row['grad_bytes'])} | {unit(row['state_bytes'])} | {unit(row['accumulator_bytes'])} | "
                     f"{unit(total)} | {comm} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-20m")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="llama-tiny, 2 steps")
    parser.add_argument("--out", default="benchmarks/results/fsdp")
    parser.add_argument("--render", action="store_true", help="re-print the tables of the saved --out results")
    args = parser.parse_args()
    preset, steps = ("llama-tiny", 2) if args.quick else (args.preset, args.steps)
    out = Path(args.out)
    if args.render:
        measured = json.loads((out / f"{preset}.json").read_text())["measured"]
        steps = len(measured[0]["comm_per_step"])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run_local(_worker, 2, args=(preset, steps, f"{tmp}/rows.json"), timeout_s=1800)
            measured = json.loads(Path(f"{tmp}/rows.json").read_text())
    estimated = formula(world=8, rank=512)
    refresh = [step["galore_refresh_payload"] for row in measured if row["variant"] == "galore"
               and row["parallel"] == "fsdp2" for step in row["comm_per_step"]]
    lines = [f"## measured: {preset}, 2 gloo ranks, {steps} steps, rank {RANK}, GaLore refresh every {GAP} steps, "
             f"accumulate = AdamW + CompressedGradAccumulator x {MICRO} micro-batches (MiB per rank; comm = bytes "
             "one rank sends per step on a ring)", "", *table(measured, _mib), "",
             "RSS after each variant (MiB, rank 0; cumulative process): "
             + ", ".join(f"{r['parallel']}/{r['variant']} {r['rss_mib']:.0f}" for r in measured), "",
             "GaLoreAdamW under FSDP2, payload bytes its own collectives handed over per step (rank 0): "
             + "; ".join(f"step {i}: " + ", ".join(f"{k} {v}" for k, v in sorted(p.items())) for i, p in
                         enumerate(refresh)), "",
             "## formula: LLaMA-7B, 8 ranks, fp32, rank 512 (GiB per rank; comm GiB sent per step)", "",
             *table(estimated, _gib)]
    print("\n".join(lines))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{preset}.json").write_text(json.dumps({"measured": measured, "llama7b_8_ranks": estimated}, indent=1))
    (out / f"{preset}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
