"""`velora compare`'s table and results.md, from the summary that ``run_compare`` builds."""

from __future__ import annotations

from typing import Any

from velora.experiments.common import markdown_table, mib

HEADERS = ("method", "lr", "val ppl", "Δ vs full", "saved act. MiB", "peak MiB", "params", "grads", "opt. state",
           "activations", "temporaries", "step time ×full")


def table_rows(summary: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for row in summary["rows"]:
        breakdown = row["peak_breakdown"] or {}
        delta = row["val_ppl_vs_full_pct"]
        delta_text = "–" if delta is None or row["method"] == "full" else f"{delta:+.1f}%"
        rows.append([row.get("label", row["method"]), f"{row['lr']:g}", row["val_ppl"], delta_text,
                     mib(row["activation_bytes"]), mib(row["peak_bytes"]),
                     mib(breakdown.get("parameters")), mib(breakdown.get("gradients")),
                     mib(breakdown.get("optimizer_state")), mib(breakdown.get("activations")),
                     mib(breakdown.get("temporaries")),
                     None if row["step_time_ratio"] is None else f"{row['step_time_ratio']:.2f}"])
    return rows


def render_markdown(summary: dict[str, Any]) -> str:
    s = summary["setting"]
    lines = [
        "# velora compare",
        "",
        f"Pre-training {s['model']} ({s['parameters'] / 1e6:.2f}M parameters) from scratch on the offline stdlib "
        f"corpus: {s['steps']} steps x {s['batch_size']} x {s['seq_len']} tokens = {s['tokens_per_method']:,} tokens "
        "per method, same seed, same batch order. Peak = measured peak of one training step, split by category "
        f"({summary['memory_source']}). Runtime {summary['runtime_s']:.0f} s wall on "
        f"{summary['environment']['cpu_count']} CPUs; {summary['timing_note']}.",
        "",
        markdown_table(HEADERS, table_rows(summary)),
        "",
    ]
    if not summary["complete"]:
        lines += [f"**Partial:** {len(summary['rows'])} of {len(summary['rows']) + len(summary['missing'])} methods "
                  f"finished (still to train: {', '.join(summary['missing'])}). Re-run the same command to continue: "
                  "finished methods are reused, not retrained.", ""]
    lines += ["Methods and learning rates (" + summary["lr_tuning"] + "):", ""]
    for row in summary["rows"]:
        reused = " Reused from an earlier run with the same arguments." if row["reused"] else ""
        lines.append(f"- `{row['method']}` (lr {row['lr']:g}, {row['lr_source']}): {row['description']}.{reused}")
    lines += ["", "The papers' numbers (LLaMA 60M on C4; validation ppl, memory):", ""]
    for title, table in summary["paper"].items():
        lines.append(f"- {title}: " + ", ".join(f"{m} {v[0]} ({v[1]})" for m, v in table.items()))
    fp = summary["data_fingerprint"]
    env = summary["environment"]
    versions = ", ".join(f"{name} {version}" for name, version in env["packages"].items() if version)
    lines += ["", f"Data: {fp.get('source')} (Python {fp.get('python')}, files sha256 "
                  f"{str(fp.get('files_sha256'))[:16]}…, {fp.get('train_chars'):,} train chars); tokenizer "
                  f"{summary['tokenizer']['name']}.", "",
              f"Machine: {env['cpu_model']} ({env['cpu_count']} CPUs), Python {env['python']} (stdlib sha256 "
              f"{env['python_stdlib_sha256'][:16]}…), {versions}. The numbers repeat bitwise only on the same CPU "
              "model and library versions.", ""]
    return "\n".join(lines)
