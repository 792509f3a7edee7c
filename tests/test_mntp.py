"""MNTP on tiny causal LMs: masking, the explicit i−1 shift, training, merging, saving, resume and bad input."""

import argparse
import json
import random
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from spt_embed.cli.train_commands import add_mntp_parser
from spt_embed.model.backbone import load_backbone
from spt_embed.model.bidirectional import make_bidirectional
from spt_embed.model.module import ForwardPath, SuffixPromptModule
from spt_embed.recipe import CHECKPOINTS, latest_checkpoint
from spt_embed.training.masking import (
    IGNORE,
    MNTPCollator,
    corrupt,
    mntp_loss,
    resolve_mask_token_id,
    shifted_labels,
    tokenize_corpus,
)
from spt_embed.training.mntp import ADAPTER_WEIGHTS, EVAL_NAME, MNTPTrainer, load_causal_lm, mntp, target_logits
from spt_embed.training.mntp_config import MNTP_CONFIG_NAME, MNTPConfig
from tests.conftest import WORDS, Kill, _config, build_tokenizer

MASK = "<unk>"  # the word-level test tokenizer has no '_'


def make_lm(directory, arch="llama", seed=0):
    """A tiny random causal LM with tied embeddings (like SmolLM2) and its tokenizer, saved to `directory`."""
    tokenizer = build_tokenizer(arch)
    _, config = _config(arch, 32, len(tokenizer))
    config.tie_word_embeddings = True
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_corpus(path, n=240, seed=0):
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS[:10]) for _ in range(rng.randint(3, 10))) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n\n")  # a trailing blank line: dropped
    return path


def options(root, **overrides):
    values = dict(
        output=str(root / "out"),
        backbone=str(root / "lm"),
        corpus=str(root / "corpus.txt"),
        mask_token=MASK,
        batch_size=16,
        max_steps=20,
        lr=3e-2,
        warmup_steps=0,
        eval_lines=40,
        save_steps=10,
        logging_steps=5,
        seed=1,
    )
    values.update(overrides)
    return values


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("mntp")
    make_lm(root / "lm")
    make_corpus(root / "corpus.txt")
    return root


@pytest.fixture(scope="module")
def trained(lab):
    return mntp(**options(lab))




@pytest.fixture(scope="module")
def interrupted(lab):
    """A run killed after its checkpoint at step 10."""
    out = lab / "killed"
    with pytest.raises(KeyboardInterrupt):
        mntp(**options(lab, output=str(out)), callbacks=[Kill(12)])
    return out


# ----- masking and the shift ---------------------------------------------------------------------------------


def test_labels_are_shifted_by_hand():
    ids = torch.tensor([[10, 11, 12, 13, 14, 0]])
    chosen = torch.tensor([[False, True, False, True, True, False]])
    # The output at i−1 predicts the chosen token at i: targets 11, 13, 14 sit at 0, 2, 3.
    assert shifted_labels(ids, chosen).tolist() == [[11, IGNORE, 13, 14, IGNORE, IGNORE]]
    # The loss compares logits[:, j] with labels[:, j] and adds no second shift: logits that point at the
    # label in place score ~0, the same logits read one step later would score badly.
    labels = shifted_labels(ids, chosen)
    logits = torch.full((1, 6, 20), -30.0)
    for j, target in enumerate(labels[0].tolist()):
        if target != IGNORE:
            logits[0, j, target] = 30.0
    assert mntp_loss(logits, labels).item() < 1e-6
    assert mntp_loss(logits.roll(1, dims=1), labels).item() > 10
    # Training passes the logits gathered at the targets, (N, V) with labels (N,): the same loss.
    keep = labels != IGNORE
    rolled = logits.roll(1, dims=1)
    assert torch.equal(mntp_loss(rolled[keep], labels[keep]), mntp_loss(rolled, labels))
    summed = mntp_loss(rolled, labels, reduction="sum")
    assert torch.equal(mntp_loss(rolled[keep], labels[keep], reduction="sum"), summed)
    assert mntp_loss(rolled[:, :0], labels[:, :0]).item() == 0.0  # nothing to predict


def test_training_loss_is_mntp_loss_over_the_full_lm_head(lab):
    """The trainer's loss, computed from the logits at the target positions only, equals mntp_loss over the LM
    head's logits at every position."""
    model, tokenizer, _ = load_causal_lm(str(lab / "lm"))
    texts = (lab / "corpus.txt").read_text().split("\n")[:8]
    collator = MNTPCollator(pad_token_id=tokenizer.pad_token_id, mask_token_id=1, vocab_size=len(tokenizer), seed=3)
    batch = collator(tokenize_corpus(tokenizer, texts, max_length=16))
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, L, V)
        trained = MNTPTrainer.compute_loss(None, model, batch)
        logits, targets = target_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert targets.numel() > 0 and torch.equal(targets, batch["labels"][batch["labels"] != IGNORE])
    assert torch.equal(trained, mntp_loss(logits, targets))
    assert abs(trained.item() - mntp_loss(full, batch["labels"]).item()) <= 1e-5


def test_collator_masks_the_right_share_and_never_pads_specials_or_first_token():
    rows = [
        {"input_ids": [1] + [100 + i] * n, "special_tokens_mask": [1] + [0] * n} for i, n in enumerate([90, 60] * 40)
    ]
    collator = MNTPCollator(
        pad_token_id=0, mask_token_id=7, vocab_size=1000, mask_prob=0.2, generator=torch.Generator().manual_seed(0)
    )
    batch = collator(rows)
    original = torch.zeros_like(batch["input_ids"])
    for row, feature in enumerate(rows):
        original[row, : len(feature["input_ids"])] = torch.tensor(feature["input_ids"])
    chosen = torch.zeros_like(original, dtype=torch.bool)
    chosen[:, 1:] = batch["labels"][:, :-1] != IGNORE  # undo the shift
    candidates = (batch["attention_mask"] == 1) & (original != 1)
    candidates[:, 0] = False
    assert not (chosen & ~candidates).any()  # pads, BOS and the first token are never targets
    assert abs(chosen.sum().item() / candidates.sum().item() - 0.2) < 0.02
    # Targets are the original tokens, one step left.
    assert torch.equal(batch["labels"][:, :-1][chosen[:, 1:]], original[chosen])
    shown = batch["input_ids"][chosen]
    masked = (shown == 7).float().mean().item()
    kept = (shown == original[chosen]).float().mean().item()
    assert abs(masked - 0.8) < 0.03 and abs(kept - 0.1) < 0.02  # the rest random (rarely equal to the original)
    assert torch.equal(batch["input_ids"][~chosen], original[~chosen])


def test_masks_depend_only_on_seed_and_batch():
    """The same batch gets the same masks (so resume is exact); another seed or batch gets others."""
    rows = [{"input_ids": list(range(10, 60)), "special_tokens_mask": [0] * 50} for _ in range(4)]

    def collate(seed, batch):
        return MNTPCollator(pad_token_id=0, mask_token_id=7, vocab_size=100, seed=seed)(batch)["labels"]

    assert torch.equal(collate(1, rows), collate(1, rows))
    assert not torch.equal(collate(1, rows), collate(2, rows))
    assert not torch.equal(collate(1, rows)[:3], collate(1, rows[:3]))


def test_corrupt_is_80_10_10():
    ids = torch.full((200, 100), 5)
    chosen = torch.ones_like(ids, dtype=torch.bool)
    out = corrupt(ids, chosen, mask_token_id=7, vocab_size=5000, generator=torch.Generator().manual_seed(0))
    shares = [(out == 7).float().mean().item(), (out == 5).float().mean().item()]
    assert abs(shares[0] - 0.8) < 0.01 and abs(shares[1] - 0.1) < 0.01


def test_tokenize_truncates_long_texts(caplog):
    tokenizer = build_tokenizer("llama")
    rows = tokenize_corpus(tokenizer, ["a man", " ".join(["dog"] * 50)], max_length=8)
    assert [len(r["input_ids"]) for r in rows] == [3, 8]
    assert rows[0]["special_tokens_mask"] == [1, 0, 0]  # BOS is special: never a target
    assert "truncated" in caplog.text


@pytest.mark.parametrize(
    "arch, requested, expected",
    [("qwen2", None, "_"), ("llama", "<unk>", "<unk>"), ("llama", "dog", "dog")],
)
def test_mask_token_choice(arch, requested, expected):
    tokenizer = build_tokenizer(arch)
    assert tokenizer.convert_ids_to_tokens(resolve_mask_token_id(tokenizer, requested)) == expected


def test_missing_mask_token_is_a_clear_error():
    with pytest.raises(ValueError, match="'_' is not a single token.*--mask-token"):
        resolve_mask_token_id(build_tokenizer("llama"))  # no mask token and no '_'
    with pytest.raises(ValueError, match="'zebra'"):
        resolve_mask_token_id(build_tokenizer("llama"), "zebra")


# ----- training end to end -----------------------------------------------------------------------------------


def test_mntp_lowers_loss_and_saves_a_bidirectional_backbone(trained):
    evaluation = json.loads((trained / EVAL_NAME).read_text())
    assert evaluation["after"]["loss"] < evaluation["before"]["loss"] - 0.05
    assert evaluation["heldout_texts"] == 40 and evaluation["steps"] == 20
    assert json.loads((trained / "config.json").read_text())["is_causal"] is False
    assert not [p.name for p in trained.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    saved = json.loads((trained / MNTP_CONFIG_NAME).read_text())
    backbone = load_backbone(trained)
    assert backbone.ref.is_causal is False
    assert backbone.ref.fingerprint == saved["fingerprint"] != saved["base_fingerprint"]
    with torch.no_grad():
        a = backbone.model(input_ids=torch.tensor([[5, 6, 7, 8]])).last_hidden_state
        b = backbone.model(input_ids=torch.tensor([[5, 6, 7, 9]])).last_hidden_state
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4


def test_merged_model_equals_unmerged_lora(lab, trained):
    ids = torch.tensor([[2, 5, 6, 7, 8, 9], [2, 10, 11, 12, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    base = make_bidirectional(AutoModelForCausalLM.from_pretrained(lab / "lm")).eval()
    with torch.no_grad():
        untrained = base(input_ids=ids, attention_mask=mask).logits
        unmerged = PeftModel.from_pretrained(base, trained / CHECKPOINTS / "checkpoint-20").eval()
        lora = unmerged(input_ids=ids, attention_mask=mask).logits
        merged = AutoModelForCausalLM.from_pretrained(trained).eval()
        plain = merged(input_ids=ids, attention_mask=mask).logits
    assert (lora - plain).abs().max().item() <= 1e-5
    assert (lora - untrained).abs().max().item() > 1e-3  # the LoRA did move the model


def test_spt_bi_uses_the_full_pass(trained):
    module = SuffixPromptModule.from_backbone(trained, num_tokens=2, max_length=32)
    assert module.resolve_path(4) is ForwardPath.FULL
    module(module.preprocess(["a man plays", "dog"]))["sentence_embedding"].sum().backward()
    assert module.soft_prompt.grad is not None


def test_resume_matches_uninterrupted_run(lab, trained, interrupted, tmp_path):
    out = shutil.copytree(interrupted, tmp_path / "killed")
    assert latest_checkpoint(out, ADAPTER_WEIGHTS).name == "checkpoint-10"
    with pytest.raises(FileExistsError, match="--resume"):
        mntp(**options(lab, output=str(out)))
    mntp(**options(lab, output=str(out)), resume=True)
    straight = json.loads((trained / MNTP_CONFIG_NAME).read_text())["fingerprint"]
    assert json.loads((out / MNTP_CONFIG_NAME).read_text())["fingerprint"] == straight
    from safetensors.torch import load_file

    a, b = load_file(str(trained / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_resume_on_another_backbone_is_refused(lab, interrupted, tmp_path):
    out = shutil.copytree(interrupted, tmp_path / "killed")
    other = make_lm(tmp_path / "other", seed=7)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(ValueError, match="fingerprint.*Resume with --backbone"):
        mntp(**options(lab, output=str(out), backbone=str(other)), resume=True)
    with pytest.raises(ValueError, match="lora_r"):
        mntp(**options(lab, output=str(out), lora_r=4), resume=True)
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing lost


# ----- bad input ---------------------------------------------------------------------------------------------


def test_bad_corpus(lab, tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    with pytest.raises(ValueError, match="no non-empty text"):
        mntp(**options(lab, output=str(tmp_path / "o1"), corpus=str(tmp_path / "blank.txt")))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="contains no texts"):
        mntp(**options(lab, output=str(tmp_path / "o2"), corpus=str(tmp_path / "empty.txt")))
    with pytest.raises(FileNotFoundError):
        mntp(**options(lab, output=str(tmp_path / "o3"), corpus=str(tmp_path / "missing.txt")))
    with pytest.raises(ValueError, match="--eval-lines"):
        mntp(**options(lab, output=str(tmp_path / "o4"), eval_lines=500))


def test_jsonl_corpus(lab, tmp_path):
    lines = (lab / "corpus.txt").read_text().split("\n")[:60]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in lines if t) + "\n")
    out = mntp(
        **options(
            lab,
            output=str(tmp_path / "o"),
            corpus=str(tmp_path / "c.jsonl"),
            text_field="body",
            max_steps=2,
            eval_lines=10,
            save_steps=2,
        )
    )
    assert json.loads((out / EVAL_NAME).read_text())["heldout_texts"] == 10


def test_bad_backbones(lab, tmp_path, backbones):
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=60, n_positions=32)).save_pretrained(gpt2)
    with pytest.raises(ValueError, match="'gpt2'.*SUPPORTED"):
        mntp(**options(lab, output=str(tmp_path / "o1"), backbone=str(gpt2)))
    with pytest.raises(ValueError, match="language-model head"):
        mntp(**options(lab, output=str(tmp_path / "o2"), backbone=str(backbones["llama"])))  # a base decoder only
    with pytest.raises(ValueError, match="not a single token"):
        mntp(**options(lab, output=str(tmp_path / "o3"), mask_token=None))
    with pytest.raises(ValueError, match=r"LoRA could not be attached.*lora_targets \['nope_proj'\]"):
        mntp(**options(lab, output=str(tmp_path / "o4"), lora_targets=["nope_proj"]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mask_prob": 0.0}, "mask_prob"),
        ({"mask_prob": 1.5}, "mask_prob"),
        ({"batch_size": 0}, "batch_size"),
        ({"lora_targets": []}, "lora_targets"),
        ({"scheduler": "bogus"}, "scheduler"),
        ({"max_length": 1}, "max_length"),
        ({"mask_token": ""}, "mask_token"),
    ],
)
def test_bad_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        MNTPConfig(**overrides)


def test_cli_flags_and_yaml(lab, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"corpus: {lab / 'corpus.txt'}\nmask_token: '{MASK}'\nlr: 0.03\nmax_steps: 50\n")
    parser = argparse.ArgumentParser()
    add_mntp_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "mntp",
            "--config",
            str(recipe),
            "--backbone",
            str(lab / "lm"),
            "--output",
            str(tmp_path / "o"),
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--eval-lines",
            "10",
            "--save-steps",
            "2",
            "--no-group-by-length",
            "--lora-targets",
            "q_proj",
            "v_proj",
        ]
    )
    args.func(args)
    saved = json.loads((tmp_path / "o" / MNTP_CONFIG_NAME).read_text())
    assert (
        saved["max_steps"] == 2
        and saved["lr"] == 0.03
        and saved["group_by_length"] is False
        and saved["lora_targets"] == ["q_proj", "v_proj"]
    )
    assert "held-out MNTP loss" in capsys.readouterr().out
    recipe.write_text("bogus: 1\n")
    with pytest.raises(ValueError, match="bogus"):
        MNTPConfig.from_sources(str(recipe))
