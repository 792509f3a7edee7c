"""Loading never runs code from a model folder: spt_embed.load, open_encoder and every `--model` command build only
the module classes spt-embed knows, refuse a Hugging Face config that asks for its own code, and read weights from
safetensors only; the folders spt-embed and sentence-transformers write load as they did."""

import json
import shutil
import tokenize
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

import spt_embed
from spt_embed import SuffixPromptEncoder
from spt_embed.cli.main import main
from spt_embed.model import base
from spt_embed.model.encoder import open_encoder
from spt_embed.model.lora import LORA_WEIGHTS, lora_baseline_encoder, merge_lora_for_inference

from .conftest import SENTENCES, move_lora_b

FIXTURE_V0_1 = Path(__file__).parent / "fixtures" / "adapter_v0_1"


@pytest.fixture(scope="module")
def saved(backbones, tmp_path_factory) -> dict[str, Path]:
    """One folder of each kind spt-embed reads, written once: an adapter (with saved prompts and a similarity
    function), its plain export, a LoRA baseline."""
    root = tmp_path_factory.mktemp("saved")
    model = SuffixPromptEncoder.from_backbone(backbones["llama"], num_tokens=2, device="cpu")
    model.prompts = {"query": "hello ", "document": ""}
    model.default_prompt_name = "query"
    model.similarity_fn_name = "dot"
    model.save(str(root / "adapter"))
    spt_embed.export(root / "adapter", root / "plain")
    lora = lora_baseline_encoder(backbones["llama"], r=4, targets=["q_proj", "v_proj"], max_length=64, device="cpu")
    move_lora_b(lora, 0.5)  # fresh LoRA layers change nothing until trained; make them count
    lora.save(str(root / "lora"))
    return {"adapter": root / "adapter", "plain": root / "plain", "lora": root / "lora"}


def files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def set_type(folder: Path, index: int, type_string: str) -> None:
    entries = json.loads((folder / "modules.json").read_text())
    entries[index]["type"] = type_string
    (folder / "modules.json").write_text(json.dumps(entries))


def attack_a(saved: dict[str, Path], folder: Path, marker: Path) -> str:
    """An adapter naming `spt_embed.SuffixPromptModule` with a spt_embed.py of its own beside it."""
    shutil.copytree(saved["adapter"], folder)
    set_type(folder, 0, "spt_embed.SuffixPromptModule")
    (folder / "spt_embed.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nfrom spt_embed.model.module import SuffixPromptModule\n"
    )
    return "'spt_embed.SuffixPromptModule'"


def attack_b(saved: dict[str, Path], folder: Path, marker: Path) -> str:
    """A standard sentence-transformers Transformer module whose config.json has an auto_map into evil.py: the
    plain export, and (so that spt_embed.load reaches it too) an adapter with such a module after its own."""
    if folder.name.startswith("adapter"):
        shutil.copytree(saved["adapter"], folder)
        # Only the Transformer's own files: its weights, tokenizer and configs.
        skip = shutil.ignore_patterns("1_Pooling", "2_Normalize", "modules.json", "config_sentence_transformers.json")
        shutil.copytree(saved["plain"], folder / "2_Transformer", ignore=skip)
        entries = json.loads((folder / "modules.json").read_text())
        entries.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Transformer",
                "type": "sentence_transformers.base.modules.transformer.Transformer",
            }
        )
        (folder / "modules.json").write_text(json.dumps(entries))
        config_dir = folder / "2_Transformer"
    else:
        shutil.copytree(saved["plain"], folder)
        config_dir = folder
    config = json.loads((config_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (config_dir / "config.json").write_text(json.dumps(config))
    for code_dir in {folder, config_dir}:  # transformers looks for the code at the root of the model folder
        (code_dir / "evil.py").write_text(
            f"open({str(marker)!r}, 'w').write('ran')\n"
            "from transformers import LlamaConfig as EvilConfig, LlamaModel as EvilModel\n"
        )
    return "auto_map"


def unknown_class(saved: dict[str, Path], folder: Path, marker: Path) -> str:
    """A folder whose modules.json names a class that no installed package holds, with its code beside it."""
    shutil.copytree(saved["adapter" if folder.name.startswith("adapter") else "lora"], folder)
    set_type(folder, 0, "custom_module.CustomModule")
    (folder / "custom_module.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from spt_embed.model.module import SuffixPromptModule as CustomModule\n"
    )
    return "'custom_module.CustomModule'"


def open_with_load(folder, tmp_path, capsys):
    spt_embed.load(folder)


def open_with_open_encoder(folder, tmp_path, capsys):
    open_encoder(folder)


def open_with_cli(folder, tmp_path, capsys):
    """`spt-embed encode`: exit status 2 and its error printed; raised here for the shared checks."""
    output = tmp_path / "out.npy"
    status = main(["encode", "--model", str(folder), "--input", str(tmp_path / "texts.txt"), "--output", str(output)])
    err = capsys.readouterr().err
    assert not output.exists()
    if status == 2 and "spt-embed encode: error:" in err:
        raise ValueError(err)
    raise AssertionError(f"encode returned {status}: {err}")


@pytest.mark.parametrize("attack", [attack_a, attack_b, unknown_class], ids=["attack-a", "attack-b", "unknown-class"])
@pytest.mark.parametrize(
    "open_model", [open_with_load, open_with_open_encoder, open_with_cli], ids=["load", "open_encoder", "cli-encode"]
)
def test_a_folder_that_brings_code_loads_nothing_and_runs_nothing(
    saved, tmp_path, capsys, monkeypatch, attack, open_model
):
    folder = tmp_path / ("adapter" if open_model is open_with_load or attack is attack_a else "st")
    marker = tmp_path / "MARKER"
    offending = attack(saved, folder, marker)
    (tmp_path / "texts.txt").write_text("hello\n")
    backbones_loaded, load_backbone = [], base.load_backbone
    monkeypatch.setattr(base, "load_backbone", lambda *a, **k: backbones_loaded.append(a) or load_backbone(*a, **k))
    before = files(tmp_path)
    with pytest.raises(ValueError, match="never") as raised:
        open_model(folder, tmp_path, capsys)
    assert offending in str(raised.value)  # the error names the offending entry
    assert str(folder) in str(raised.value)
    assert not marker.exists()
    assert backbones_loaded == []
    assert files(tmp_path) == before  # nothing written, nothing changed


def test_the_error_names_which_entry(saved, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(saved["adapter"], folder)
    set_type(folder, 1, "sentence_transformers.util.misc.import_module_class")  # inside the package, not a module
    with pytest.raises(ValueError, match=r"entry 1 names module type 'sentence_transformers\.util\.misc\."):
        spt_embed.load(folder)


@pytest.mark.parametrize("path", ["../elsewhere", "/tmp", "a/../../b"])
def test_a_module_path_outside_the_folder_is_refused(saved, tmp_path, path):
    folder = tmp_path / "adapter"
    shutil.copytree(saved["adapter"], folder)
    entries = json.loads((folder / "modules.json").read_text())
    entries[1]["path"] = path
    (folder / "modules.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=rf"entry 1 has path {path!r}, outside"):
        spt_embed.load(folder)


def test_an_adapter_must_start_with_its_prompt_module(saved, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(saved["adapter"], folder)
    entries = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps(entries[::-1]))
    with pytest.raises(ValueError, match="names '.*Normalize' as its first module, where a SuffixPromptModule"):
        spt_embed.load(folder)


def test_pickled_weights_are_never_read(saved, tmp_path, backbones):
    """A Transformer module or a backbone whose weights are only a pytorch_model.bin is refused."""
    from safetensors.torch import load_file

    plain = tmp_path / "plain"
    shutil.copytree(saved["plain"], plain)
    torch.save(load_file(plain / "model.safetensors"), plain / "pytorch_model.bin")
    (plain / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"has no model.safetensors for its Transformer module; .* safetensors only"):
        open_encoder(plain)

    backbone = tmp_path / "backbone"
    shutil.copytree(backbones["llama"], backbone)
    torch.save(load_file(backbone / "model.safetensors"), backbone / "pytorch_model.bin")
    (backbone / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="Could not load a backbone"):
        spt_embed.load(saved["adapter"], backbone=backbone)

    lora = tmp_path / "lora"
    shutil.copytree(saved["lora"], lora)
    torch.save(load_file(lora / LORA_WEIGHTS), lora / "lora" / "adapter_model.bin")
    (lora / LORA_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors is missing"):
        open_encoder(lora)


def test_a_backbone_auto_map_never_runs(saved, backbones, tmp_path):
    """A backbone folder's auto_map is not followed (trust_remote_code=False): transformers' own class loads it."""
    backbone = tmp_path / "backbone"
    shutil.copytree(backbones["llama"], backbone)
    marker = tmp_path / "MARKER"
    config = json.loads((backbone / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (backbone / "config.json").write_text(json.dumps(config))
    (backbone / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import LlamaConfig as EvilConfig, LlamaModel as EvilModel\n"
    )
    model = spt_embed.load(saved["adapter"], backbone=backbone)
    assert not marker.exists()
    assert type(model.prompt_module.backbone).__module__.startswith("transformers.models.llama")


def st_reference(folder: Path) -> SentenceTransformer:
    """The folder as sentence-transformers itself loads it, trusting the spt_embed classes it names: the way
    spt-embed loaded every folder before."""
    return SentenceTransformer(str(folder), trust_remote_code=True, local_files_only=True, device="cpu")


def old_style(saved: dict[str, Path], tmp_path: Path) -> Path:
    """The plain export as sentence-transformers up to 5.3 named its modules (`sentence_transformers.models.X`)."""
    folder = tmp_path / "old-style"
    shutil.copytree(saved["plain"], folder)
    for index, name in enumerate(["Transformer", "Pooling", "Normalize"]):
        set_type(folder, index, f"sentence_transformers.models.{name}")
    return folder


@pytest.mark.parametrize(
    "kind, make",
    [
        ("adapter", lambda saved, tmp: saved["adapter"]),
        ("plain export", lambda saved, tmp: saved["plain"]),
        ("LoRA baseline", lambda saved, tmp: saved["lora"]),
        ("spt-embed 0.1 adapter", lambda saved, tmp: FIXTURE_V0_1 / "adapter"),
        ("sentence-transformers <= 5.3 names", old_style),
    ],
)
def test_known_folders_load_as_before(saved, tmp_path, kind, make):
    folder = make(saved, tmp_path)
    expected = st_reference(folder)
    before = files(folder)
    if kind == "LoRA baseline":
        # open_encoder merges a LoRA adapter in memory for encoding; as saved, it loads as sentence-transformers
        # loads it, bit for bit, and merged as the same reference merged.
        unmerged = open_encoder(folder, device="cpu", merge_lora=False)
        assert unmerged[0].has_lora
        as_saved = unmerged.encode(SENTENCES, convert_to_tensor=True)
        assert torch.equal(as_saved, expected.encode(SENTENCES, convert_to_tensor=True))
        expected = merge_lora_for_inference(expected)
    loaded = open_encoder(folder, device="cpu")
    assert files(folder) == before  # loading writes nothing
    assert [type(m) for m in loaded] == [type(m) for m in expected]
    assert (loaded.prompts, loaded.default_prompt_name, loaded.similarity_fn_name) == (
        expected.prompts,
        expected.default_prompt_name,
        expected.similarity_fn_name,
    )
    assert loaded.max_seq_length == expected.max_seq_length
    for prompt_name in (None, "document"):
        ours = loaded.encode(SENTENCES, prompt_name=prompt_name, convert_to_tensor=True)
        theirs = expected.encode(SENTENCES, prompt_name=prompt_name, convert_to_tensor=True)
        assert torch.equal(ours, theirs), kind
    if kind == "spt-embed 0.1 adapter":
        np.testing.assert_allclose(
            spt_embed.load(folder).encode([*SENTENCES, ""]), np.load(FIXTURE_V0_1 / "expected.npy"), rtol=0, atol=1e-6
        )


def test_saved_settings_are_kept(saved):
    model = spt_embed.load(saved["adapter"])
    assert isinstance(model, SuffixPromptEncoder)
    assert model.prompts["query"] == "hello " and model.default_prompt_name == "query"
    assert model.similarity_fn_name == "dot"


def test_trust_remote_code_is_the_callers_choice(saved):
    """trust_remote_code=True hands the folder to sentence-transformers as it is; the result is the same model."""
    trusted = spt_embed.load(saved["adapter"], trust_remote_code=True, device="cpu")
    assert torch.equal(
        trusted.encode(SENTENCES, convert_to_tensor=True),
        spt_embed.load(saved["adapter"], device="cpu").encode(SENTENCES, convert_to_tensor=True),
    )
    assert isinstance(open_encoder(saved["lora"], trust_remote_code=True, device="cpu"), SentenceTransformer)


def test_the_known_classes_are_exact():
    from spt_embed.model.loading import known_module_classes

    known = known_module_classes()
    assert "spt_embed.SuffixPromptModule" not in known
    assert all(name.startswith(("spt_embed.", "sentence_transformers.")) for name in known)
    assert {cls.__name__ for cls in known.values()} == {
        "SuffixPromptModule",
        "DeepSuffixModule",
        "BaselineModule",
        "Transformer",
        "Pooling",
        "Dense",
        "Normalize",
    }


def test_no_implicit_trust_remote_code_in_the_package():
    """No call in the package passes trust_remote_code=True: only a caller's own argument turns it on."""
    package = Path(spt_embed.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        with path.open("rb") as handle:
            tokens = [t for t in tokenize.tokenize(handle.readline) if t.type in (tokenize.NAME, tokenize.OP)]
        for name, equals, value in zip(tokens, tokens[1:], tokens[2:]):
            if (name.string, equals.string, value.string) == ("trust_remote_code", "=", "True"):
                offenders.append(f"{path.relative_to(package)}:{name.start[0]}")
    assert offenders == []
