"""Task soft prompts (issue 17): query and document prompts beside the default one on one frozen backbone, routed by
sentence-transformers' `encode_query` / `encode_document`, trained through `router_mapping`, kept by save/load and
by FAISS indexes; tiny random backbones."""

import json

import mteb
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import spt_embed
from spt_embed import ForwardPath, SuffixPromptEncoder
from spt_embed.evaluation import evaluate as ev
from spt_embed.evaluation.mteb_tasks import get_tasks
from spt_embed.model.config import WEIGHTS_NAME, SuffixPromptConfig, task_weights_key
from spt_embed.model.identity import prompt_routes
from spt_embed.model.module import SuffixPromptModule
from spt_embed.retrieval.index import build_index
from spt_embed.training.train import router_mapping
from spt_embed.training.train_config import TrainConfig

from .conftest import SENTENCES
from .test_eval import data_root  # noqa: F401 (data_root: a fixture)
from .test_readout_template import ANCHORS, POSITIVES, assert_fast_path_equals_full
from .test_train import config as train_config

TASKS = ["query", "document"]


def make(backbone_dir, *, perturb=True, method="suffix", **kwargs):
    """A two-prompt encoder whose three prompts differ (with `perturb`), as after training."""
    model = SuffixPromptEncoder.from_backbone(
        backbone_dir, num_tokens=4, tasks=TASKS, method=method, device="cpu", **kwargs
    )
    module = model.prompt_module
    if perturb:
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for tensor in module.task_prompts.values():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.5)
    return model


def test_fresh_prompts_are_equal_and_trained_ones_route(backbone_dir):
    fresh = make(backbone_dir, perturb=False)
    plain = fresh.encode(SENTENCES, convert_to_tensor=True)
    assert torch.allclose(fresh.encode_query(SENTENCES, convert_to_tensor=True), plain, atol=1e-6)
    assert torch.allclose(fresh.encode_document(SENTENCES, convert_to_tensor=True), plain, atol=1e-6)

    model = make(backbone_dir)
    default = model.encode(SENTENCES, convert_to_tensor=True)
    query = model.encode_query(SENTENCES, convert_to_tensor=True)
    document = model.encode_document(SENTENCES, convert_to_tensor=True)
    assert torch.allclose(default, plain, atol=1e-6)  # encode() keeps the default prompt
    for a, b in ((query, default), (document, default), (query, document)):
        assert (a - b).abs().max() > 1e-3
    # Each side is exactly its prompt's: the same as a one-prompt encoder holding that prompt as its default.
    single = SuffixPromptEncoder.from_backbone(backbone_dir, num_tokens=4, device="cpu")
    with torch.no_grad():
        single.prompt_module.soft_prompt.copy_(model.prompt_module.task_prompts["query"])
    assert torch.allclose(single.encode(SENTENCES, convert_to_tensor=True), query, atol=1e-5)


def test_unknown_task_uses_the_default_prompt(backbones):
    model = make(backbones["llama"])
    default = model.encode(SENTENCES, convert_to_tensor=True)
    assert torch.allclose(model.encode(SENTENCES, task="passage", convert_to_tensor=True), default, atol=1e-6)


@pytest.mark.parametrize("method", ["suffix", "deep-suffix"])
def test_fast_path_equals_full_path_per_task(backbones, method):
    model = make(backbones["llama"], method=method)
    module = model.prompt_module
    module.soft_prompt.requires_grad_(False)  # the loss below routes every text to a task prompt
    assert module.preprocess(SENTENCES, task="document")["task"] == "document"

    def loss():  # queries through `query`, passages through `document`
        queries = module(module.preprocess(ANCHORS, task="query"))["sentence_embedding"]
        passages = module(module.preprocess(POSITIVES, task="document"))["sentence_embedding"]
        scores = F.normalize(queries, dim=-1) @ F.normalize(passages, dim=-1).T / 0.05
        return F.cross_entropy(scores, torch.arange(len(ANCHORS)))

    assert_fast_path_equals_full(module, loss)


def test_task_max_length_cuts_only_that_side(backbones):
    model = make(backbones["llama"], max_length=64, task_max_length={"query": 7})
    module = model.prompt_module
    long_text = " ".join(["man"] * 40)
    assert module.preprocess([long_text], task="query")["input_ids"].shape[1] == 7 - 4
    assert module.preprocess([long_text], task="document")["input_ids"].shape[1] == 41  # BOS + 40 words
    assert module.preprocess([long_text])["input_ids"].shape[1] == 41
    assert module.preprocess([long_text], task="query", max_length=10)["input_ids"].shape[1] == 10 - 4


def test_save_load_round_trip(backbones, tmp_path):
    model = make(backbones["llama"], task_max_length={"document": 100})
    spt_embed.save(model, tmp_path / "enc")
    assert set(load_file(str(tmp_path / "enc" / WEIGHTS_NAME))) == {
        "soft_prompt", task_weights_key("query"), task_weights_key("document")
    }
    loaded = spt_embed.load(tmp_path / "enc")
    assert loaded.prompt_module.task_names == TASKS
    assert loaded.prompt_module.spt_config.task_max_length == {"document": 100}
    for encode in ("encode", "encode_query", "encode_document"):
        before = getattr(model, encode)(SENTENCES, convert_to_tensor=True)
        after = getattr(loaded, encode)(SENTENCES, convert_to_tensor=True)
        assert torch.allclose(before, after, atol=1e-6), encode


def test_missing_task_tensor_is_a_clear_error(backbones, tmp_path):
    spt_embed.save(make(backbones["llama"]), tmp_path / "enc")
    weights = tmp_path / "enc" / WEIGHTS_NAME
    tensors = load_file(str(weights))
    del tensors[task_weights_key("document")]
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match="inconsistent"):
        spt_embed.load(tmp_path / "enc")


def test_bad_task_names_are_refused(backbones):
    ref = SuffixPromptModule.from_backbone(backbones["llama"], num_tokens=4).spt_config.backbone
    for tasks in (["Query"], ["query", "query"], ["default"], [""]):
        with pytest.raises(ValueError, match="tasks must be"):
            SuffixPromptConfig(backbone=ref, tasks=tasks)
    with pytest.raises(ValueError, match="above the 16 soft tokens"):
        SuffixPromptConfig(backbone=ref, task_max_length={"document": 8})


def test_export_refuses_task_prompts(backbones, tmp_path):
    spt_embed.save(make(backbones["llama"]), tmp_path / "enc")
    with pytest.raises(ValueError, match="task soft prompts"):
        spt_embed.export(tmp_path / "enc", tmp_path / "plain")
    assert not (tmp_path / "plain").exists()


def test_mteb_retrieval_routes_queries_and_documents(data_root, backbones, monkeypatch):
    model = make(backbones["llama"])
    module = model.prompt_module
    seen: dict[str | None, list[int]] = {}
    original = module.soft_prompt_for

    def spy(task):
        seen.setdefault(task, []).append(1)
        return original(task)

    monkeypatch.setattr(module, "soft_prompt_for", spy)
    mteb.evaluate(ev.mteb_encoder(model), get_tasks(["SciFact"]), cache=None, co2_tracker=False,
                  show_progress_bar=False)
    assert set(seen) == {"query", "document"}


def test_index_uses_both_sides_and_refuses_other_routes(backbones):
    model = make(backbones["llama"])
    docs, queries = SENTENCES, ["a man plays", "the cat sleeps"]
    index = build_index(model, docs)
    assert index.metadata.prompt_routes == {"query": "query", "document": "document"} == prompt_routes(model)
    hits = index.search(queries, k=len(docs))
    expected = model.encode_query(queries, convert_to_tensor=True) @ model.encode_document(docs, convert_to_tensor=True).T
    for row, query_hits in enumerate(hits):
        for hit in query_hits:
            assert hit.score == pytest.approx(expected[row, int(hit.id)].item(), abs=1e-4)
    index.metadata.prompt_routes = {"query": "default", "document": "document"}
    with pytest.raises(ValueError, match="soft prompts"):
        index.model = model


def test_router_mapping_routes_retrieval_sources_only(tmp_path):
    base = dict(output=str(tmp_path / "o"), eval_steps=0)
    assert router_mapping(TrainConfig(data=["snli-triplets"], **base)) == {}
    assert router_mapping(TrainConfig(data=["qa.jsonl"], retrieval_data=["qa.jsonl"], **base)) == {
        "anchor": "query", "positive": "document", "negative": "document"
    }
    mixed = router_mapping(TrainConfig(data=["snli-triplets", "qa.jsonl"], retrieval_data=["qa.jsonl"], **base))
    assert mixed == {"qa": {"anchor": "query", "positive": "document", "negative": "document"}}
    with pytest.raises(ValueError, match="not among the training sources"):
        TrainConfig(data=["snli-triplets"], retrieval_data=["qa.jsonl"], **base)
    with pytest.raises(ValueError, match="not a prompt of this run"):
        TrainConfig(data=["snli-triplets"], freeze_prompts=["query"], **base)
    with pytest.raises(ValueError, match="suffix and deep-suffix only"):
        TrainConfig(data=["snli-triplets"], tasks=TASKS, method="lora", **base)


def qa_pairs(path, n=48):
    """Query -> passage rows: a short question and a longer passage that contains its words."""
    words = "man woman child dog cat flute guitar piano park house food".split()
    rows = [{"anchor": f"{words[i % 11]} {words[(i * 3) % 11]} ? {i}",
             "positive": f"the {words[i % 11]} is in the {words[(i * 3) % 11]} . {i} {words[(i * 5) % 11]}"}
            for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_training_updates_both_task_prompts_and_nothing_else(tmp_path, backbones):
    data = str(qa_pairs(tmp_path / "qa.jsonl"))
    cfg = train_config(tmp_path, backbones["llama"], data=[data], retrieval_data=[data], tasks=TASKS,
                       document_max_length=40, max_steps=4)
    before = SuffixPromptEncoder.from_backbone(backbones["llama"], num_tokens=4, seed=3, tasks=TASKS)
    model = spt_embed.train(cfg)
    module = model.prompt_module
    assert module.spt_config.task_max_length == {"document": 40}
    for task in TASKS:
        assert not torch.allclose(module.task_prompts[task], before.prompt_module.task_prompts[task])
    # Only retrieval rows: the default prompt saw no text and stays as initialised; the backbone never moves.
    assert torch.equal(module.soft_prompt, before.prompt_module.soft_prompt)
    for name, tensor in before.prompt_module.backbone.state_dict().items():
        assert torch.equal(tensor, module.backbone.state_dict()[name]), name
    loaded = spt_embed.load(cfg.output)
    assert torch.allclose(loaded.encode_query(SENTENCES, convert_to_tensor=True),
                          model.encode_query(SENTENCES, convert_to_tensor=True), atol=1e-6)


def test_frozen_prompt_does_not_move(tmp_path, backbones):
    data = str(qa_pairs(tmp_path / "qa.jsonl"))
    cfg = train_config(tmp_path, backbones["llama"], data=[data], retrieval_data=[data], tasks=TASKS,
                       freeze_prompts=["document"], max_steps=3)
    before = SuffixPromptEncoder.from_backbone(backbones["llama"], num_tokens=4, seed=3, tasks=TASKS)
    module = spt_embed.train(cfg).prompt_module
    assert torch.equal(module.task_prompts["document"], before.prompt_module.task_prompts["document"])
    assert not torch.allclose(module.task_prompts["query"], before.prompt_module.task_prompts["query"])


def test_info_lists_the_task_prompts(backbones, tmp_path, capsys):
    from spt_embed.cli.main import main

    spt_embed.save(make(backbones["llama"], task_max_length={"document": 100}), tmp_path / "enc")
    assert main(["info", str(tmp_path / "enc")]) == 0
    out = capsys.readouterr().out
    assert "default + query, document" in out and "document 100" in out


def test_document_max_length_is_refused_where_unused(tmp_path):
    with pytest.raises(ValueError, match="cuts every text at max_length"):
        TrainConfig(output=str(tmp_path / "o"), data=["snli-triplets"], method="lora", document_max_length=512)


def test_document_max_length_defaults_to_512_with_a_document_prompt(tmp_path):
    """Issue 17: documents get 512 tokens by default beside a document task prompt, queries keep max_length; no
    document prompt (or max_length already that long): None, i.e. max_length; an explicit value wins."""
    base = dict(output=str(tmp_path / "o"), data=["snli-triplets"])
    for method in ("suffix", "deep-suffix"):
        assert TrainConfig(tasks=TASKS, method=method, **base).document_max_length == 512
    assert TrainConfig(tasks=["document"], **base).document_max_length == 512
    assert TrainConfig(**base).document_max_length is None
    assert TrainConfig(tasks=["query"], **base).document_max_length is None
    assert TrainConfig(tasks=TASKS, document_max_length=40, **base).document_max_length == 40
    assert TrainConfig(tasks=TASKS, max_length=1024, **base).document_max_length is None  # not cut below max_length
    for method in ("prompt", "prefix", "lora"):  # no task prompts, nothing reads the field: no default, no error
        assert TrainConfig(method=method, **base).document_max_length is None
    # The resolved value is what the run saves, and what its encoder gets as the document prompt's length.
    saved = TrainConfig(tasks=TASKS, **base).to_dict()
    assert saved["document_max_length"] == 512 and saved["max_length"] == 128


def test_default_document_max_length_reaches_the_encoder(tmp_path, backbones):
    from spt_embed.training.train import build_model

    cfg = train_config(tmp_path, backbones["llama"], tasks=TASKS)
    module = build_model(cfg).prompt_module
    assert module.spt_config.task_max_length == {"document": 512}
    assert module.spt_config.max_length == cfg.max_length


def test_an_adapter_saved_before_the_default_keeps_its_document_length(tmp_path, backbones):
    """An adapter reads its own spt_config.json: one trained with tasks and no document_max_length (documents cut at
    max_length) loads and encodes documents exactly as before, whatever its train_config.json says."""
    model = make(backbones["llama"], max_length=24)
    folder = tmp_path / "old"
    spt_embed.save(model, folder)
    (folder / "train_config.json").write_text(json.dumps({"tasks": TASKS, "document_max_length": None}))
    loaded = spt_embed.load(folder)
    assert loaded.prompt_module.spt_config.task_max_length == {}
    long_text = [" ".join(["dog"] * 200)]
    assert loaded.prompt_module.preprocess(long_text, task="document")["input_ids"].shape[1] <= 24
    assert torch.allclose(loaded.encode_document(long_text, convert_to_tensor=True),
                          model.encode_document(long_text, convert_to_tensor=True), atol=1e-6)


def test_retrieval_dev_rows_are_held_out_and_can_select(tmp_path, backbones, data_root):
    from spt_embed.training.train import load_datasets, split_retrieval_dev

    data = str(qa_pairs(tmp_path / "qa.jsonl", n=56))
    cfg = train_config(tmp_path, backbones["llama"], data=[data], retrieval_data=[data], tasks=TASKS,
                       retrieval_dev_rows=8, select_on="retrieval", max_steps=4, eval_steps=2, save_steps=2)
    train, held_out = split_retrieval_dev(load_datasets(cfg), cfg)
    assert len(train) == 48 and len(held_out["qa"]) == 8
    assert not set(train["anchor"]) & set(held_out["qa"]["anchor"])  # never trained on
    again, _ = split_retrieval_dev(load_datasets(cfg), cfg)
    assert again["anchor"] == train["anchor"]  # seeded
    spt_embed.train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_qa-dev_cosine_ndcg@10" in r]
    assert len(evals) == 2 and all("eval_stsb-dev_spearman_cosine" in r for r in evals)
    assert all(r["eval_sequential_score"] == r["eval_qa-dev_cosine_ndcg@10"] for r in evals)  # select_on=retrieval
    with pytest.raises(ValueError, match="needs a retrieval dev set"):
        train_config(tmp_path, backbones["llama"], select_on="mean")
    symmetric = train_config(tmp_path, backbones["llama"], retrieval_dev_rows=8)
    with pytest.raises(ValueError, match="no training source is a retrieval source"):
        split_retrieval_dev(load_datasets(symmetric), symmetric)


def test_oversample_repeats_a_source_after_its_dev_rows_are_held_out(tmp_path, backbones, data_root):
    from spt_embed.training.train import load_datasets, oversample, split_retrieval_dev

    qa = str(qa_pairs(tmp_path / "qa.jsonl", n=56))
    other = str(qa_pairs(tmp_path / "other.jsonl", n=40))
    cfg = train_config(tmp_path, backbones["llama"], data=[other, qa], retrieval_data=[qa], tasks=TASKS,
                       retrieval_dev_rows=8, oversample=[f"{qa}=3"])
    train, held_out = split_retrieval_dev(load_datasets(cfg), cfg)
    mixed = oversample(train, cfg)
    assert len(mixed["qa"]) == 3 * len(train["qa"]) == 144 and len(mixed["other"]) == 40
    assert sorted(mixed["qa"]["anchor"]) == sorted(list(train["qa"]["anchor"]) * 3)
    assert not set(mixed["qa"]["anchor"]) & set(held_out["qa"]["anchor"])  # dev rows are not repeated into training
    assert oversample(train, train_config(tmp_path, backbones["llama"], data=[other, qa])) is train  # no-op unset
    base = dict(output=str(tmp_path / "o"), eval_steps=0, data=["snli-triplets", "squad-qa"])
    assert TrainConfig(oversample=["squad-qa=16"], **base).oversample_factors() == {"squad-qa": 16}
    for bad, message in (("squad-qa", "expected SOURCE=N"), ("squad-qa=0", "expected SOURCE=N"),
                         ("squad-qa=1.5", "expected SOURCE=N"), ("scifact-train=4", "not among the training sources")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(oversample=[bad], **base)
    with pytest.raises(ValueError, match="twice"):
        TrainConfig(oversample=["squad-qa=2", "squad-qa=3"], **base)
