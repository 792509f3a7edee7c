"""A run's log: every trainer log (loss, learning rate, dev score) appended as one JSON line, and its plot.

Both `spt-embed train` and `spt-embed mntp` hand `JsonlLogCallback` to their trainer; lines are appended, so the
log survives kills and continues on resume. Each line carries its wall-clock `time` (Unix seconds), from which
`training_minutes` recovers the time spent training at each step: the clock between logs, less the dev
evaluations' own runtime, summed over every (resumed) segment of the run. Both also hand it `UmaskCheckpoints`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback

from spt_embed.atomic import apply_umask, atomic_file


class JsonlLogCallback(TrainerCallback):
    """Appends every trainer log (loss, lr, dev score) as one JSON line; survives kills and resumes."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # marks where a (resumed) segment of training starts
            self._append({"step": state.global_step, "event": "train_begin"})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            self._append({"step": state.global_step, **logs})

    def _append(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")


class UmaskCheckpoints(TrainerCallback):
    """Gives each checkpoint, once written, the permissions the umask allows: peft saves LoRA weights through
    safetensors' writer, which creates files 0600 (readable by their owner only) whatever the umask."""

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            apply_umask(checkpoint)


def training_minutes(records: list[dict]) -> list[tuple[int, float]]:
    """(step, minutes of training so far) at each logged step: wall-clock between log lines, less dev evaluation
    runtimes, with the gap before each `train_begin` (loading, a kill, a resume) not counted."""
    points: list[tuple[int, float]] = []
    seconds, last = 0.0, None
    for record in records:
        if "time" not in record:
            continue
        if record.get("event") == "train_begin":
            last = record["time"]
            continue
        if last is not None:
            seconds += record["time"] - last - record.get("eval_runtime", 0.0)
        last = record["time"]
        points.append((record["step"], seconds / 60))
    return points


def plot_log(log_path: Path, out_path: Path, metric: str) -> None:
    """Training loss and dev Spearman against steps, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    loss = sorted({r["step"]: r["loss"] for r in records if "loss" in r}.items())
    dev = sorted({r["step"]: r[metric] for r in records if metric in r}.items())
    fig, ax_loss = plt.subplots(figsize=(7, 4))
    if loss:
        ax_loss.plot(*zip(*loss), color="tab:blue", label="train loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("InfoNCE loss", color="tab:blue")
    if dev:
        ax_dev = ax_loss.twinx()
        ax_dev.plot(*zip(*dev), "o-", color="tab:orange", label="STS-B dev Spearman")
        ax_dev.set_ylabel("STS-B dev Spearman (cosine)", color="tab:orange")
    ax_loss.set_title("spt-embed training")
    fig.tight_layout()
    with atomic_file(out_path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)
