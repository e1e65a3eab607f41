"""How `velora compare` trains its methods: one job per method, in this process or on spawned worker processes.

A worker trains the jobs it is sent and streams step rows and results back through a pipe; the parent feeds the
progress board, saves each result as it arrives and stops every worker when one fails or on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch

from velora.experiments.common import write_json
from velora.experiments.progress import ProgressBoard
from velora.methods.registry import parse_method

# step time of one method relative to full (the default run, 1000 x 5 x 128; DoRA not measured, assumed the
# slowest): the parallel queue starts the slowest methods first, so that the workers finish together instead of
# one of them waiting on a late LoRA run
RELATIVE_COST = {"dora": 1.5, "lora": 1.35, "gradnormlorp": 1.26, "flora": 1.14, "galore": 1.01, "full": 1.0}


def default_jobs() -> int:
    return min(2, os.cpu_count() or 1)


@dataclass
class Job:
    """One method's training run, everything a worker process needs (picklable)."""

    method: str
    config: Any  # velora.training.loop.TrainConfig
    run_dir: Path
    threads: int
    progress: bool
    device: str = "auto"


def train_job(job: Job, on_step=None) -> dict[str, Any]:
    """Train one method and return its result without the model (runs in the caller or in a worker). The
    result, with its wall and CPU time, is also ``run_dir/result.json``: a later run reuses it."""
    from velora.training.loop import train

    torch.set_num_threads(job.threads)
    began, cpu_began = time.perf_counter(), time.process_time()
    result = train(job.config, job.run_dir, progress=job.progress, tensorboard=False, on_step=on_step,
                   device=job.device)
    result.pop("_model")
    result["wall_s"] = time.perf_counter() - began
    result["cpu_s"] = time.process_time() - cpu_began  # this process only: less sensitive to other load than wall
    write_json(job.run_dir / "result.json", result)
    return result


def _step_sender(conn, every_s: float = 1.0):
    """on_step for a worker: sends ("step", row) to the parent at most every ``every_s`` seconds."""
    last = [0.0]

    def send(row: dict[str, float]) -> None:
        if time.perf_counter() - last[0] >= every_s:
            last[0] = time.perf_counter()
            _send_or_leave(conn, ("step", row))

    return send


def _send_or_leave(conn, message) -> None:
    """Send to the parent; when the parent is gone (stopped with Ctrl-C, killed) leave quietly: nobody is left
    to read this worker's results, and a traceback per worker would bury the parent's one line."""
    try:
        conn.send(message)
    except (BrokenPipeError, ConnectionResetError, EOFError):
        os._exit(1)


def _worker(conn) -> None:
    """Worker process body: train the jobs it is sent until it receives None. Progress goes up as ("step", row);
    each job is answered with ("ok", result) or ("error", exception or None, text, traceback); after an error
    the worker stops. Ctrl-C is the parent's to handle: it stops the workers and says what was kept."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while (job := conn.recv()) is not None:
        try:
            result = train_job(job, on_step=_step_sender(conn))
        except BaseException as err:  # noqa: BLE001 - every failure goes back to the parent, which re-raises it
            trace = traceback.format_exc()
            try:
                conn.send(("error", err, f"{type(err).__name__}: {err}", trace))
            except (BrokenPipeError, ConnectionResetError, EOFError):
                os._exit(1)
            except Exception:  # the exception itself does not pickle: send its text
                _send_or_leave(conn, ("error", None, f"{type(err).__name__}: {err}", trace))
            break
        _send_or_leave(conn, ("ok", result))
    conn.close()


@contextlib.contextmanager
def _sigint_blocked():
    """Block SIGINT in this thread while workers are started: a spawned interpreter keeps the blocked mask through
    exec, so a Ctrl-C while it imports cannot print its KeyboardInterrupt traceback (the parent stops it). A Ctrl-C
    during the block stays pending and is delivered on leaving it. No-op where signal masks do not exist."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    # multiprocessing starts its resource tracker with the first process and unblocks SIGINT after doing so:
    # started here first, it leaves the mask alone below
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _failure(method: str, err: BaseException | None, text: str, trace: str) -> BaseException:
    """The worker's exception (same type when possible), its message prefixed with the method."""
    failure: BaseException = RuntimeError(f"method {method} failed: {text}")
    if err is not None:
        try:
            failure = type(err)(f"method {method}: {err}")
        except Exception:  # an exception type with a custom constructor: keep the original object
            failure = err
    failure.add_note(f"traceback in the worker process of {method}:\n{trace}")
    return failure


def run_parallel(jobs: list[Job], n_jobs: int, say, board: ProgressBoard | None = None,
                 on_result=None) -> dict[str, dict[str, Any]]:
    """Run ``jobs`` in order on ``n_jobs`` spawned worker processes; an idle worker takes the next job.

    Step rows from the workers go to ``board``; ``on_result(method, result)`` is called as each job finishes.
    A failing job stops the others (their processes are terminated) and is re-raised here.
    """
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch/OpenMP state
    workers = {}  # parent end of each worker's pipe -> its process
    queue = list(jobs)
    busy: dict[Any, tuple[Job, float]] = {}  # parent end -> (the job it trains, start time)
    results: dict[str, dict[str, Any]] = {}
    done = False
    try:  # a Ctrl-C held back during the start-up lands on leaving the block: inside, so started workers are stopped
        with _sigint_blocked():  # the workers inherit the mask: Ctrl-C reaches this process alone, even mid start-up
            for i in range(n_jobs):
                parent_end, child_end = context.Pipe()
                process = context.Process(target=_worker, args=(child_end,), name=f"velora-compare-{i}")
                process.start()
                child_end.close()  # the child holds the only copy: its exit closes the pipe
                workers[parent_end] = process
        idle = list(workers)
        while queue or busy:
            while queue and idle:
                conn, job = idle.pop(0), queue.pop(0)
                conn.send(job)
                busy[conn] = (job, time.perf_counter())
                if board is not None:
                    board.running(job.method)
                say(f"started {job.method} (lr {job.config.lr:g}), {len(busy)} of {n_jobs} jobs running")
            for conn in wait(list(busy), timeout=1.0):  # the timeout lets the plain display print on time
                job, began = busy[conn]
                try:
                    message = conn.recv()
                except EOFError:  # the process died without a word (killed, out of memory, crashed)
                    workers[conn].join()
                    raise RuntimeError(f"method {job.method}: its worker process exited with code "
                                       f"{workers[conn].exitcode} before reporting a result") from None
                if message[0] == "step":
                    if board is not None:
                        board.step(job.method, message[1])
                    continue
                if message[0] == "error":
                    raise _failure(job.method, *message[1:])
                del busy[conn]
                results[job.method] = message[1]
                idle.append(conn)
                _announce_finished(job.method, message[1], time.perf_counter() - began, say, board)
                if on_result is not None:
                    on_result(job.method, message[1])
            if board is not None:
                board.tick()
        done = True
    finally:
        for conn, process in workers.items():
            if conn in busy or not done:  # a failure or Ctrl-C: nothing a worker would still do is wanted
                process.terminate()
            elif process.is_alive():
                try:
                    conn.send(None)  # done: the worker leaves its loop
                except (BrokenPipeError, OSError):
                    process.terminate()
            process.join()
            conn.close()
    return results


def _announce_finished(method: str, result: dict[str, Any], wall_s: float, say, board) -> None:
    if board is not None:
        board.done(method, f"done: val ppl {result['val_ppl']:.2f}", wall_s=wall_s)
    say(f"finished {method}: val ppl {result['val_ppl']:.2f} in {wall_s:.0f} s ({result['cpu_s']:.0f} s CPU)")


def train_jobs(jobs: list[Job], n_jobs: int, say, board: ProgressBoard, on_result, load_data) -> None:
    """Train ``jobs`` in this process (one job) or on ``n_jobs`` workers; ``on_result`` as each finishes."""
    if not jobs:
        return
    if min(n_jobs, len(jobs)) == 1:  # train_job sets the thread count
        for i, job in enumerate(jobs):
            say(f"[{i + 1}/{len(jobs)}] {job.method}")
            board.running(job.method)
            began = time.perf_counter()
            result = train_job(job, on_step=lambda row, method=job.method: board.step(method, row))
            _announce_finished(job.method, result, time.perf_counter() - began, say, board)
            on_result(job.method, result)
        return
    # build the tokenizer and token caches once here, so the workers only read them
    say("preparing the tokenizer and token caches (cached for later runs)")
    load_data(jobs[0].config)
    # slowest first (stable: equal costs keep the --methods order) so the workers finish together
    queue = sorted(jobs, key=lambda job: -RELATIVE_COST.get(parse_method(job.method).base, 1.0))
    run_parallel(queue, min(n_jobs, len(jobs)), say, board, on_result)
