"""Bytes on the wire per DDP step: plain all-reduce vs the FLoRA-compressed comm hook, side by side.

Part 1 (measured): 2 gloo processes on this machine train a LLaMA preset with DDP for a few steps,
once per variant (plain DDP, then the FLoRA hook at each rank). A counting hook wraps plain DDP's
all-reduce so both variants report bytes actually handed to ``all_reduce`` per rank per step; step time
is the median over the timed steps (forward + backward incl. communication + AdamW step).

Part 2 (arithmetic, the same formula the test checks against the measured count): bytes per step for the
usual LLaMA sizes (fp32 gradients, built on the meta device, nothing allocated).

    python benchmarks/bench_comm.py                     # llama-small, ranks 8 and 32, 6 steps
    python benchmarks/bench_comm.py --quick             # llama-tiny, 3 steps (seconds)
    python benchmarks/bench_comm.py --project larger    # project the larger side of each matrix

Caveat printed with the results: on one CPU box gloo "communication" is a memory copy, so time is
dominated by compute and by drawing the Gaussian projections; the byte ratio is the point here.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from velora.integrations.distributed import bucket_wire_bytes, register_flora_comm_hook, run_local


def _counting_allreduce(state: dict, bucket):
    # plain DDP's all-reduce (mean), counting the bytes it sends
    buffer = bucket.buffer()
    state["bytes"] += buffer.numel() * buffer.element_size()
    buffer.div_(dist.get_world_size())
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda fut: fut.value()[0])


_counting_allreduce.__annotations__ = {"state": dict, "bucket": dist.GradBucket,
                                       "return": torch.futures.Future[torch.Tensor]}


def _worker(process_rank: int, world: int, preset: str, ranks: list[int], steps: int, out: str,
            project: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from velora.training.models import build_config, build_model

    config = build_config(preset)
    generator = torch.Generator().manual_seed(process_rank)
    ids = torch.randint(0, config.vocab_size, (steps + 1, 4, 128), generator=generator)  # (S, B, T)
    rows = []
    for rank in [None, *ranks]:
        torch.manual_seed(0)
        model = build_model(config)
        ddp = DistributedDataParallel(model)
        if rank is None:
            state = {"bytes": 0}
            ddp.register_comm_hook(state, _counting_allreduce)
        else:
            hook_state = register_flora_comm_hook(ddp, rank=rank, seed=0, project=project)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times = []
        for step in range(steps + 1):  # step 0 warms up (DDP rebuilds buckets after it)
            dist.barrier()
            start = time.perf_counter()
            ddp(input_ids=ids[step], labels=ids[step]).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step > 0:
                times.append(time.perf_counter() - start)
        sent = state["bytes"] if rank is None else hook_state.wire_bytes
        rows.append({"rank": rank, "bytes_per_step": sent / (steps + 1), "ms": 1e3 * statistics.median(times),
                     "formula": bucket_wire_bytes(model, rank, project=project)})
    if process_rank == 0:
        torch.save(rows, out)


def _arithmetic(presets: list[str], ranks: list[int], project: str) -> None:
    from velora.optim import projectable_parameters
    from velora.training.models import build_config, build_model

    print("\nbytes per step per rank, fp32 grads (formula). 'all': every gradient (embeddings, head, norms sent "
          "whole); 'matrices': the attention/MLP weights the hook compresses")
    header = "".join(f"{f'r={r} all':>20}{f'r={r} matrices':>16}" for r in ranks)
    print(f"{'model':<12}{'plain DDP':>12}{'matrices':>12}{header}")
    for preset in presets:
        with torch.device("meta"):
            model = build_model(build_config(preset))
        dense = bucket_wire_bytes(model, None)
        matrices = projectable_parameters(model)
        matrix_bytes = 4 * sum(p.numel() for p in matrices)
        cells = ""
        for r in ranks:
            sent = bucket_wire_bytes(model, r, project=project)
            saved = dense - sent  # only the matrices shrink
            cells += f"{sent / 2**20:>10.1f} MiB {dense / sent:>5.1f}x{matrix_bytes / (matrix_bytes - saved):>15.1f}x"
        print(f"{preset:<12}{dense / 2**20:>8.1f} MiB{matrix_bytes / 2**20:>8.1f} MiB{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--project", default="smaller", choices=("smaller", "larger"),
                        help="side of each matrix the hook projects (default smaller)")
    args = parser.parse_args()
    preset, ranks, steps = ("llama-tiny", [8], 3) if args.quick else ("llama-small", [8, 32], 6)
    with tempfile.NamedTemporaryFile(suffix=".pt") as handle:
        run_local(_worker, 2, args=(preset, ranks, steps, handle.name, args.project), timeout_s=600)
        rows = torch.load(handle.name, weights_only=True)
    print(f"measured: {preset}, 2 gloo ranks on one CPU box, batch 4x128 per rank, {steps} timed steps, "
          f"{args.project} side projected")
    print(f"{'variant':<18}{'bytes/step/rank':>18}{'formula':>14}{'ratio':>8}{'step ms':>10}")
    dense = rows[0]["bytes_per_step"]
    for row in rows:
        name = "plain DDP" if row["rank"] is None else f"FLoRA hook r={row['rank']}"
        print(f"{name:<18}{row['bytes_per_step']:>18,.0f}{row['formula']:>14,}{dense / row['bytes_per_step']:>7.1f}x"
              f"{row['ms']:>10.1f}")
    print("note: one-box gloo makes communication nearly free, so step time here measures the hook's compute "
          "(projection draws + matmuls), not network savings")
    _arithmetic(["llama-60m", "llama-130m", "llama-350m", "llama-1b", "llama-7b"] if not args.quick else ["llama-60m"],
                [64, 256], args.project)


if __name__ == "__main__":
    main()
