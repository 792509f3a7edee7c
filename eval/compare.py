"""Result folders of `spt-embed eval` -> a markdown table (rows models, columns tasks + average) and a bar chart.

    python eval/compare.py eval/results/* --out eval/results/table.md --plot eval/results/scores.png
    python eval/compare.py eval/results/smollm2-prompteol-bf16 train/results/budget-60.jsonl#lora-graded-lr3e-3

Each folder is one model (its name labels the row); every mteb result file (``<Task>.json``, any depth) in it
gives the task's main score, the mean over its evaluated splits ("test" only when a test split exists), x100.
A source ``FILE.jsonl#NAME`` is the row NAME of a results file that `train/compare.py` writes (its ``scores``, x100
already; the row name labels it), and ``FILE.jsonl`` alone is every row of it that has scores, so the tables of
runs whose folders are gone can still be regenerated from the committed results files.
The average is over the table's tasks and is left empty for a model that lacks any of them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("compare")

MISSING = "–"
# Column order for the tasks spt-embed runs offline; any other task follows in the order found.
PREFERRED_ORDER = ("STSBenchmark", "SICK-R", "SciFact", "Banking77Classification")


def read_scores(folder: Path) -> dict[str, float]:
    """Task name -> main score x100 from the mteb result files under `folder`."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of mteb results (spt-embed eval --output ...).")
    scores: dict[str, float] = {}
    for path in sorted(folder.rglob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not (isinstance(data, dict) and "task_name" in data and isinstance(data.get("scores"), dict)):
            continue  # spt_eval.json, model_meta.json and other non-result files
        splits = ["test"] if "test" in data["scores"] else sorted(data["scores"])
        values = [entry["main_score"] for split in splits for entry in data["scores"][split] if "main_score" in entry]
        if not values:
            raise ValueError(f"{path}: no main_score in splits {splits}; is it an mteb result file?")
        scores[data["task_name"]] = 100 * sum(values) / len(values)
    return scores


def read_rows(source: str) -> dict[str, dict[str, float]]:
    """Row name -> task scores from a `train/compare.py` results file: ``FILE.jsonl`` (every row that has scores)
    or ``FILE.jsonl#NAME`` (that row; an error when it is missing or has no scores)."""
    path_text, _, wanted = source.partition("#")
    path = Path(path_text)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a results file (train/compare.py writes train/results/<spec>.jsonl).")
    rows: dict[str, dict[str, float]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{number} is not JSON ({exc}); is it a train/compare.py results file?") from None
        if isinstance(row, dict) and isinstance(row.get("scores"), dict) and row["scores"]:
            rows[str(row.get("name", f"row {number}"))] = {task: float(v) for task, v in row["scores"].items()}
    if not wanted:
        return rows  # may be empty: a glob such as eval/results/* also matches other .jsonl logs
    if wanted not in rows:
        names = ", ".join(rows) or "none"
        raise ValueError(f"{path} has no row {wanted!r} with scores (rows with scores: {names}).")
    return {wanted: rows[wanted]}


def is_rows_source(source: str | Path) -> bool:
    return str(source).partition("#")[0].endswith(".jsonl")


def collect(sources: list[Path | str]) -> dict[str, dict[str, float]]:
    """Model label (folder or row name) -> task scores; sources without any result are an error."""
    table: dict[str, dict[str, float]] = {}
    for source in sources:
        if is_rows_source(source):
            rows = read_rows(str(source))
            if not rows:
                logger.info("skipping %s: no row with scores", source)
            for name, scores in rows.items():
                table[name if name not in table else f"{source} {name}"] = scores
            continue
        folder = Path(source)
        scores = read_scores(folder)
        if not scores:
            raise FileNotFoundError(f"{folder} holds no mteb result files (<Task>.json).")
        label = folder.name if folder.name not in table else str(folder)
        table[label] = scores
    return table


def task_columns(table: dict[str, dict[str, float]], tasks: list[str] | None = None) -> list[str]:
    if tasks:
        return tasks
    found: list[str] = []
    for scores in table.values():
        found.extend(task for task in scores if task not in found)
    return [task for task in PREFERRED_ORDER if task in found] + [task for task in found if task not in PREFERRED_ORDER]


def average(scores: dict[str, float], tasks: list[str]) -> float | None:
    if not tasks or any(task not in scores for task in tasks):
        return None
    return sum(scores[task] for task in tasks) / len(tasks)


def markdown_table(table: dict[str, dict[str, float]], tasks: list[str] | None = None) -> str:
    tasks = task_columns(table, tasks)
    header = ["model", *tasks, "average"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for label, scores in table.items():
        cells = [f"{scores[task]:.2f}" if task in scores else MISSING for task in tasks]
        mean = average(scores, tasks)
        cells.append(f"{mean:.2f}" if mean is not None else MISSING)
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(table: dict[str, dict[str, float]], path: Path, tasks: list[str] | None = None) -> None:
    """Grouped bars: one group per task (and the average), one bar per model."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    tasks = task_columns(table, tasks)
    groups = [*tasks, "average"]
    width = 0.8 / max(1, len(table))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) + 0.4 * len(table)), 4.5))
    # The default cycle repeats after 10 colours, which would give two models the same bar colour.
    colours = plt.get_cmap("tab10" if len(table) <= 10 else "tab20").colors
    for index, (label, scores) in enumerate(table.items()):
        mean = average(scores, tasks)
        values = [scores.get(task, 0.0) for task in tasks] + [mean if mean is not None else 0.0]
        positions = [group + (index - (len(table) - 1) / 2) * width for group in range(len(groups))]
        ax.bar(positions, values, width=width, label=label, color=colours[index % len(colours)])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=15)
    ax.set_ylabel("main score x100")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "folders", nargs="+", help="result folders written by spt-embed eval --output, or FILE.jsonl[#NAME] rows of "
        "a train/compare.py results file"
    )
    parser.add_argument("--tasks", nargs="+", default=None, help="columns to show, in order (default: all found)")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here (default: stdout only)")
    parser.add_argument("--plot", type=Path, default=None, help="write a bar chart PNG here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    # A shell glob such as eval/results/* also matches the table and plot files: keep folders (and rows) only.
    folders = [source for source in args.folders if is_rows_source(source) or Path(source).is_dir()]
    skipped = [source for source in args.folders if source not in folders]
    if skipped:
        logger.info("skipping non-folders: %s", ", ".join(skipped))
    try:
        if not folders:
            raise FileNotFoundError(f"None of {', '.join(map(str, args.folders))} is a results folder.")
        table = collect(folders)
        if not table:
            raise FileNotFoundError(f"None of {', '.join(map(str, args.folders))} holds scores.")
    except (FileNotFoundError, ValueError) as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 2
    text = markdown_table(table, args.tasks)
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    if args.plot:
        bar_chart(table, args.plot, args.tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
