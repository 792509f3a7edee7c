"""`import spt_embed` and the whole CLI parser stay free of heavy packages (so `spt-embed --help` is fast), and the
light copies of choices the parser shows match the heavy modules that define them."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "sentence_transformers", "mteb", "faiss", "peft", "datasets", "matplotlib")


def test_parser_imports_no_heavy_package():
    code = (
        "import sys, spt_embed\n"
        "from spt_embed.cli.main import build_parser\n"
        "build_parser()\n"
        f"print(','.join(name for name in {HEAVY!r} if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"building the CLI parser imported: {result.stdout.strip()}"


def test_dtype_choices_are_the_encoder_dtypes():
    from spt_embed.cli.options import DTYPE_CHOICES
    from spt_embed.model.dtypes import DTYPES

    assert list(DTYPE_CHOICES) == list(DTYPES)


def test_baseline_choices_are_the_baselines():
    from spt_embed.cli.eval_commands import BASELINE_CHOICES
    from spt_embed.model.baselines import Baseline

    assert list(BASELINE_CHOICES) == [b.value for b in Baseline]


@pytest.mark.parametrize(
    "command", ["encode", "info", "train", "mntp", "export", "merge-lora", "eval", "index", "search", "index-merge"]
)
def test_every_command_has_help(command, capsys):
    from spt_embed.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: spt-embed {command}" in capsys.readouterr().out
