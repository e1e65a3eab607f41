"""compare.png: quality against the saved activations VeLoRA compresses, the peak step memory by category, and
each method's training loss as a smoothed difference to full training (so that no curve hides another)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from velora.experiments.common import mib, pyplot, smooth

CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporaries")
LINE_STYLES = ("-", "--", "-.", ":")


def _quality_vs_activations(axis, rows: list[dict[str, Any]]) -> None:
    for i, row in enumerate(rows):
        x = mib(row["activation_bytes"])
        if x is None:
            continue
        axis.scatter([x], [row["val_ppl"]], s=45, color=f"C{i}", zorder=3)
        # labels alternate above and below their points: methods of equal memory (full, velora) sit side by side
        axis.annotate(row["method"], (x, row["val_ppl"]), textcoords="offset points", fontsize=9,
                      xytext=(5, 5 if i % 2 == 0 else -13))
    largest = max((mib(r["activation_bytes"]) or 0) for r in rows)
    axis.set_xlim(0, largest * 1.25 or 1)  # from 0: the saving reads as a share of the whole
    axis.set_xlabel("saved activations per step (MiB, measured)\n← less memory is better")
    axis.set_ylabel("validation perplexity (lower is better ↓)")
    axis.set_title("quality vs saved activations")
    axis.grid(alpha=0.3)


def _peak_by_category(axis, rows: list[dict[str, Any]]) -> None:
    from matplotlib import colormaps

    palette = colormaps["Pastel2"]  # not the method colours of the other panels
    names = [row["method"] for row in rows]
    left = [0.0] * len(rows)
    for j, category in enumerate(CATEGORIES):
        widths = [mib((row["peak_breakdown"] or {}).get(category)) or 0.0 for row in rows]
        axis.barh(names, widths, left=left, color=palette(j), edgecolor="grey", label=category.replace("_", " "))
        left = [a + b for a, b in zip(left, widths, strict=True)]
    axis.invert_yaxis()  # the --methods order from the top
    axis.set_xlim(0, max(left) * 1.05 or 1)
    axis.set_xlabel("peak of one training step (MiB, measured)\n← less memory is better")
    axis.set_title("peak step memory by category")
    # below the axes: inside it would cover the last bars
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)


def _loss_vs_full(axis, rows: list[dict[str, Any]], window: int) -> None:
    reference = next((row for row in rows if row["method"] == "full"), None)
    for i, row in enumerate(rows):
        steps = [point[0] for point in row["loss_curve"]]
        losses = smooth([point[1] for point in row["loss_curve"]], window)
        if reference is not None:
            if row is reference:
                continue
            full = smooth([point[1] for point in reference["loss_curve"]], window)
            losses = [a - b for a, b in zip(losses, full, strict=False)]
            steps = steps[: len(losses)]
        axis.plot(steps, losses, color=f"C{i}", linestyle=LINE_STYLES[i % len(LINE_STYLES)], linewidth=1.3,
                  label=f"{row['method']} (val ppl {row['val_ppl']:.1f})")
    if reference is not None:
        axis.axhline(0.0, color="black", linewidth=1.0, label=f"full (val ppl {reference['val_ppl']:.1f})")
        axis.set_ylabel(f"training loss − full's ({window}-step mean)\n↓ below 0: lower loss than full")
        axis.set_title("loss difference to full training")
    else:
        axis.set_ylabel(f"training loss ({window}-step mean), lower is better ↓")
        axis.set_title("training loss")
    axis.set_xlabel("step")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)


def write_plot(summary: dict[str, Any], path: Path) -> Path | None:
    """Render compare.png (None when matplotlib is missing)."""
    plt = pyplot()
    if plt is None:
        return None
    rows = summary["rows"]
    window = max(1, summary["setting"]["steps"] // 20)
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 5))
    _quality_vs_activations(left, rows)
    _peak_by_category(middle, rows)
    _loss_vs_full(right, rows, window)
    setting = summary["setting"]
    fig.suptitle(f"velora compare: {setting['model']} pre-trained from scratch, "
                 f"{setting['tokens_per_method']:,} tokens per method")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
