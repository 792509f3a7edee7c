"""Training on tiny models: only the soft tokens move, the loss falls, resume is exact, two processes agree."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import spt_embed
from spt_embed.cli.main import main
from spt_embed.recipe import CHECKPOINTS, latest_checkpoint, resume_checkpoint
from spt_embed.training.train import checkpoint_weights
from spt_embed.training.train_config import Method, TrainConfig
from tests.conftest import Kill

SPT_WEIGHTS = checkpoint_weights(Method.SUFFIX)
WORDS = "man woman child dog cat plays runs eats sleeps park house flute guitar piano food red blue green big small"


def toy_pairs(path, n=48):
    """Pairs whose positive is recoverable: the anchor plus a fixed tail word."""
    words = WORDS.split()
    rows = []
    for i in range(n):
        anchor = " ".join(words[(i * k) % len(words)] for k in (1, 3, 7))
        rows.append({"anchor": f"{anchor} {i % 5}", "positive": f"the {anchor} ."})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def config(tmp_path, backbone, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    values = dict(
        output=str(tmp_path / "run"), backbone=str(backbone), data=[str(toy_pairs(tmp_path / "pairs.jsonl"))],
        num_tokens=4, batch_size=8, max_steps=12, lr=3e-2, warmup_steps=0, eval_steps=0, save_steps=4,
        logging_steps=1, seed=3,
    )
    values.update(overrides)
    return TrainConfig(**values)


def mean_loss(model, data_path):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    rows = [json.loads(line) for line in data_path.read_text().splitlines()]
    module = model.prompt_module
    loss_fn = MultipleNegativesRankingLoss(model, scale=20.0)
    with torch.no_grad():
        feats = [module.preprocess([r[c] for r in rows]) for c in ("anchor", "positive")]
        return loss_fn(feats, None).item()


def test_training_moves_only_soft_tokens_and_lowers_loss(tmp_path, backbones):
    cfg = config(tmp_path, backbones["llama"], eval_steps=6, save_steps=6, eval_pairs=40, max_steps=24)
    before = spt_embed.SuffixPromptEncoder.from_backbone(backbones["llama"], num_tokens=4, seed=3, max_length=128)
    backbone_before = {k: v.clone() for k, v in before.prompt_module.backbone.state_dict().items()}
    model = spt_embed.train(cfg)
    out = tmp_path / "run"
    for name in ("spt_config.json", "soft_prompt.safetensors", "train_config.json", "train_log.jsonl", "training.png"):
        assert (out / name).is_file(), name
    for key, value in model.prompt_module.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key
    assert not torch.equal(model.prompt_module.soft_prompt, before.prompt_module.soft_prompt)
    assert mean_loss(model, tmp_path / "pairs.jsonl") < mean_loss(before, tmp_path / "pairs.jsonl") - 0.05
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert any("eval_stsb-dev_spearman_cosine" in r for r in log) and any("loss" in r for r in log)
    reloaded = spt_embed.load(out)
    assert torch.equal(reloaded.prompt_module.soft_prompt, model.prompt_module.soft_prompt)
    assert json.loads((out / "train_config.json").read_text())["num_tokens"] == 4




def test_resume_matches_uninterrupted_run(tmp_path, backbones):
    straight = spt_embed.train(config(tmp_path / "a", backbones["llama"]))
    killed_cfg = config(tmp_path / "b", backbones["llama"])
    with pytest.raises(KeyboardInterrupt):
        spt_embed.train(killed_cfg, callbacks=[Kill(6)])
    assert latest_checkpoint(tmp_path / "b" / "run", SPT_WEIGHTS).name == "checkpoint-4"
    with pytest.raises(FileExistsError, match="--resume"):
        spt_embed.train(killed_cfg)  # never silently restarts over a run's checkpoints
    resumed = spt_embed.train(killed_cfg, resume=True)
    diff = (resumed.prompt_module.soft_prompt - straight.prompt_module.soft_prompt).abs().max().item()
    assert diff <= 1e-6


def test_resume_with_recomputed_mlps_matches_uninterrupted_run(tmp_path, backbones):
    """recompute_mlp changes where a step keeps its memory, not what it trains: a run may resume with it switched
    on, and ends where the uninterrupted run without it ends."""
    straight = spt_embed.train(config(tmp_path / "a", backbones["llama"]))
    killed_cfg = config(tmp_path / "b", backbones["llama"])
    with pytest.raises(KeyboardInterrupt):
        spt_embed.train(killed_cfg, callbacks=[Kill(6)])
    resumed = spt_embed.train(config(tmp_path / "b", backbones["llama"], recompute_mlp=True), resume=True)
    assert resumed.prompt_module.recompute_mlp
    diff = (resumed.prompt_module.soft_prompt - straight.prompt_module.soft_prompt).abs().max().item()
    assert diff <= 1e-4


def test_half_written_checkpoint_is_skipped(tmp_path, backbones):
    cfg = config(tmp_path, backbones["llama"], max_steps=8)
    spt_embed.train(cfg)
    run = tmp_path / "run"
    good = latest_checkpoint(run, SPT_WEIGHTS)
    broken = run / CHECKPOINTS / "checkpoint-99"
    broken.mkdir()
    (broken / "soft_prompt.safetensors").write_bytes(b"half")
    (broken / "trainer_state.json").write_text("{")
    assert latest_checkpoint(run, SPT_WEIGHTS) == good
    assert resume_checkpoint(run, SPT_WEIGHTS, resume=True) == good
    with pytest.raises(FileExistsError, match="already holds checkpoints.*--resume"):
        resume_checkpoint(run, SPT_WEIGHTS, resume=False)


def test_resume_without_checkpoints_starts_from_scratch(tmp_path, caplog):
    assert resume_checkpoint(tmp_path, SPT_WEIGHTS, resume=False) is None
    (tmp_path / CHECKPOINTS / "checkpoint-3").mkdir(parents=True)  # killed before writing anything
    assert resume_checkpoint(tmp_path, SPT_WEIGHTS, resume=True) is None
    assert "Skipping incomplete checkpoint" in caplog.text and "starting from scratch" in caplog.text


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lr": 0}, "lr must be > 0"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"scheduler": "zigzag"}, "scheduler='zigzag' is not supported"),
        ({"data": []}, "No training data"),
        ({"eval_steps": 6, "save_steps": 4}, "save_steps=4 must be a multiple of eval_steps=6"),
    ],
)
def test_bad_train_config(tmp_path, backbones, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, backbones["llama"], **overrides)


def test_yaml_recipe_and_cli_overrides(tmp_path, backbones):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"backbone: {backbones['llama']}\nnum_tokens: 4\nmax_steps: 3\nlr: 0.01\ncolour: red\n")
    with pytest.raises(ValueError, match=r"Unknown training option\(s\) \['colour'\]"):
        TrainConfig.from_sources(str(recipe))
    recipe.write_text(f"backbone: {backbones['llama']}\nnum_tokens: 4\nmax_steps: 3\nlr: 0.01\n")
    cfg = TrainConfig.from_sources(str(recipe), max_steps=5, lr=None)
    assert (cfg.max_steps, cfg.lr, cfg.num_tokens) == (5, 0.01, 4)


def test_cli_train_runs_and_reports_bad_data(tmp_path, backbones, capsys):
    data = toy_pairs(tmp_path / "pairs.jsonl")
    common = ["train", "--backbone", str(backbones["qwen2"]), "--num-tokens", "2", "--max-steps", "2",
              "--batch-size", "4", "--eval-steps", "0", "--save-steps", "2"]
    assert main([*common, "--data", str(data), "--output", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "soft_prompt.safetensors").is_file()
    bad = tmp_path / "bad.csv"
    bad.write_text("w,x,y,z\na,b,c,d\n")
    assert main([*common, "--data", str(bad), "--output", str(tmp_path / "bad")]) == 2
    assert "anchor" in capsys.readouterr().err
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text('{"anchor": "a", "positive": "b"}\n')
    assert main([*common, "--data", str(tiny), "--output", str(tmp_path / "tiny")]) == 2
    assert "fewer than one batch" in capsys.readouterr().err


def test_two_processes_agree(tmp_path, backbones):
    data = toy_pairs(tmp_path / "pairs.jsonl")
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(f"""
        import os, torch, spt_embed
        from safetensors.torch import save_file
        model = spt_embed.train(output={str(tmp_path / "ddp")!r}, backbone={str(backbones["llama"])!r},
                                data=[{str(data)!r}], num_tokens=4, batch_size=4, max_steps=4, lr=3e-2,
                                warmup_steps=0, eval_steps=0, save_steps=4, seed=1)
        rank = os.environ["RANK"]
        save_file({{"s": model.prompt_module.soft_prompt.detach().contiguous()}}, {str(tmp_path)!r} + f"/rank{{rank}}.st")
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", str(script)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    first, second = (load_file(str(tmp_path / f"rank{r}.st"))["s"] for r in (0, 1))
    assert torch.equal(first, second)
    initial = spt_embed.SuffixPromptEncoder.from_backbone(backbones["llama"], num_tokens=4, seed=1)
    assert not torch.equal(first, initial.prompt_module.soft_prompt.detach())


def test_method_prompt_puts_the_soft_tokens_before_the_text(tmp_path, backbones):
    from spt_embed.model.config import Placement

    cfg = config(tmp_path, backbones["llama"], method="prompt", max_steps=2, save_steps=2)
    model = spt_embed.train(cfg)
    assert model.prompt_module.spt_config.placement is Placement.PREFIX
    assert json.loads((tmp_path / "run" / "spt_config.json").read_text())["placement"] == "prefix"
    reloaded = spt_embed.load(tmp_path / "run")
    texts = ["man plays guitar", "dog runs"]
    assert torch.equal(reloaded.encode(texts, convert_to_tensor=True), model.encode(texts, convert_to_tensor=True))
