"""Issue 16's table: the prompt-tuning family against LoRA and the zero-shot template, from results files only.

    python train/family_table.py   # writes train/results/family.md, family.png and family-seeds.png

Rows (`ROWS` below): PromptEOL zero-shot (an `spt-embed eval` folder), then one row of the 60-minute comparison
(`train/results/budget-60.jsonl`, written by `train/compare.py train/configs/budget-60.yaml`) per method. A method
whose 60-minute run has not been recorded yet is shown as "not run". Columns: the four test scores and their
average, trained parameters, training minutes and seconds per step of the 60-minute run, the step benchmark's
median seconds and step memory for the method's step on 32 SNLI pairs (`train/results/bench_step.json`, one
machine for all methods), and the encoder's texts/s as `compare.py` timed it. Nothing is recomputed here: every
number comes from a results file named in the table's caption, so the table can be regenerated at any time.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from spt_embed.atomic import atomic_file, write_text

REPO = Path(__file__).resolve().parents[1]


def _eval_compare():
    """eval/compare.py (main scores of an `spt-embed eval` folder), loaded by path: `compare` is also the name of
    train/compare.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("spt_eval_compare", REPO / "eval" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


read_scores = _eval_compare().read_scores

TASKS = ("STSBenchmark", "SICK-R", "SciFact", "Banking77Classification")
# (label, method of the step benchmark, row of budget-60.jsonl or an `spt-embed eval` folder for the zero-shot row)
ROWS = (
    ("PromptEOL zero-shot (no training)", None, "eval/results/smollm2-prompteol-bf16"),
    ("suffix (K = 16, fast path), temperature 0.05", "fast", "suffix-template-graded"),
    ("suffix, temperature 0.02 (swept)", "fast", "suffix-template-graded-temp0.02"),
    ("suffix, lr 3e-2, temperature 0.02 (swept)", "fast", "suffix-template-graded-lr3e-2-temp0.02"),
    ("deep-suffix (K = 16 + per-layer offsets), lr 1e-2 (the shallow suffix's rate)", "deep-suffix",
     "deep-suffix-template-graded-fixed"),
    ("deep-suffix, lr 3e-2 (swept)", "deep-suffix", "deep-suffix-template-graded-lr3e-2"),
    ("deep-suffix, lr 3e-2, temperature 0.02 (swept)", "deep-suffix", "deep-suffix-template-graded-lr3e-2-temp0.02"),
    ("prompt (K = 16 before the text)", "prompt", "prompt-graded"),
    ("prefix (K = 16 keys/values per layer, peft)", "prefix", "prefix-graded"),
    ("LoRA r = 16, lr 2e-4 (the recipe's rate)", "lora", "lora-graded"),
    ("LoRA r = 16, lr 3e-3 (swept)", "lora", "lora-graded-lr3e-3"),
)
# (label, runs of budget-60.jsonl that differ only in `seed`): the seed table under the main one, with the mean of
# the seeds once all of them have run. The main table shows each method's first run.
SEEDS = (
    ("deep-suffix, lr 3e-2, temperature 0.02", ("deep-suffix-template-graded-lr3e-2-temp0.02",
                                                "deep-suffix-template-graded-lr3e-2-temp0.02-seed43")),
    ("LoRA r = 16, lr 3e-3", ("lora-graded-lr3e-3", "lora-graded-lr3e-3-seed43", "lora-graded-lr3e-3-seed44")),
    ("suffix, lr 3e-2, temperature 0.02", ("suffix-template-graded-lr3e-2-temp0.02",
                                           "suffix-template-graded-lr3e-2-temp0.02-seed43",
                                           "suffix-template-graded-lr3e-2-temp0.02-seed44")),
    ("suffix, lr 1e-2, temperature 0.02", ("suffix-template-graded-temp0.02", "suffix-template-graded-temp0.02-seed43",
                                           "suffix-template-graded-temp0.02-seed44")),
)


def row_average(row: dict) -> float:
    """The four-task average as `compare.py` recorded it in the results file, so the two never disagree (summing the
    rounded scores again in another order can land on the other side of a half); computed only for a row that has
    none (the zero-shot folder)."""
    if row.get("average") is not None:
        return row["average"]
    return round(sum(row["scores"][t] for t in TASKS) / len(TASKS), 2)


def tested(row: dict) -> bool:
    """Whether a recorded run has a score on every one of the four test tasks."""
    return all(t in row.get("scores", {}) for t in TASKS)


def load_rows(path: Path) -> dict[str, dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results file; run `python train/compare.py train/configs/budget-60.yaml`.")
    lines = path.read_text(encoding="utf-8").splitlines()
    return {row["name"]: row for row in map(json.loads, filter(str.strip, lines))}


def bench_pairs(path: Path) -> dict[str, dict]:
    """Mode -> the step benchmark's result for 32 pairs."""
    if not path.is_file():
        return {}
    return {r["mode"]: r for r in json.loads(path.read_text(encoding="utf-8"))["results"] if r["kind"] == "pairs"}


def table(budget: dict[str, dict], bench: dict[str, dict]) -> tuple[list[str], list[dict]]:
    header = ["method", *TASKS, "average", "trained params", "training min", "s/step (60-min run)",
              "bench s/step (32 pairs)", "bench step memory GB", "encode texts/s", "CPU of the run"]
    rows = []
    for label, mode, source in ROWS:
        if mode is None:
            scores = read_scores(REPO / source)
            entry = {"label": label, "scores": {t: round(scores[t], 2) for t in TASKS if t in scores}}
        elif source in budget:
            row = budget[source]
            entry = {"label": label, "scores": row["scores"], "average": row.get("average"),
                     "params": row.get("trained_params"),
                     "minutes": row.get("training_minutes"), "s_step": row.get("seconds_per_step"),
                     "encode": row.get("encode_texts_per_s"), "cpu": row.get("cpu"),
                     "steps_note": f" ({row['steps']} steps, stop_at_step)" if row.get("stopped_at_step") else ""}
        else:
            entry = {"label": label, "scores": {}, "not_run": True}
        if mode in bench:
            entry["bench_s"] = round(bench[mode]["median_s"], 2)
            entry["bench_mem"] = round(bench[mode]["step_mem_mb"] / 1024, 2)
            if not entry.get("not_run") and entry.get("params") is None:  # a run from before compare.py counted them
                entry["params"] = bench[mode].get("trainable_params")
        scores = entry["scores"]
        complete = all(t in scores for t in TASKS)
        entry["average"] = row_average(entry) if complete else None
        rows.append(entry)
    return header, rows


def markdown(header: list[str], rows: list[dict]) -> str:
    def cell(value):
        return "–" if value is None else f"{value:,}" if isinstance(value, int) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 2) + "---|"]
    best = {t: max((r["scores"][t] for r in rows if t in r["scores"]), default=None) for t in TASKS}
    for r in rows:
        if r.get("not_run"):
            lines.append(f"| {r['label']} | " + " | ".join(["not run"] + ["–"] * (len(header) - 2)) + " |")
            continue
        scores = [f"**{r['scores'][t]}**" if r["scores"].get(t) == best[t] else cell(r["scores"].get(t)) for t in TASKS]
        cpu = (r.get("cpu") or "–").split(" (")[0]
        minutes = cell(r.get("minutes")) + r.get("steps_note", "")
        lines.append("| " + " | ".join([r["label"], *scores, cell(r["average"]), cell(r.get("params")), minutes,
                                        cell(r.get("s_step")), cell(r.get("bench_s")), cell(r.get("bench_mem")),
                                        cell(r.get("encode")), cpu]) + " |")
    return "\n".join(lines) + "\n"


def run_seed(row: dict) -> int | None:
    """The seed a recorded run trained with: its override, else its recipe's."""
    overrides = row.get("overrides") or {}
    if "seed" in overrides:
        return overrides["seed"]
    import yaml

    config = REPO / row["config"]
    return yaml.safe_load(config.read_text(encoding="utf-8")).get("seed") if config.is_file() else None


def seed_table(budget: dict[str, dict]) -> str:
    """One line per run of SEEDS (its seed, test scores, average), then the mean over the seeds of each method that
    have run, when at least two have (a seed still to run leaves the others' mean standing), and how far apart they
    are (max - min of the average)."""
    header = ["method", "run", "seed", *TASKS, "average", "CPU of the run"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 3) + "---|"]
    for label, names in SEEDS:
        done = []
        for name in names:
            row = budget.get(name)
            if row is None or not tested(row):
                lines.append(f"| {label} | {name} | not run | " + " | ".join(["–"] * (len(header) - 3)) + " |")
                continue
            average = row_average(row)
            done.append((row["scores"], average))
            cpu = (row.get("cpu") or "–").split(" (")[0]
            lines.append("| " + " | ".join([label, name, str(run_seed(row)), *(str(row["scores"][t]) for t in TASKS),
                                            str(average), cpu]) + " |")
        if len(done) > 1:
            means = [round(sum(s[t] for s, _ in done) / len(done), 2) for t in TASKS]
            averages = [a for _, a in done]
            mean = round(sum(averages) / len(averages), 2)
            spread = round(max(averages) - min(averages), 2)
            lines.append(f"| **{label}** | mean of {len(done)} seeds | – | " + " | ".join(map(str, means))
                         + f" | **{mean}** (spread {spread}) | – |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(plt, fig, path: Path) -> None:
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)


def plot(rows: list[dict], path: Path) -> None:
    plt = _pyplot()
    shown = [r for r in rows if r["scores"]]
    fig, ax = plt.subplots(figsize=(10, 6))
    width = 0.8 / len(shown)
    for i, r in enumerate(shown):
        values = [r["scores"].get(t, 0) for t in TASKS]
        ax.bar([x + i * width for x in range(len(TASKS))], values, width, label=r["label"])
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(TASKS))], [t.replace("Classification", "") for t in TASKS])
    ax.set_ylabel("test main score x100")
    ax.set_title("SmolLM2-135M, 60 minutes of training on 2 CPU cores (or the steps they held),\n"
                 "STS-B train pairs in every trained row")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)  # below: no bar hidden
    fig.tight_layout()
    _save_png(plt, fig, path)


def budget_share_curve(row: dict) -> list[tuple[float, float]]:
    """A run's STS-B dev curve against the share of its budget, in %: each dev step over the steps the run trained.
    Every SEEDS run trained for the steps its method's 60 minutes held on the AMD EPYC (`stop_at_step` where it ran on
    another CPU), so at the same share two methods have had the same wall-clock on that machine, whatever CPU ran
    them; the minutes of runs on different CPUs do not compare."""
    return [(round(100 * step / row["steps"], 1), dev) for step, _minutes, dev in row.get("dev_curve") or []]


def seed_plot(budget: dict[str, dict], path: Path) -> None:
    """The seeds of each SEEDS method side by side: STS-B dev against the share of the budget (the selection set,
    one line a seed), then the test average and SciFact of each seed (a dot each, the mean as a bar)."""
    plt = _pyplot()
    fig, (curves, average, scifact) = plt.subplots(1, 3, figsize=(15, 5), gridspec_kw={"width_ratios": [2, 1, 1]})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = []
    for i, (label, names) in enumerate(SEEDS):
        colour = colours[i % len(colours)]
        rows = [budget[n] for n in names if n in budget]
        for j, row in enumerate(rows):
            points = budget_share_curve(row)
            curves.plot(*zip(*points), marker="o", color=colour, alpha=0.8, label=label if j == 0 else None)
        done = [r for r in rows if tested(r)]
        per_seed = ((average, [row_average(r) for r in done]), (scifact, [r["scores"]["SciFact"] for r in done]))
        for ax, values in per_seed:
            ax.scatter([i] * len(values), values, color=colour, zorder=3)
            if values:
                ax.hlines(sum(values) / len(values), i - 0.3, i + 0.3, color=colour)
        short = label.split(", temperature")[0].replace(" r = 16", "")  # the legend has the whole label
        labels.append(textwrap.fill(short, 12) + f"\n({len(done)} seeds)")
    curves.set_xlabel("share of the 60-minute budget, % (steps / the steps the hour held on the AMD EPYC)")
    curves.set_ylabel("STS-B dev Spearman x100 (all 1,500 pairs)")
    curves.set_title("selection set, one line a seed")
    curves.legend(fontsize=8, loc="lower right")
    for ax, title in ((average, "test: average of the 4 tasks"), (scifact, "test: SciFact nDCG@10")):
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(title)
        ax.set_ylabel("a dot a seed, the bar their mean")
    for ax in (curves, average, scifact):
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M at equal wall-clock over seeds (STS-B train pairs in every run; test in float32)")
    fig.tight_layout()
    _save_png(plt, fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=Path, default=REPO / "train/results/budget-60.jsonl")
    parser.add_argument("--bench", type=Path, default=REPO / "train/results/bench_step.json")
    parser.add_argument("--out", type=Path, default=REPO / "train/results/family.md")
    args = parser.parse_args(argv)
    budget = load_rows(args.budget)
    header, rows = table(budget, bench_pairs(args.bench))
    text = markdown(header, rows)
    if SEEDS:
        text += "\nSeeds (runs that differ only in `seed`):\n\n" + seed_table(budget)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, text)
    plot(rows, args.out.with_suffix(".png"))
    if SEEDS:
        seed_plot(budget, args.out.with_name(args.out.stem + "-seeds.png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
