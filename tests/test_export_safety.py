"""`spt-embed export` never replaces the adapter it exports nor a folder of the user's, and what it writes (like
an adapter's soft prompt) gets the permissions the umask allows."""

import json
import stat

import pytest
import torch

import spt_embed
from spt_embed.cli.main import main
from spt_embed.model.export import EXPORT_MARKER


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def adapter(tmp_path, backbones):
    """A saved adapter with checkpoints beside it, as a training run leaves it."""
    model = spt_embed.SuffixPromptEncoder.from_backbone(backbones["llama"], num_tokens=3, device="cpu")
    with torch.no_grad():
        model.prompt_module.soft_prompt.add_(0.5)
    folder = tmp_path / "adapter"
    model.save(str(folder))
    (folder / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    return folder


@pytest.mark.parametrize(
    "target, relation",
    [
        (lambda a: a, "is the adapter folder"),
        (lambda a: a / "checkpoints", "is inside the adapter folder"),
        (lambda a: a / "plain", "is inside the adapter folder"),
        (lambda a: a.parent, "contains the adapter folder"),
    ],
    ids=["same", "inside-existing", "inside-new", "around"],
)
def test_export_never_replaces_its_adapter(adapter, target, relation):
    before = snapshot(adapter.parent)
    with pytest.raises(ValueError, match=f"{relation}.*nothing was written"):
        spt_embed.export(adapter, target(adapter), overwrite=True)
    assert snapshot(adapter.parent) == before


def test_export_sees_through_symlinks(adapter, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(adapter, target_is_directory=True)
    before = snapshot(adapter)
    with pytest.raises(ValueError, match="is the adapter folder"):
        spt_embed.export(link, adapter, overwrite=True)
    assert main(["export", str(adapter), str(link), "--overwrite"]) == 2
    assert "is the adapter folder" in capsys.readouterr().err
    assert snapshot(adapter) == before


def test_overwrite_replaces_only_an_earlier_export(adapter, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("four years of work")
    (mine / "modules.json").write_text("[]")  # looks like a SentenceTransformer folder, but is not an export
    assert main(["export", str(adapter), str(mine), "--overwrite"]) == 2
    assert f"{mine} is not an earlier export" in capsys.readouterr().err
    assert (mine / "thesis.txt").read_text() == "four years of work"

    out = spt_embed.export(adapter, tmp_path / "plain")
    record = json.loads((out / EXPORT_MARKER).read_text())
    assert record["adapter"] == str(adapter.resolve()) and len(record["soft_tokens"]) == 3
    with pytest.raises(FileExistsError, match="overwrite=True"):
        spt_embed.export(adapter, out)
    (out / "stale.txt").write_text("from the earlier export")
    assert spt_embed.export(adapter, out, overwrite=True) == out
    assert not (out / "stale.txt").exists() and (out / EXPORT_MARKER).is_file()


def test_adapter_and_export_follow_the_umask(tmp_path, backbones, umask):
    model = spt_embed.SuffixPromptEncoder.from_backbone(backbones["llama"], num_tokens=2, device="cpu")
    model.save(str(tmp_path / "adapter"))
    spt_embed.save(model, tmp_path / "full", include_backbone=True)
    out = spt_embed.export(tmp_path / "adapter", tmp_path / "plain")
    files = [*(tmp_path / "adapter").rglob("*"), *(tmp_path / "full").rglob("*"), *out.rglob("*")]
    assert out / "model.safetensors" in files and tmp_path / "adapter" / "soft_prompt.safetensors" in files
    assert tmp_path / "full" / "backbone" / "model.safetensors" in files
    wrong = {
        str(p): oct(stat.S_IMODE(p.stat().st_mode))
        for p in [out, *files]
        if stat.S_IMODE(p.stat().st_mode) != (0o777 if p.is_dir() else 0o666) & ~umask
    }
    assert not wrong, f"under umask {oct(umask)}: {wrong}"
