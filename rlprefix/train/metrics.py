"""Metrics: JSONL (always), TensorBoard (when installed), and PNG curves."""
from __future__ import annotations

import json
import math
from pathlib import Path


class MetricLogger:
    """Appends one JSON object per step to `path`; on resume, drops records past the resumed step."""

    def __init__(self, path: str | Path, resume_step: int | None = None, tensorboard: bool = True,
                 enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package

                self.writer = SummaryWriter(str(self.path.parent / "tensorboard" / self.path.stem))
            except ImportError:
                self.writer = None

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(path: str | Path, keys: list[str], out_png: str | Path, title: str | None = None) -> Path | None:
    """Draw the curves of `keys` (one panel each) from a metrics JSONL file into a PNG."""
    records = read_metrics(path)
    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        return None
    import matplotlib  # here: slow to import, and only the final curves need it

    matplotlib.use("Agg")  # before pyplot: files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
