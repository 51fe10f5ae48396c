"""Training curves from run folders: loss (train and validation), learning rate and gradient norm, with
several runs overlaid in one figure."""
from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen needed
import matplotlib.pyplot as plt  # noqa: E402

from scratchlm.errors import UserError  # noqa: E402
from scratchlm.files import atomic_write_bytes  # noqa: E402


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows) of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl; is it a run folder?")
    rows = []
    try:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                rows.append(json.loads(line))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; is it a metrics.jsonl scratchlm wrote?") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}, line {n}: not a JSON row ({e.msg}); remove or fix that line") from None
    if not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{path}: every line must be a JSON object; is it a metrics.jsonl scratchlm wrote?")
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def plot_runs(run_dirs: list[Path], out: Path, x: str = "tokens") -> Path:
    """Write a 2x2 figure (loss, val bits per byte, lr, grad norm) to `out` (PNG or SVG by suffix)."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (ax_loss, ax_bpb), (ax_lr, ax_norm) = axes
    for run_dir in run_dirs:
        train, val = read_metrics(run_dir)
        label = Path(run_dir).name
        line, = ax_loss.plot([r[x] for r in train], [r["loss"] for r in train], lw=1, alpha=0.8, label=f"{label} train")
        if val:
            ax_loss.plot([r[x] for r in val], [r["val_loss"] for r in val], "o--", ms=3, color=line.get_color(),
                         label=f"{label} val")
            ax_bpb.plot([r[x] for r in val], [r["val_bpb"] for r in val], "o-", ms=3, color=line.get_color(), label=label)
        ax_lr.plot([r[x] for r in train], [r["lr"] for r in train], color=line.get_color(), label=label)
        ax_norm.plot([r[x] for r in train], [r.get("grad_norm", float("nan")) for r in train], lw=1,
                     color=line.get_color(), label=label)
    for ax, title in ((ax_loss, "loss (nats/token)"), (ax_bpb, "validation bits per byte"),
                      (ax_lr, "learning rate"), (ax_norm, "gradient norm (before clipping)")):
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    return save_figure(fig, out)


def plot_schedule(lrs: list[float], title: str, out: Path) -> Path:
    """The learning rate of each step of a run (`train.optim.lr_at`), drawn before it starts."""
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(range(1, len(lrs) + 1), lrs)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    return save_figure(fig, out)


def save_figure(fig, out: Path) -> Path:
    """Write the figure (PNG or SVG by suffix) under a temporary name, then rename it into place."""
    fig.tight_layout()
    out = Path(out)
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UserError(f"{out}: choose a .png, .svg or .pdf file name")
    image = io.BytesIO()
    fig.savefig(image, format=out.suffix[1:].lower(), dpi=110)
    plt.close(fig)
    atomic_write_bytes(out, image.getvalue())
    return out
