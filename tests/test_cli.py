import json
import subprocess
import sys

import numpy as np
import pytest

from spt_embed import SuffixPromptEncoder
from spt_embed.cli.main import main

from .conftest import SENTENCES


@pytest.fixture
def adapter(backbones, tmp_path):
    model = SuffixPromptEncoder.from_backbone(backbones["llama"], num_tokens=4, device="cpu")
    model.save(str(tmp_path / "adapter"))
    return tmp_path / "adapter", model


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_encode(adapter, tmp_path, fmt):
    path, model = adapter
    source = tmp_path / f"in.{fmt}"
    if fmt == "txt":
        source.write_text("\n".join(SENTENCES) + "\n")
    else:
        source.write_text("\n".join(json.dumps({"text": s, "id": i}) for i, s in enumerate(SENTENCES)) + "\n")
    out = tmp_path / "emb.npy"
    assert main(["encode", "--model", str(path), "--input", str(source), "--output", str(out)]) == 0
    emb = np.load(out)
    assert emb.shape == (len(SENTENCES), 32) and emb.dtype == np.float32
    assert np.allclose(emb, model.encode(SENTENCES), atol=1e-5)
    # an existing output is never overwritten silently
    assert main(["encode", "--model", str(path), "--input", str(source), "--output", str(out)]) == 2
    assert np.array_equal(np.load(out), emb)


def test_encode_keeps_empty_lines_in_place(adapter, tmp_path):
    path, model = adapter
    source = tmp_path / "in.txt"
    source.write_text("hello\n\nthe cat\n")
    out = tmp_path / "emb.npy"
    assert main(["encode", "--model", str(path), "--input", str(source), "--output", str(out)]) == 0
    assert np.allclose(np.load(out), model.encode(["hello", "", "the cat"]), atol=1e-5)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"txt": "no"}\n', "in.jsonl:2: no 'text' field"),
        ('{"text": "ok"}\nnot json\n', "in.jsonl:2: not valid JSON"),
        ('{"text": 5}\n', "in.jsonl:1: field 'text' is int"),
        ("\n", "contains no texts"),
    ],
)
def test_encode_bad_jsonl(adapter, tmp_path, capsys, content, message):
    source = tmp_path / "in.jsonl"
    source.write_text(content)
    code = main(["encode", "--model", str(adapter[0]), "--input", str(source), "--output", str(tmp_path / "e.npy")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "e.npy").exists()


@pytest.mark.parametrize(
    "model_arg, message",
    [("nowhere", "Model 'nowhere' not found"), ("smollm2-135m", "is a backbone, not an encoder")],
)
def test_encode_bad_model(tmp_path, capsys, model_arg, message):
    source = tmp_path / "in.txt"
    source.write_text("hello\n")
    assert main(["encode", "--model", model_arg, "--input", str(source), "--output", str(tmp_path / "e.npy")]) == 2
    assert message in capsys.readouterr().err


def test_info(adapter, capsys):
    assert main(["info", str(adapter[0])]) == 0
    out = capsys.readouterr().out
    assert "soft tokens (K)       4" in out
    assert "trainable parameters  128" in out  # 4 x 32
    assert "model type            llama" in out


def test_export_command(adapter, tmp_path, capsys):
    assert main(["export", str(adapter[0]), str(tmp_path / "plain")]) == 0
    assert (tmp_path / "plain" / "modules.json").is_file()
    assert main(["export", str(adapter[0]), str(tmp_path / "plain")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "spt_embed", "--help"], capture_output=True, text=True, check=True)
    for command in ("encode", "info", "export"):
        assert command in result.stdout
