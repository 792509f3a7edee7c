"""MTEB evaluation: local tasks through mteb.evaluate, the eval entry point, baselines, compare.py. Tiny data only."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules.input_module import InputModule

import spt_embed.evaluation.evaluate as ev
from spt_embed.cli.eval_commands import add_eval_parser
from spt_embed.evaluation.mteb_tasks import LOCAL_TASKS, get_tasks, load_task_data
from spt_embed.evaluation.senteval_tasks import SENTEVAL_TASKS
from spt_embed.model.backbone import load_backbone
from spt_embed.model.baselines import BaselineModule, baseline_encoder
from spt_embed.model.encoder import SuffixPromptEncoder, save

mteb = pytest.importorskip("mteb")

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------------
# Tiny data in the bundled layout

# Words from the tiny test tokenizer's vocabulary, so that the tiny backbones see distinct texts.
_ADJ = ["red", "blue", "green", "big", "small", "red", "blue", "green"]
_NOUN = ["man", "woman", "child", "dog", "cat", "cat", "dog", "man"]
STS_PAIRS = [
    (f"a {adj} {noun} sleeps", f"the {noun} runs in the {adj} park quickly", score)
    for adj, noun, score in zip(_ADJ, _NOUN, [0.0, 0.8, 1.5, 2.2, 3.0, 3.7, 4.4, 5.0])
]
_LEFT = {a: i for i, (a, _, _) in enumerate(STS_PAIRS)}
_RIGHT = {b: i for i, (_, b, _) in enumerate(STS_PAIRS)}
TOPICS = 6  # retrieval: query i is relevant to doc i; docs 4 and 5 have no query
LABELS = ["card_arrival", "top_up", "refund"]


def write_toy_data(root: Path) -> Path:
    (root / "stsb").mkdir(parents=True)
    for split in ("train", "dev", "test"):
        rows = [f"main-captions\tMSRvid\t2012test\t{i:04d}\t{y:.3f}\t{a}\t{b}" for i, (a, b, y) in enumerate(STS_PAIRS)]
        (root / "stsb" / f"sts-{split}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (root / "sick").mkdir()
    header = "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
    files = {"SICK_train.txt": slice(0, 3), "SICK_trial.txt": slice(3, 5), "SICK_test_annotated.txt": slice(5, None)}
    for name, part in files.items():
        pairs = STS_PAIRS[part]
        rows = [f"{i}\t{a}\t{b}\t{1 + 0.8 * y:.2f}\tNEUTRAL" for i, (a, b, y) in enumerate(pairs)]
        (root / "sick" / name).write_text(header + "\n".join(rows) + "\n", encoding="utf-8")
    beir = root / "beir_scifact"
    (beir / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": f"title t{i}", "text": f"text about t{i}", "metadata": {}} for i in range(TOPICS)]
    queries = [{"_id": f"q{i}", "text": f"question on t{i}", "metadata": {}} for i in range(TOPICS)]
    (beir / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    (beir / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    qrels = "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(4))
    (beir / "qrels" / "test.tsv").write_text(qrels, encoding="utf-8")
    (root / "banking77").mkdir()
    for split, per_label in (("train", 10), ("test", 4)):
        rows = [f'"{label} request, number {i}",{label}' for label in LABELS for i in range(per_label)]
        (root / "banking77" / f"{split}.csv").write_text("text,category\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return root


@pytest.fixture
def data_root(tmp_path, monkeypatch) -> Path:
    root = write_toy_data(tmp_path / "data")
    monkeypatch.setenv("SPT_EMBED_DATA", str(root))
    return root


# ---------------------------------------------------------------------------------------------------------------
# Toy encoders: a SentenceTransformer whose input module maps each text to a chosen vector


class ToyModule(InputModule):
    def __init__(self, embed: Callable[[str], list[float]], dim: int):
        super().__init__()
        self.embed, self.dim = embed, dim
        self.max_seq_length = 512
        self.calls: list[tuple[str | None, str | None, list[str]]] = []

    def preprocess(self, inputs, prompt=None, **kwargs):
        self.calls.append((prompt, kwargs.get("task"), list(inputs)))
        return {"vectors": torch.tensor([self.embed(text) for text in inputs], dtype=torch.float32)}

    def forward(self, features, **kwargs):
        features["sentence_embedding"] = features["vectors"]
        return features

    def get_embedding_dimension(self) -> int:
        return self.dim

    def save(self, *args, **kwargs) -> None:
        raise NotImplementedError


def toy_encoder(embed: Callable[[str], list[float]], dim: int) -> SentenceTransformer:
    return SentenceTransformer(modules=[ToyModule(embed, dim)], device="cpu")


def perfect_sts(text: str) -> list[float]:
    """cos(left_i, right_i) rises with the gold score of pair i."""
    if text in _LEFT:
        return [1.0, 0.0]
    angle = (1 - STS_PAIRS[_RIGHT[text]][2] / 5) * math.pi / 2
    return [math.cos(angle), math.sin(angle)]


def one_hot_topic(text: str) -> list[float]:
    topic = int(re.search(r"t(\d+)", text).group(1))
    return [1.0 if k == topic else 0.0 for k in range(TOPICS)]


def one_hot_label(text: str) -> list[float]:
    return [1.0 if text.startswith(label) else 0.0 for label in LABELS]


def constant(dim: int) -> Callable[[str], list[float]]:
    return lambda text: [1.0] + [0.0] * (dim - 1)


def run(model: SentenceTransformer, name: str) -> float:
    task = get_tasks([name])[0]
    result = mteb.evaluate(model, task, cache=None, co2_tracker=False, show_progress_bar=False)
    return float(result.task_results[0].get_score())


# ---------------------------------------------------------------------------------------------------------------
# Local tasks through mteb.evaluate


@pytest.mark.parametrize(
    ("task", "perfect", "dim"),
    [
        ("STSBenchmark", perfect_sts, 2),
        ("SICK-R", perfect_sts, 2),
        ("SciFact", one_hot_topic, TOPICS),
        ("Banking77Classification", one_hot_label, len(LABELS)),
    ],
)
def test_local_task_perfect_vs_constant_encoder(data_root, task, perfect, dim):
    assert run(toy_encoder(perfect, dim), task) == pytest.approx(1.0)
    score = run(toy_encoder(constant(dim), dim), task)
    assert not score > 0.9  # NaN for STS (constant similarities have no rank correlation)


def test_local_tasks_match_mteb_metadata(data_root):
    copies = {name: cls for name, cls in LOCAL_TASKS.items() if name not in SENTEVAL_TASKS}  # mteb has no SentEval
    assert set(copies) == {"STSBenchmark", "SICK-R", "SciFact", "Banking77Classification"}
    for name, cls in copies.items():
        builtin = mteb.get_task(name)
        task = cls()
        assert isinstance(task, type(builtin))  # mteb's own protocol class
        assert task.metadata.main_score == builtin.metadata.main_score
        assert task.metadata.eval_splits == builtin.metadata.eval_splits
        load_task_data(task)
        assert task.metadata.revision.startswith("local-")


def test_local_task_sizes(data_root):
    sick, scifact, banking = get_tasks(["SICK-R", "SciFact", "Banking77Classification"])
    for task in (sick, scifact, banking):
        load_task_data(task)
    assert len(sick.dataset["test"]) == len(STS_PAIRS)  # train + trial + test, as mteb's SICK-R
    split = scifact.dataset["default"]["test"]
    assert len(split["corpus"]) == TOPICS and len(split["queries"]) == 4  # only queries with qrels
    assert len(banking.dataset["train"]) == 30 and sorted(set(banking.dataset["test"]["label"])) == [0, 1, 2]


def test_stsb_validation_split_for_selection(data_root):
    (task,) = get_tasks(["STSBenchmark"], eval_splits=["validation"])
    result = mteb.evaluate(toy_encoder(perfect_sts, 2), task, cache=None, co2_tracker=False, show_progress_bar=False)
    assert list(result.task_results[0].scores) == ["validation"]


def test_retrieval_prompts_reach_the_encoder(data_root):
    model = toy_encoder(one_hot_topic, TOPICS)
    encoder = ev.mteb_encoder(model, query_prompt="Q: ", document_prompt="D: ")
    mteb.evaluate(encoder, get_tasks(["SciFact"]), cache=None, co2_tracker=False, show_progress_bar=False)
    calls = model[0].calls
    queries = [c for c in calls if c[1] == "query"]
    documents = [c for c in calls if c[1] == "document"]
    assert queries and all(prompt == "Q: " for prompt, _, _ in queries)
    assert documents and all(prompt == "D: " for prompt, _, _ in documents)
    assert any("question on t0" in text for _, _, texts in queries for text in texts)


# ---------------------------------------------------------------------------------------------------------------
# Task lookup errors


def test_unknown_task_lists_local_tasks():
    with pytest.raises(ValueError, match="STSBenchmark.*SciFact"):
        get_tasks(["NoSuchTask"])


def test_unknown_split_is_an_error():
    with pytest.raises(ValueError, match="validation"):
        get_tasks(["SICK-R"], eval_splits=["validation"])


def test_unreachable_builtin_names_local_tasks(monkeypatch):
    (task,) = get_tasks(["STS12"])  # a built-in: not local

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(task, "load_data", offline)
    with pytest.raises(FileNotFoundError, match="offline, use a local task: STSBenchmark"):
        load_task_data(task)


def test_missing_data_file_is_named(data_root):
    (data_root / "sick" / "SICK_trial.txt").unlink()
    with pytest.raises(FileNotFoundError, match="SICK_trial.txt"):
        load_task_data(get_tasks(["SICK-R"])[0])


# ---------------------------------------------------------------------------------------------------------------
# evaluate(): models, results folder, reuse


@pytest.fixture
def llama(backbones) -> Path:
    return backbones["llama"]


def test_evaluate_baseline_writes_mteb_results_and_reuses_them(data_root, llama, tmp_path, monkeypatch):
    out = tmp_path / "results" / "mean"
    scores = ev.evaluate(str(llama), ["STSBenchmark", "Banking77Classification"], out, baseline="mean", batch_size=4)
    assert set(scores) == {"STSBenchmark", "Banking77Classification"}
    result = mteb.TaskResult.from_disk(out / "STSBenchmark.json")
    assert result.task_name == "STSBenchmark" and "test" in result.scores
    assert json.loads((out / ev.IDENTITY_NAME).read_text())["identity"]["baseline"] == "mean"

    def no_model(*args, **kwargs):
        raise AssertionError("results exist: the model must not be loaded")

    monkeypatch.setattr(ev, "load_model", no_model)
    assert ev.evaluate(str(llama), ["STSBenchmark", "Banking77Classification"], out, baseline="mean") == scores

    with pytest.raises(ValueError, match="different|another output folder"):
        ev.evaluate(str(llama), ["STSBenchmark"], out, baseline="last")


def test_evaluate_overwrite_replaces_another_models_results(data_root, llama, tmp_path):
    out = tmp_path / "out"
    ev.evaluate(str(llama), ["STSBenchmark", "SICK-R"], out, baseline="mean", batch_size=8)
    ev.evaluate(str(llama), ["STSBenchmark"], out, baseline="prompteol", overwrite=True, batch_size=8)
    assert not (out / "SICK-R.json").exists()  # the other model's results are gone, not mixed in
    assert json.loads((out / ev.IDENTITY_NAME).read_text())["identity"]["baseline"] == "prompteol"


def test_unreadable_result_is_recomputed(data_root, llama, tmp_path):
    out = tmp_path / "out"
    first = ev.evaluate(str(llama), ["STSBenchmark"], out, baseline="last", batch_size=8)
    (out / "STSBenchmark.json").write_text('{"task_name": "STSBenchmark", "scores": {"test": "cut')
    assert ev.evaluate(str(llama), ["STSBenchmark"], out, baseline="last", batch_size=8) == first


def test_evaluate_adapter(data_root, llama, tmp_path):
    adapter = tmp_path / "adapter"
    save(SuffixPromptEncoder.from_backbone(str(llama), num_tokens=2), adapter)
    scores = ev.evaluate(str(adapter), ["STSBenchmark"], tmp_path / "out", batch_size=8)
    assert -1.0 <= scores["STSBenchmark"] <= 1.0


def test_results_folder_without_identity_is_refused(data_root, llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "STSBenchmark.json").write_text(json.dumps({"task_name": "STSBenchmark", "scores": {}}))
    with pytest.raises(ValueError, match="without a spt_eval.json"):
        ev.evaluate(str(llama), ["STSBenchmark"], out, baseline="mean")


@pytest.mark.parametrize(
    ("spec", "baseline", "error", "match"),
    [
        ("no/such/model", None, FileNotFoundError, "not found"),
        ("EMPTY_DIR", None, FileNotFoundError, "not found"),
        ("LLAMA", None, ValueError, "--baseline"),
        ("smollm2-135m", None, ValueError, "--baseline"),
        ("LLAMA", "max", ValueError, "mean, last, prompteol"),
        ("EMPTY_DIR", "mean", FileNotFoundError, "config.json"),
    ],
)
def test_bad_model_specs(llama, tmp_path, spec, baseline, error, match):
    (tmp_path / "empty").mkdir()
    spec = {"EMPTY_DIR": str(tmp_path / "empty"), "LLAMA": str(llama)}.get(spec, spec)
    with pytest.raises(error, match=match):
        ev.resolve_model(spec, baseline)


def test_bad_task_fails_before_touching_the_output(llama, tmp_path):
    with pytest.raises(ValueError, match="Unknown task"):
        ev.evaluate(str(llama), ["STSBenchmrk"], tmp_path / "out", baseline="mean")
    assert not (tmp_path / "out").exists()


def test_reference_encoder_is_found_without_importing():
    resolved = ev.resolve_model("all-minilm-l6-v2")
    assert resolved.kind == "sentence-transformer" and (Path(resolved.location) / "modules.json").is_file()


def test_eval_cli(data_root, llama, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    argv = ["eval", "--model", str(llama), "--baseline", "last", "--tasks", "STSBenchmark"]
    args = parser.parse_args([*argv, "--output", str(tmp_path / "o")])
    args.func(args)
    assert "STSBenchmark" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# Baselines


@pytest.mark.parametrize("baseline", ["mean", "last", "prompteol"])
def test_baseline_batched_equals_alone(llama, baseline):
    model = baseline_encoder(str(llama), baseline, device="cpu")
    texts = ["a man is playing a flute .", "hello", "the dog runs in the park quickly"]
    batched = model.encode(texts, batch_size=8, convert_to_tensor=True)
    alone = torch.stack([model.encode([t], convert_to_tensor=True)[0] for t in texts])
    assert torch.allclose(batched, alone, atol=1e-5)


def test_prompteol_truncation_keeps_the_template_tail(llama):
    module = BaselineModule(load_backbone(str(llama)), "prompteol", max_length=12)
    features = module.preprocess(["hello", " ".join(["dog"] * 50)])
    ids = features["input_ids"]
    assert ids.shape[1] == 12
    assert torch.equal(ids[0, -module._tail :], ids[1, -module._tail :])  # both end in `means in one word:"`


def test_baseline_prompt_goes_inside_the_template(llama):
    module = BaselineModule(load_backbone(str(llama)), "prompteol")
    tok = module.tokenizer
    with_prompt = module.preprocess(["dog"], prompt="cat ")["input_ids"][0].tolist()
    expected = tok(['This sentence : "cat dog" means in one word:"'])["input_ids"][0]
    assert with_prompt == expected


# ---------------------------------------------------------------------------------------------------------------
# compare.py


def _compare_module():
    spec = importlib.util.spec_from_file_location("compare", REPO / "eval" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_result(folder: Path, task: str, score: float, split: str = "test") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    entry = {"main_score": score, "hf_subset": "default", "languages": ["eng-Latn"]}
    data = {"task_name": task, "dataset_revision": "local", "mteb_version": "2.26.24", "scores": {split: [entry]}}
    (folder / f"{task}.json").write_text(json.dumps(data))


def test_compare_table_and_plot(tmp_path):
    compare = _compare_module()
    _write_result(tmp_path / "minilm", "STSBenchmark", 0.820325)
    _write_result(tmp_path / "minilm", "SciFact", 0.64508)
    _write_result(tmp_path / "spt", "STSBenchmark", 0.7)
    _write_result(tmp_path / "spt", "SciFact", 0.5, split="validation")  # no test split: its only split counts
    (tmp_path / "spt" / "spt_eval.json").write_text(json.dumps({"model": "x", "identity": {}}))
    table_path, plot_path = tmp_path / "table.md", tmp_path / "scores.png"
    # The table path among the folders mimics a shell glob (eval/results/*) that also matches earlier outputs.
    folders = [str(tmp_path / "minilm"), str(tmp_path / "spt"), str(table_path)]
    assert compare.main([*folders, "--out", str(table_path), "--plot", str(plot_path)]) == 0
    assert table_path.read_text() == (
        "| model | STSBenchmark | SciFact | average |\n"
        "|---|---:|---:|---:|\n"
        "| minilm | 82.03 | 64.51 | 73.27 |\n"
        "| spt | 70.00 | 50.00 | 60.00 |\n"
    )
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_missing_task_has_no_average(tmp_path):
    compare = _compare_module()
    _write_result(tmp_path / "a", "STSBenchmark", 0.5)
    _write_result(tmp_path / "b", "SICK-R", 0.25)
    text = compare.markdown_table(compare.collect([tmp_path / "a", tmp_path / "b"]))
    assert "| a | 50.00 | – | – |" in text and "| b | – | 25.00 | – |" in text


def test_compare_reads_evaluate_output(data_root, llama, tmp_path):
    compare = _compare_module()
    scores = ev.evaluate(str(llama), ["STSBenchmark"], tmp_path / "mean", baseline="mean", batch_size=8)
    table = compare.collect([tmp_path / "mean"])
    assert table["mean"]["STSBenchmark"] == pytest.approx(100 * scores["STSBenchmark"], abs=1e-3)


def test_compare_empty_folder_is_an_error(tmp_path, capsys):
    compare = _compare_module()
    (tmp_path / "empty").mkdir()
    assert compare.main([str(tmp_path / "empty")]) == 2
    assert "no mteb result files" in capsys.readouterr().err


def test_compare_reads_rows_of_a_results_file(tmp_path, capsys):
    compare = _compare_module()
    rows = tmp_path / "budget.jsonl"
    rows.write_text(
        json.dumps({"name": "spt", "scores": {"STSBenchmark": 77.22, "SciFact": 35.37}}) + "\n"
        + json.dumps({"name": "unevaluated", "best_dev": 80.0}) + "\n"
        + json.dumps({"name": "lora", "scores": {"STSBenchmark": 80.38, "SciFact": 38.6}}) + "\n"
    )
    _write_result(tmp_path / "minilm", "STSBenchmark", 0.820325)
    _write_result(tmp_path / "minilm", "SciFact", 0.64508)
    table_path = tmp_path / "table.md"
    assert compare.main([str(tmp_path / "minilm"), f"{rows}#lora", "--out", str(table_path)]) == 0
    body = table_path.read_text().splitlines()[2:]
    assert body == ["| minilm | 82.03 | 64.51 | 73.27 |", "| lora | 80.38 | 38.60 | 59.49 |"]
    assert list(compare.collect([rows])) == ["spt", "lora"]  # the whole file: every row that has scores
    assert compare.main([f"{rows}#unevaluated"]) == 2
    assert "no row 'unevaluated' with scores (rows with scores: spt, lora)" in capsys.readouterr().err
    # A glob's other .jsonl logs (no scores in them) are skipped, not an error.
    (tmp_path / "log.jsonl").write_text(json.dumps({"model": "x", "spearman": 1.0}) + "\n")
    assert compare.main([str(tmp_path / "minilm"), str(tmp_path / "log.jsonl")]) == 0
    assert compare.main([str(tmp_path / "missing.jsonl#spt")]) == 2
    assert "is not a results file" in capsys.readouterr().err
