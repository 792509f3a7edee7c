"""`spt-embed train` and `mntp` never write into a folder that is not theirs, write nothing before their inputs are
checked, refuse a resume whose settings changed, never report success for zero steps, keep the umask's
permissions, and turn bad YAML values and Ctrl-C into clear messages."""

import json
import shlex
import stat

import pytest

import spt_embed
from spt_embed.cli.main import main
from spt_embed.training.masking import tokenize_corpus
from spt_embed.training.mntp import mntp
from spt_embed.training.mntp_config import MNTP_CONFIG_NAME, MNTPConfig
from spt_embed.training.train_config import TRAIN_CONFIG_NAME, TrainConfig
from tests.conftest import Kill, build_tokenizer
from tests.test_mntp import make_corpus, make_lm
from tests.test_mntp import options as mntp_options
from tests.test_train import config, toy_pairs


def snapshot(folder):
    """Every file under `folder` with its bytes: what a refused run must leave exactly as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def users_folder(path):
    path.mkdir(parents=True)
    (path / "README.md").write_text("my notes")
    (path / "modules.json").write_text("[]")
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A causal LM and a corpus for mntp."""
    root = tmp_path_factory.mktemp("mntp-safety")
    make_lm(root / "lm")
    make_corpus(root / "corpus.txt")
    return root


# ----- the output folder ----------------------------------------------------------------------------------------


def test_train_refuses_a_folder_of_the_users(tmp_path, backbones, capsys):
    target = users_folder(tmp_path / "mine")
    before = snapshot(target)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=f"{target}.*not an earlier spt-embed training run"):
            spt_embed.train(config(tmp_path, backbones["llama"], output=str(target)), overwrite=overwrite)
    data = toy_pairs(tmp_path / "pairs.jsonl")
    argv = ["train", "--backbone", str(backbones["llama"]), "--data", str(data), "--output", str(target)]
    assert main([*argv, "--overwrite"]) == 2
    assert str(target) in capsys.readouterr().err
    assert snapshot(target) == before


def test_train_overwrites_only_its_own_runs(tmp_path, backbones):
    run = tmp_path / "run"
    spt_embed.train(config(tmp_path, backbones["llama"], max_steps=4))
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        spt_embed.train(config(tmp_path, backbones["llama"], max_steps=4))
    (run / "notes.txt").write_text("mine")
    before = snapshot(run)
    with pytest.raises(FileExistsError, match=r"\['notes.txt'\].*move them out"):
        spt_embed.train(config(tmp_path, backbones["llama"], num_tokens=2, max_steps=4), overwrite=True)
    assert snapshot(run) == before
    (run / "notes.txt").unlink()
    with pytest.raises(ValueError, match="pass one of them"):
        spt_embed.train(config(tmp_path, backbones["llama"]), overwrite=True, resume=True)
    model = spt_embed.train(config(tmp_path, backbones["llama"], num_tokens=2, max_steps=4), overwrite=True)
    assert model.prompt_module.num_tokens == 2
    assert json.loads((run / TRAIN_CONFIG_NAME).read_text())["num_tokens"] == 2
    assert spt_embed.load(run).prompt_module.num_tokens == 2


def test_a_failed_run_writes_nothing(tmp_path, backbones):
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError):
        spt_embed.train(config(tmp_path / "new", backbones["llama"], data=[missing]))
    assert not (tmp_path / "new" / "run").exists()
    spt_embed.train(config(tmp_path, backbones["llama"], max_steps=4))
    before = snapshot(tmp_path / "run")
    with pytest.raises(FileNotFoundError):
        spt_embed.train(
            config(tmp_path, backbones["llama"], max_steps=4, data=[missing]), resume=True, resume_anyway=True
        )
    with pytest.raises(FileNotFoundError):
        spt_embed.train(config(tmp_path, tmp_path / "nowhere"), overwrite=True)
    assert snapshot(tmp_path / "run") == before


def test_training_that_cannot_form_a_batch_is_an_error(tmp_path, backbones):
    same = tmp_path / "same.jsonl"  # distinct rows, but every positive is the same text: one row per batch at most
    same.write_text("".join(json.dumps({"anchor": f"a man {i}", "positive": "the man"}) + "\n" for i in range(40)))
    with pytest.raises(ValueError, match=r"no batch of 8 rows whose texts all differ.*41 distinct texts.*0 steps"):
        spt_embed.train(config(tmp_path, backbones["llama"], data=[str(same)]))
    assert not (tmp_path / "run").exists()


# ----- resume ---------------------------------------------------------------------------------------------------


@pytest.fixture
def killed(tmp_path, backbones):
    """A training run killed after its checkpoint at step 4."""
    with pytest.raises(KeyboardInterrupt):
        spt_embed.train(config(tmp_path, backbones["llama"]), callbacks=[Kill(6)])
    return tmp_path / "run"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_tokens": 8}, r"num_tokens=4 \(this run: 8\).*Resume with --num-tokens 4"),
        ({"placement": "prefix"}, r"placement='suffix'.*Resume with --placement suffix"),
        ({"method": "lora"}, r"method='suffix'.*Resume with --method suffix"),
    ],
)
def test_resume_refuses_a_changed_shape(tmp_path, backbones, killed, change, message):
    before = snapshot(killed)
    for anyway in (False, True):
        with pytest.raises(ValueError, match=message):
            spt_embed.train(config(tmp_path, backbones["llama"], **change), resume=True, resume_anyway=anyway)
    assert snapshot(killed) == before


def test_resume_with_changed_settings_needs_resume_anyway(tmp_path, backbones, killed, caplog):
    before = snapshot(killed)
    other_data = toy_pairs(tmp_path / "other.jsonl", n=40)
    changed = config(tmp_path, backbones["llama"], lr=0.01, max_steps=10)
    changed.data = [str(other_data)]
    with pytest.raises(ValueError, match=r"lr 0\.03 -> 0\.01.*max_steps 12 -> 10.*--resume-anyway"):
        spt_embed.train(changed, resume=True)
    assert snapshot(killed) == before
    spt_embed.train(changed, resume=True, resume_anyway=True)
    assert "Resuming from" in caplog.text and "checkpoint-4: step 4 of 10" in caplog.text
    assert "lr changed from 0.03 to 0.01" in caplog.text and "data changed from" in caplog.text
    saved = json.loads((killed / TRAIN_CONFIG_NAME).read_text())
    assert saved["lr"] == 0.01 and saved["resumed_from_step"] == 4
    assert saved["changed_on_resume"]["lr"] == [0.03, 0.01]


def test_mntp_resume_compares_settings(lab, tmp_path, caplog):
    out = tmp_path / "bi"
    small = {"max_steps": 8, "save_steps": 4, "eval_lines": 10}
    with pytest.raises(KeyboardInterrupt):
        mntp(**mntp_options(lab, output=str(out), **small), callbacks=[Kill(6)])
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"mask_prob 0\.2 -> 0\.3.*--resume-anyway"):
        mntp(**mntp_options(lab, output=str(out), mask_prob=0.3, **small), resume=True)
    with pytest.raises(ValueError, match=r"lora_alpha=32 \(this run: 8\)"):
        mntp(**mntp_options(lab, output=str(out), lora_alpha=8, **small), resume=True, resume_anyway=True)
    assert snapshot(out) == before
    mntp(**mntp_options(lab, output=str(out), mask_prob=0.3, **small), resume=True, resume_anyway=True)
    assert "mask_prob changed from 0.2 to 0.3" in caplog.text and "step 4 of 8" in caplog.text
    saved = json.loads((out / MNTP_CONFIG_NAME).read_text())
    assert saved["changed_on_resume"] == {"mask_prob": [0.2, 0.3]} and saved["steps"] == 8


def test_mntp_output_folder(lab, tmp_path):
    target = users_folder(tmp_path / "mine")
    before = snapshot(target)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=f"{target}.*not an earlier spt-embed mntp run"):
            mntp(**mntp_options(lab, output=str(target), max_steps=2, eval_lines=0), overwrite=overwrite)
    assert snapshot(target) == before
    out = tmp_path / "bi"
    mntp(**mntp_options(lab, output=str(out), max_steps=2, save_steps=2, eval_lines=0))
    with pytest.raises(FileExistsError, match="--overwrite"):
        mntp(**mntp_options(lab, output=str(out), max_steps=2, save_steps=2, eval_lines=0))
    mntp(**mntp_options(lab, output=str(out), max_steps=3, save_steps=3, eval_lines=0), overwrite=True)
    saved = json.loads((out / MNTP_CONFIG_NAME).read_text())
    assert saved["steps"] == 3 and "model.safetensors" in saved["backbone_files"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-3"]


# ----- permissions ------------------------------------------------------------------------------------------------


def assert_umask_modes(folder, mask):
    """Every file and folder under `folder` has the mode a plain open() / mkdir() gives under `mask`."""
    wrong = {
        str(p.relative_to(folder)): oct(stat.S_IMODE(p.stat().st_mode))
        for p in folder.rglob("*")
        if stat.S_IMODE(p.stat().st_mode) != (0o777 if p.is_dir() else 0o666) & ~mask
    }
    assert not wrong, f"expected {oct(0o666 & ~mask)} files under umask {oct(mask)}: {wrong}"


def test_training_outputs_follow_the_umask(tmp_path, backbones, lab, umask):
    spt_embed.train(config(tmp_path / "spt", backbones["llama"], max_steps=2, save_steps=2))
    assert (tmp_path / "spt" / "run" / "soft_prompt.safetensors").is_file()
    assert_umask_modes(tmp_path / "spt" / "run", umask)
    lora = {"method": "lora", "max_steps": 2, "save_steps": 2, "lora_r": 2, "lora_targets": ["q_proj"]}
    spt_embed.train(config(tmp_path / "lora", backbones["llama"], **lora))
    assert list((tmp_path / "lora" / "run").rglob("adapter_model.safetensors"))  # the checkpoint's LoRA weights
    assert_umask_modes(tmp_path / "lora" / "run", umask)
    out = mntp(**mntp_options(lab, output=str(tmp_path / "bi"), max_steps=2, save_steps=2, eval_lines=10))
    assert (out / "model.safetensors").is_file() and list(out.rglob("adapter_model.safetensors"))
    assert_umask_modes(out, umask)


# ----- clear errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config_cls, line, message",
    [
        (TrainConfig, 'lr: "fast"', r"lr='fast' \(str\) is not valid: expected a finite number"),
        (TrainConfig, "max_steps: 2.5", r"max_steps=2\.5 \(float\) is not valid: expected an integer"),
        (TrainConfig, "batch_size: true", r"batch_size=True \(bool\) is not valid: expected an integer"),
        (TrainConfig, "symmetric: 'no'", r"symmetric='no' \(str\) is not valid: expected true or false"),
        (TrainConfig, "data: [1, 2]", r"data=\[1, 2\] \(list\) is not valid: expected a list of strings"),
        (TrainConfig, "lora_targets: {q: 1}", r"lora_targets=\{'q': 1\} \(dict\) is not valid: expected a list"),
        (TrainConfig, "method: 3", r"method=3 \(int\) is not valid: expected one of 'suffix', 'deep-suffix', 'prompt', 'prefix', 'lora'"),
        (TrainConfig, "placement: sideways", r"placement='sideways' is not supported; choose one of"),
        (TrainConfig, "max_samples: lots", r"max_samples='lots' \(str\) is not valid: expected an integer or null"),
        (TrainConfig, "init_text: 5", r"init_text=5 \(int\) is not valid: expected a string or null"),
        (MNTPConfig, "group_by_length: 'off'", r"group_by_length='off' \(str\) is not valid: expected true or false"),
        (MNTPConfig, "mask_prob: high", r"mask_prob='high' \(str\) is not valid: expected a finite number"),
        (MNTPConfig, "eval_lines: [3]", r"eval_lines=\[3\] \(list\) is not valid: expected an integer"),
    ],
)
def test_yaml_value_of_the_wrong_type(tmp_path, config_cls, line, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        config_cls.from_sources(str(recipe))


def test_yaml_numbers_are_read_as_numbers(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lr: 1e-3\nweight_decay: 0\ndata: one.jsonl\n")  # YAML 1.1 reads 1e-3 as a string
    cfg = TrainConfig.from_sources(str(recipe))
    assert (cfg.lr, cfg.weight_decay, cfg.data) == (0.001, 0.0, ["one.jsonl"])
    assert isinstance(cfg.weight_decay, float)


class KillingLog:
    """Stands in for JsonlLogCallback: logs as usual, and Ctrl-C arrives at `step` of the first run only."""

    def __init__(self, base, step):
        self.base, self.step, self.fired = base, step, False

    def __call__(self, path):
        killer = self

        class Log(self.base):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == killer.step and not killer.fired:
                    killer.fired = True
                    raise KeyboardInterrupt

        return Log(path)


def interrupt_and_resume(monkeypatch, capsys, module, argv):
    """Run `argv` with Ctrl-C at step 6, check the message, then run the command it prints."""
    monkeypatch.setattr(module, "JsonlLogCallback", KillingLog(module.JsonlLogCallback, 6))
    try:
        main(argv)
    except KeyboardInterrupt:  # re-raised, it would stop the whole test session
        pytest.fail("Ctrl-C escaped as a KeyboardInterrupt (a traceback for the user)")
    except SystemExit as exit_info:
        assert exit_info.code == 130
    else:
        pytest.fail("an interrupted run exited normally")
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted" in err and "checkpoint-4" in err
    assert "Continue the run with:\n" in err, err
    command = err.split("Continue the run with:\n", 1)[1].splitlines()[0].strip()
    assert command.startswith(f"spt-embed {argv[0]} ") and command.endswith(" --resume"), err
    assert main(shlex.split(command)[1:]) == 0
    return err


def test_ctrl_c_during_train_prints_how_to_resume(tmp_path, backbones, monkeypatch, capsys):
    from spt_embed.training import train as train_module

    data = toy_pairs(tmp_path / "pairs.jsonl")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"backbone: {backbones['llama']}\nnum_tokens: 2\nlr: 0.03\n")
    argv = ["train", "--config", str(recipe), "--data", str(data), "--output", str(tmp_path / "run dir")]
    argv += ["--max-steps", "8", "--batch-size", "8", "--eval-steps", "0", "--save-steps", "4", "--symmetric"]
    err = interrupt_and_resume(monkeypatch, capsys, train_module, argv)
    assert f"--config {recipe}" in err and "--symmetric" in err and "'" in err  # the output path is quoted
    assert json.loads((tmp_path / "run dir" / TRAIN_CONFIG_NAME).read_text())["resumed_from_step"] == 4
    assert (tmp_path / "run dir" / "soft_prompt.safetensors").is_file()


def test_ctrl_c_during_mntp_prints_how_to_resume(lab, tmp_path, monkeypatch, capsys):
    from spt_embed.training import run_log

    argv = ["mntp", "--backbone", str(lab / "lm"), "--corpus", str(lab / "corpus.txt"), "--output", str(tmp_path / "bi")]
    argv += ["--mask-token", "<unk>", "--steps", "8", "--save-steps", "4", "--eval-lines", "0", "--batch-size", "16"]
    argv += ["--no-group-by-length"]
    err = interrupt_and_resume(monkeypatch, capsys, run_log, argv)
    assert "--no-group-by-length" in err
    assert json.loads((tmp_path / "bi" / MNTP_CONFIG_NAME).read_text())["steps"] == 8


def test_mntp_without_held_out_texts(lab, tmp_path):
    assert tokenize_corpus(build_tokenizer("llama"), [], 16) == []
    out = mntp(**mntp_options(lab, output=str(tmp_path / "bi"), max_steps=2, save_steps=2, eval_lines=0))
    assert json.loads((out / "mntp_eval.json").read_text())["heldout_texts"] == 0


def test_method_spt_is_the_old_name_of_suffix(tmp_path, backbones, killed):
    from spt_embed.training.train_config import Method

    assert Method("spt") is Method.SUFFIX and TrainConfig(method="spt").method is Method.SUFFIX
    assert [m.value for m in Method] == ["suffix", "deep-suffix", "prompt", "prefix", "lora"]
    # a run saved by 0.1 says method 'spt': resuming it with today's default is no change
    saved = killed / "train_config.json"
    settings = json.loads(saved.read_text())
    assert settings["method"] == "suffix"
    saved.write_text(json.dumps({**settings, "method": "spt"}))
    model = spt_embed.train(config(tmp_path, backbones["llama"]), resume=True)
    assert model.prompt_module.soft_prompt.shape[0] == 4
