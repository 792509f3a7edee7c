"""The budget protocol: train every run of a comparison on the same data under the same wall-clock budget, select on
STS-B dev, evaluate through `spt-embed eval`, and write one results file and the learning-curve picture.

    python train/compare.py train/configs/compare.yaml                 # every run (finished ones are reused)
    python train/compare.py train/configs/compare.yaml --only spt-lr1e-2 lora-lr2e-4
    python train/compare.py train/configs/compare.yaml --report        # table + plot from what is there
    python train/compare.py train/configs/compare.yaml --only NAME --train-only   # train and select; no test yet

The spec (YAML):
    budget_minutes: 60            # training wall-clock per run (dev evaluations and checkpoint saves not counted)
    output: out/compare           # runs land in OUTPUT/NAME, their evaluations in OUTPUT/NAME.eval[-SPLITS]
    results: train/results/compare   # RESULTS.jsonl (one line per run), RESULTS.md (table), RESULTS.png (curves)
    eval_tasks: [STSBenchmark, SICK-R, SciFact, Banking77Classification]
    eval_splits: [test]           # optional; [validation] for a selection sweep (STS-B dev only)
    eval_dtype: bfloat16
    runs:
      - name: spt-lr1e-2
        config: train/configs/smollm2-nli.yaml
        overrides: {max_steps: 600, lr: 1.0e-2, eval_steps: 100, save_steps: 100, eval_pairs: 0}
      - name: lora-lr1e-3
        config: train/configs/smollm2-nli-lora.yaml
        overrides: {max_steps: 200, lr: 1.0e-3, eval_steps: 40, save_steps: 40, eval_pairs: 0}
        stop_at_step: 159         # optional: the steps another run's budget held (on another machine, say)
        cpu: AMD EPYC (AVX2)      # optional: where a recorded row ran, for rows from before the CPU was recorded
        eval_dtype: float32       # optional: this run's, in place of the spec's

A run stops at `max_steps`, at `stop_at_step`, or when its training time reaches the budget, whichever comes first
(the results say which); its learning-rate schedule is laid out over `max_steps`, so choose `max_steps` to fit the
budget (the measured seconds per step are in the results). A wall-clock budget compares runs on one machine only;
`stop_at_step` carries a budget to another machine as a step count: give a run the steps that its counterpart's
minutes held where it ran, with the same schedule. Every row records its CPU. Only STS-B dev selects: the best dev
checkpoint is what gets evaluated on the reported test sets.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import yaml
from transformers import TrainerCallback

import spt_embed
from spt_embed.atomic import atomic_file, write_text
from spt_embed.evaluation.evaluate import evaluate
from spt_embed.hardware import cpu_summary
from spt_embed.recipe import has_checkpoints
from spt_embed.training.run_log import training_minutes

logger = logging.getLogger("compare")
DEV_KEY = "eval_stsb-dev_spearman_cosine"


ENCODE_TEXTS = 256  # STS-B dev sentences timed by encode_speed (timing only: nothing is scored or selected on them)


def peak_rss_mb() -> float | None:
    """The process's peak resident memory so far (VmHWM), in MB; None where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Budget(TrainerCallback):
    """Stops training once the time spent inside optimiser steps, plus the seconds that mining hard negatives took
    before the first step (`--mine-negatives`, read from the run's train_config.json), reaches `minutes`; also notes
    the trained parameters (counted when training starts) and the process's peak memory."""

    def __init__(self, minutes: float, seconds_before: float = 0.0, stop_at_step: int | None = None,
                 run_dir: Path | None = None):
        self.limit = minutes * 60
        self.run_dir = run_dir
        self.mining_seconds = 0.0
        self.stop_at_step = stop_at_step
        self.seconds = seconds_before
        self.hit = False
        self.hit_step = False
        self.trained_params: int | None = None
        self.peak_rss_mb: float | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # Mining runs once, before the first step; on a resume `seconds_before` (the log's steps) leaves it out too.
        self.mining_seconds = mining_seconds(self.run_dir) if self.run_dir is not None else 0.0
        self.seconds += self.mining_seconds
        if model is not None:
            self.trained_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def on_train_end(self, args, state, control, **kwargs):
        self.peak_rss_mb = peak_rss_mb()

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds += time.monotonic() - self._start
        self.hit_step = self.stop_at_step is not None and state.global_step >= self.stop_at_step
        if self.seconds >= self.limit or self.hit_step:
            self.hit = not self.hit_step
            control.should_training_stop = True
            control.should_evaluate = control.should_save = True  # the last point still counts for selection


def mining_seconds(run_dir: Path) -> float:
    """Seconds the run's hard-negative mining took (0 without --mine-negatives), from its train_config.json."""
    path = run_dir / "train_config.json"
    if not path.is_file():
        return 0.0
    mined = json.loads(path.read_text()).get("mined_negatives") or {}
    return float(sum(item.get("seconds", 0.0) for item in mined.values()))


def finished(run_dir: Path) -> bool:
    return (run_dir / "train_config.json").is_file() and (run_dir / "training.png").is_file()


def train_run(run: dict, spec: dict, out: Path) -> None:
    config = spt_embed.TrainConfig.from_sources(run["config"], output=str(out), **run.get("overrides", {}))
    resume = has_checkpoints(out)
    records = read_log(out)
    done = training_minutes(records)[-1][1] * 60 if resume and records else 0.0
    budget = Budget(spec["budget_minutes"], seconds_before=done, stop_at_step=run.get("stop_at_step"), run_dir=out)
    logger.info("%s: training (%s)", run["name"], "resuming" if resume else "from scratch")
    # A run killed before its first checkpoint left a folder of ours with nothing to resume: start it again.
    spt_embed.train(config, resume=resume, overwrite=out.exists() and not resume, callbacks=[budget])
    record = {"budget_minutes": spec["budget_minutes"], "stopped_by_budget": budget.hit,
              "stopped_at_step": run.get("stop_at_step") if budget.hit_step else None, **cpu_summary(),
              "training_seconds": round(budget.seconds, 1),
              "mining_seconds": round(budget.mining_seconds, 1), "trained_params": budget.trained_params,
              "peak_rss_mb": round(budget.peak_rss_mb) if budget.peak_rss_mb else None}
    (out / "budget.json").write_text(json.dumps(record) + "\n")


def encode_speed(out: Path, spec: dict) -> None:
    """Texts per second of the trained encoder as `spt-embed eval` loads it (eval_dtype), on the first ENCODE_TEXTS
    STS-B dev sentences in batches of 32 after one warm-up batch; kept in the run's evaluation folder."""
    path = eval_dir(out, spec) / "encode_speed.json"
    if path.is_file():
        return
    from spt_embed.datafiles import load_sts
    from spt_embed.evaluation.evaluate import load_model, resolve_model
    from spt_embed.model.dtypes import resolve_dtype

    texts = load_sts("dev")[0][:ENCODE_TEXTS]
    dtype = str(resolve_dtype(spec.get("eval_dtype", "float32"))).removeprefix("torch.")
    model = load_model(resolve_model(str(out)), dtype=dtype)
    model.encode(texts[:32], batch_size=32)  # warm-up
    start = time.perf_counter()
    model.encode(texts, batch_size=32)
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"texts": len(texts), "seconds": round(seconds, 2), "dtype": dtype,
                                "texts_per_s": round(len(texts) / seconds, 1)}) + "\n")


def eval_dir(out: Path, spec: dict) -> Path:
    """Results beside the run (inside it they would change the model's digest) and per split set, so that a dev-only
    sweep and a later test evaluation never share result files."""
    splits = spec.get("eval_splits")
    return out.parent / f"{out.name}.eval" if not splits else out.parent / f"{out.name}.eval-{'-'.join(splits)}"


def read_log(out: Path) -> list[dict]:
    path = out / "train_log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def summarise(run: dict, spec: dict, out: Path) -> dict:
    records = read_log(out)
    minutes = dict(training_minutes(records))
    dev = [(r["step"], round(minutes.get(r["step"], float("nan")), 2), round(100 * r[DEV_KEY], 2))
           for r in records if DEV_KEY in r]
    steps = max((r["step"] for r in records if "step" in r), default=0)  # the last step, logged or evaluated
    total = max(minutes.values(), default=0.0)
    budget = json.loads((out / "budget.json").read_text()) if (out / "budget.json").is_file() else {}
    speed_path = eval_dir(out, spec) / "encode_speed.json"
    speed = json.loads(speed_path.read_text()) if speed_path.is_file() else {}
    scores = {}
    for task in spec["eval_tasks"]:
        path = eval_dir(out, spec) / f"{task}.json"
        if path.is_file():
            scores[task] = round(100 * _main_score(json.loads(path.read_text()), spec.get("eval_splits")), 2)
    return {
        "name": run["name"], "config": run["config"], "overrides": run.get("overrides", {}),
        "steps": steps, "training_minutes": round(total, 1),
        "eval_dtype": run_eval_dtype(run, spec),
        "seconds_per_step": round(60 * total / steps, 2) if steps else None,
        "stopped_by_budget": budget.get("stopped_by_budget"), "stopped_at_step": budget.get("stopped_at_step"),
        "cpu": budget.get("cpu") or run.get("cpu"), "trained_params": budget.get("trained_params"),
        "peak_rss_gb": round(budget["peak_rss_mb"] / 1024, 2) if budget.get("peak_rss_mb") else None,
        "encode_texts_per_s": speed.get("texts_per_s"), "dev_curve": dev,
        "best_dev": max((d for _, _, d in dev), default=None), "splits": spec.get("eval_splits") or "each task's own",
        "scores": scores,
        "average": round(sum(scores.values()) / len(scores), 2) if len(scores) == len(spec["eval_tasks"]) else None,
    }


def collect_rows(spec: dict) -> list[dict]:
    """One row per run, in spec order: summarised from its folder when it is here, else the row the results file
    already holds (runs from an earlier machine stay in the table; their folders need not be kept)."""
    path = Path(spec["results"]).with_suffix(".jsonl")
    recorded = {}
    if path.is_file():
        recorded = {row["name"]: row for row in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
    rows = []
    for run in spec["runs"]:
        out = Path(spec["output"]) / run["name"]
        if out.is_dir():
            rows.append(summarise(run, spec, out))
        elif run["name"] in recorded:
            row = recorded[run["name"]]
            rows.append({**row, "cpu": row.get("cpu") or run.get("cpu")})
    return rows


def _main_score(result: dict, splits: list[str] | None) -> float:
    values = [scores[0]["main_score"] for split, scores in result["scores"].items() if not splits or split in splits]
    return sum(values) / len(values)


def write_report(rows: list[dict], spec: dict) -> None:
    base = Path(spec["results"])
    base.parent.mkdir(parents=True, exist_ok=True)
    write_text(base.with_suffix(".jsonl"), "".join(json.dumps(row) + "\n" for row in rows))
    tasks = spec["eval_tasks"]
    split = f" ({'/'.join(spec['eval_splits'])})" if spec.get("eval_splits") else ""
    lines = ["| run | steps | training min | s/step | best STS-B dev during training | "
             + " | ".join(task + split for task in tasks)
             + " | average | trained params | peak RSS GB (training) | encode texts/s | CPU |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(tasks) + "---:|---:|---:|---:|---|"]

    def cell(value):
        return "–" if value is None else f"{value:,}" if isinstance(value, int) else value

    for row in rows:
        steps = f"{row['steps']} (stop_at_step)" if row.get("stopped_at_step") else row["steps"]
        cells = [row["name"], steps, row["training_minutes"], row["seconds_per_step"], row["best_dev"],
                 *(row["scores"].get(task, "–") for task in tasks), cell(row["average"]),
                 cell(row.get("trained_params")), cell(row.get("peak_rss_gb")), cell(row.get("encode_texts_per_s")),
                 cell(row.get("cpu"))]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    write_text(base.with_suffix(".md"), "\n".join(lines) + "\n")
    plot_curves(rows, base.with_suffix(".png"), spec["budget_minutes"])
    print("\n".join(lines))


def cpu_name(row: dict) -> str:
    """The row's CPU without the notes after it ("AMD EPYC, AVX2 only (...)" -> "AMD EPYC")."""
    return (row.get("cpu") or "CPU not recorded").split(" (")[0].split(",")[0]


def run_eval_dtype(run: dict, spec: dict) -> str:
    """The dtype a run is evaluated in: its own `eval_dtype`, else the spec's, else float32."""
    return run.get("eval_dtype", spec.get("eval_dtype", "float32"))


def line_style(row: dict) -> str:
    """Dashed for a LoRA run, solid otherwise: the method its recipe resolves to (its config with its overrides), not
    its name; a row whose config file is gone (kept from an earlier machine) is drawn solid."""
    try:
        method = spt_embed.TrainConfig.from_sources(row["config"], **row.get("overrides", {})).method
    except (FileNotFoundError, ValueError, TypeError):
        return "-"
    return "--" if method == "lora" else "-"


def plot_curves(rows: list[dict], path: Path, budget: float) -> None:
    """Dev score against training minutes, one panel per CPU (minutes on different CPUs do not compare); every run
    keeps one colour of its own, and LoRA runs are dashed so that the methods read apart at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cpus = list(dict.fromkeys(cpu_name(row) for row in rows)) or ["CPU not recorded"]
    fig, axes = plt.subplots(1, len(cpus), figsize=(6.5 * len(cpus) + 3, 4.8), sharey=True, squeeze=False)
    colours = plt.get_cmap("tab20" if len(rows) > 10 else "tab10")
    for index, row in enumerate(rows):
        ax = axes[0][cpus.index(cpu_name(row))]
        points = [(m, d) for _, m, d in row["dev_curve"] if m == m]  # m == m: NaN (no time logged) left out
        style = line_style(row)
        if points:
            ax.plot(*zip(*points), marker="o", linestyle=style, color=colours(index % colours.N), label=row["name"],
                    markersize=3)
    for ax, cpu in zip(axes[0], cpus):
        ax.axvline(budget, color="grey", linestyle=":", label=f"budget ({budget:g} min)")
        ax.set_title(cpu if len(cpus) > 1 else "", fontsize=10)
        ax.set_xlabel("training minutes (2 CPU cores; dev evaluations not counted)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("STS-B dev Spearman x100 (all 1,500 pairs)")
    fig.tight_layout()
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="comparison spec (YAML)")
    parser.add_argument("--only", nargs="+", help="run only these names (the report still covers all)")
    parser.add_argument("--report", action="store_true", help="no training or evaluation: table and plot only")
    parser.add_argument("--train-only", action="store_true",
                        help="train (with its dev curve) but do not evaluate on eval_splits yet: a run that loses on "
                        "dev keeps its row without spending the evaluation; a later run without it evaluates")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec = yaml.safe_load(Path(args.spec).read_text(encoding="utf-8"))
    names = [run["name"] for run in spec["runs"]]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        parser.error(f"--only {unknown}: not in {args.spec} (runs: {', '.join(names)})")
    for run in spec["runs"]:
        stop = run.get("stop_at_step")
        if stop is not None and (not isinstance(stop, int) or isinstance(stop, bool) or stop < 1):
            parser.error(f"{args.spec}, run {run['name']}: stop_at_step must be a whole number of steps >= 1, "
                         f"got {stop!r}")
    for run in spec["runs"]:
        out = Path(spec["output"]) / run["name"]
        if args.report or (args.only and run["name"] not in args.only):
            continue
        if not finished(out):
            train_run(run, spec, out)
        if args.train_only:
            continue
        run_spec = {**spec, "eval_dtype": run_eval_dtype(run, spec)}
        evaluate(str(out), spec["eval_tasks"], eval_dir(out, spec), dtype=run_spec["eval_dtype"],
                 eval_splits=spec.get("eval_splits"))
        encode_speed(out, run_spec)
    write_report(collect_rows(spec), spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
