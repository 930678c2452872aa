"""Choose the prefix length by validation perplexity: one short warm start per length, the lowest wins.

    rlprefix sweep configs/quickstart.yaml --lengths 5 10 20 50 --steps 20

Each length gets the config's warm start (its data, eval split, learning rate, schedule, seed), the same
prefix kind and initialisation as `rlprefix run` would build, and `prefix.length` overridden. The score of a
length is the perplexity exp(L) of its best eval loss L (mean per-token NLL of the held-out completions); the
chosen length is the one with the lowest, the shorter one on a tie. Written to the output directory (default
OUTPUT_DIR/length_sweep): `sweep.json`, `sweep.md` (the table), `sweep.png` (eval loss and perplexity vs
length) and one directory per length with its warm-start metrics and checkpoint: rerunning the same sweep
resumes them; a length whose settings or data changed since starts afresh.
"""
from __future__ import annotations

import dataclasses
import io
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlprefix.settings import ConfigError
from rlprefix.config import RunConfig, load_config, stage_config
from rlprefix.freshness import sweep_keys, warm_start_data
from rlprefix.files import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from rlprefix.lock import OutputLock
from rlprefix.models.loading import load_model
from rlprefix.recipe import new_prefix, resolve_device
from rlprefix.preflight import check_dataset, check_output_dir
from rlprefix.train.stage_run import WARM_START_FILES
from rlprefix.train.warm_start import WarmStartConfig, warm_start

CRITERION = "lowest validation perplexity exp(best eval loss); a tie goes to the shorter prefix"


def check_lengths(lengths, name: str = "lengths") -> list[int]:
    """The prefix lengths to try, sorted and without repeats; each must be an integer >= 1."""
    values = list(lengths) if lengths is not None else []
    if not values:
        raise ValueError(f"{name}: give at least one prefix length to try (e.g. 5 10 20)")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: {v!r} is not a prefix length (each must be an integer >= 1)")
    return sorted(set(values))


def perplexity(eval_loss: float) -> float:
    """exp(mean per-token NLL); inf where that overflows. Not the training metrics' clipped perplexity
    (train.general_text.perplexity): this one ranks lengths, and a clip would tie every length past it."""
    return math.exp(eval_loss) if eval_loss < 700 else math.inf


def choose_length(rows: list[dict]) -> int:
    """The length with the lowest perplexity; the shorter one on a tie."""
    if not rows:
        raise ValueError("no sweep rows to choose from")
    return min(rows, key=lambda r: (r["perplexity"], r["length"]))["length"]


@dataclass
class SweepResult:
    rows: list[dict]          # per length: length, parameters, best_eval_loss, perplexity, best_step, steps, seconds
    chosen_length: int
    kind: str
    steps: int
    out_dir: Path | None = None

    def as_dict(self) -> dict:
        return {"criterion": CRITERION, "kind": self.kind, "steps": self.steps,
                "lengths": [r["length"] for r in self.rows], "chosen_length": self.chosen_length, "rows": self.rows}

    def table_md(self) -> str:
        lines = ["| length | trainable params | best eval loss | perplexity | best step | seconds |",
                 "|---|---|---|---|---|---|"]
        for r in self.rows:
            mark = " (chosen)" if r["length"] == self.chosen_length else ""
            lines.append(f"| {r['length']}{mark} | {r['parameters']:,} | {r['best_eval_loss']:.4f} | "
                         f"{r['perplexity']:.3f} | {r['best_step']} | {r['seconds']:.1f} |")
        return "\n".join(lines) + "\n"

    def report_md(self) -> str:
        return (f"# Prefix length sweep\n\n{self.kind} prefix, {self.steps} warm-start steps per length; chosen: "
                f"**{self.chosen_length}** ({CRITERION}).\n\n" + self.table_md())


def plot_sweep(result: SweepResult) -> bytes:
    """Eval loss and perplexity vs length (PNG bytes), the chosen length marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["length"] for r in result.rows]
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.2))
    for ax, key, title in ((axes[0], "best_eval_loss", "best eval loss"), (axes[1], "perplexity", "perplexity")):
        ys = [r[key] for r in result.rows]
        ax.plot(xs, ys, marker="o")
        best = next(r for r in result.rows if r["length"] == result.chosen_length)
        ax.plot([best["length"]], [best[key]], marker="o", color="tab:red", ls="", label=f"chosen: {best['length']}")
        ax.set_xlabel("prefix length")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result.kind} prefix, {result.steps} warm-start steps per length")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def sweep_lengths(config: RunConfig | str | Path, lengths, *, steps: int | None = None,
                  out_dir: str | Path | None = None, model=None, tokenizer=None, log=print) -> SweepResult:
    """Run a short warm start of `config` at each of `lengths`; return (and write) the table and the chosen length.

    `steps`: warm-start steps per length (default: the config's warm_start.steps). `model`/`tokenizer`: an
    already loaded model (default: the config's). Everything is checked before the model is loaded.
    """
    cfg = config if isinstance(config, RunConfig) else load_config(config)
    lengths = check_lengths(lengths)
    steps = cfg.warm_start.steps if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: {steps!r} is not a number of warm-start steps (must be an integer >= 1)")
    if not cfg.warm_start.data:
        raise ConfigError("warm_start.data: the sweep trains a warm start at each length on it; set it")
    if cfg.prefix.from_dir:
        raise ConfigError("prefix.from_dir: a sweep builds a fresh prefix at each length; unset it (prefix.from_dir=null)")
    sft = [["prompt", "completion"], ["messages"]]
    check_dataset(cfg.warm_start.data, "warm_start.data", sft)
    check_dataset(cfg.warm_start.eval_data, "warm_start.eval_data", sft)
    out = Path(out_dir) if out_dir is not None else Path(cfg.output_dir) / "length_sweep"
    check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out):
        return _sweep(cfg, lengths, steps, out, model, tokenizer, log)


def _sweep(cfg: RunConfig, lengths: list[int], steps: int, out: Path, model, tok, log) -> SweepResult:
    if model is None:
        model, tok = load_model(cfg.model.name, cfg.model.dtype, resolve_device(cfg.model.device))
    ws_cfg: WarmStartConfig = stage_config(cfg.warm_start, WarmStartConfig)
    ws_cfg.steps, ws_cfg.merge = steps, False  # only the loss is needed
    ws_cfg.progress = cfg.logging.progress and cfg.warm_start.progress
    data, rows = warm_start_data(cfg.warm_start), []
    for n in lengths:
        section = dataclasses.replace(cfg.prefix, length=n)
        run_dir = out / f"length_{n}"
        _fresh_if_changed(run_dir, sweep_keys(cfg, section, ws_cfg, data), log)
        torch.manual_seed(cfg.seed)  # each length starts from the same state, whatever ran before it
        prefix = new_prefix(section, model, tok, cfg.seed)
        params = prefix.num_parameters()
        t = time.perf_counter()
        res = warm_start(model, tok, prefix, cfg.warm_start.data, ws_cfg, eval_dataset=cfg.warm_start.eval_data,
                         output_dir=run_dir, tensorboard=cfg.logging.tensorboard)
        row = {"length": n, "parameters": params, "best_eval_loss": res.best_eval_loss,
               "perplexity": perplexity(res.best_eval_loss), "best_step": res.best_step, "steps": res.steps_done,
               "seconds": time.perf_counter() - t, "run_dir": str(run_dir)}
        rows.append(row)
        log(f"length {n}: {params:,} trainable parameters, best eval loss {row['best_eval_loss']:.4f} "
            f"(perplexity {row['perplexity']:.3f}) at step {row['best_step']}, {row['seconds']:.1f}s")
        del prefix, res
    result = SweepResult(rows, choose_length(rows), cfg.prefix.kind, steps, out)
    atomic_write_json(out / "sweep.json", result.as_dict())
    atomic_write_text(out / "sweep.md", result.report_md())
    atomic_write_bytes(out / "sweep.png", plot_sweep(result))
    return result


SETTINGS_FILE = "sweep_settings.json"


def _fresh_if_changed(run_dir: Path, keys: tuple[str, str], log) -> None:
    """A length's directory resumes only what the same settings and data wrote (`freshness.sweep_keys`: the key,
    and the one an earlier rlprefix recorded); otherwise its checkpoint goes (a sweep's per-length runs are its own
    working files, unlike `rlprefix run`'s stages)."""
    key, earlier = keys
    path = run_dir / SETTINGS_FILE
    old = read_json(path).get("key") if path.is_file() else None
    if old not in (key, earlier):
        checkpoint = run_dir / WARM_START_FILES.checkpoint
        if checkpoint.exists():
            log(f"{run_dir.name}: settings or data changed since its last warm start; starting it afresh")
            shutil.rmtree(checkpoint)
    if old != key:
        atomic_write_json(path, {"key": key})
