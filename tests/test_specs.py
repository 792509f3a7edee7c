"""One classification of model specs, and what each use of a spec gets from it."""

from pathlib import Path

import pytest

from spt_embed.model.specs import SpecKind, bundled_adapters, classify

ADAPTER = Path(__file__).parent / "fixtures" / "adapter_v0_1" / "adapter"  # holds its backbone in backbone/


def make_spec(tmp_path: Path, what: str) -> str:
    """A spec of each form, built in tmp_path (names are names)."""
    if what == "st-folder":
        (tmp_path / "st").mkdir()
        (tmp_path / "st" / "modules.json").write_text("[]")
        return str(tmp_path / "st")
    if what == "gguf":
        (tmp_path / "m.gguf").write_bytes(b"GGUF")
        return str(tmp_path / "m.gguf")
    if what == "other-file":
        (tmp_path / "weights.bin").write_bytes(b"x")
        return str(tmp_path / "weights.bin")
    if what == "empty-dir":
        return str(tmp_path)
    return {
        "adapter": str(ADAPTER),
        "hf-dir": str(ADAPTER / "backbone"),
        "missing": str(tmp_path / "nowhere"),
    }.get(what, what)


@pytest.mark.parametrize(
    "what, kind",
    [
        ("smollm2-135m-nli", SpecKind.BUNDLED_ADAPTER),
        ("all-minilm-l6-v2", SpecKind.REFERENCE_ENCODER),
        ("smollm2-135m", SpecKind.NAMED_BACKBONE),
        ("adapter", SpecKind.ADAPTER),
        ("st-folder", SpecKind.SENTENCE_TRANSFORMER),
        ("hf-dir", SpecKind.BACKBONE_DIR),
        ("gguf", SpecKind.GGUF),
        ("other-file", SpecKind.OTHER_FILE),
        ("empty-dir", SpecKind.OTHER_DIR),
        ("missing", SpecKind.MISSING),
    ],
)
def test_classify(tmp_path, what, kind):
    assert "smollm2-135m-nli" in bundled_adapters()
    assert classify(make_spec(tmp_path, what)).kind is kind


ADVICE = {"backbone_advice": "use it as a backbone.", "also": ["a backbone with --baseline"]}


@pytest.mark.parametrize(
    "what, error, message",
    [
        ("hf-dir", ValueError, "is a backbone, not an encoder: use it as a backbone."),
        ("gguf", ValueError, "is a backbone, not an encoder"),
        ("smollm2-135m", ValueError, "is a backbone, not an encoder"),
        ("missing", FileNotFoundError, r"not found: expected .*encoder \(all-minilm-l6-v2\), or a backbone with"),
        ("empty-dir", FileNotFoundError, "not found"),
        ("other-file", FileNotFoundError, "not found"),
    ],
)
def test_encoder_folder_refuses(tmp_path, what, error, message):
    with pytest.raises(error, match=message):
        classify(make_spec(tmp_path, what)).encoder_folder(**ADVICE)


def test_encoder_folder_finds(tmp_path):
    assert classify(str(ADAPTER)).encoder_folder(**ADVICE) == ("adapter", ADAPTER)
    bundled_kind, bundled = classify("smollm2-135m-nli").encoder_folder(**ADVICE)
    assert bundled_kind == "adapter" and (bundled / "spt_config.json").is_file()
    st = make_spec(tmp_path, "st-folder")
    assert classify(st).encoder_folder(**ADVICE) == ("sentence-transformer", Path(st).resolve())


@pytest.mark.parametrize(
    "what, error, message",
    [
        ("smollm2-135m-nli", ValueError, r"is a spt-embed adapter, not a backbone; load it with spt_embed.load"),
        ("adapter", ValueError, "is a spt-embed adapter, not a backbone"),
        ("st-folder", FileNotFoundError, "has no config.json"),
        ("all-minilm-l6-v2", FileNotFoundError, "Backbone 'all-minilm-l6-v2' not found"),
    ],
)
def test_backbone_source_refuses(tmp_path, what, error, message):
    with pytest.raises(error, match=message):
        classify(make_spec(tmp_path, what)).backbone_source()


def test_adapter_folder_points_a_sentence_transformer_elsewhere(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no spt_config.json. It looks like a plain SentenceTransformer"):
        classify(make_spec(tmp_path, "st-folder")).adapter_folder()
    with pytest.raises(FileNotFoundError, match="not a folder nor a bundled adapter"):
        classify("smollm2-135m").adapter_folder()


def test_reopenable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "modules.json").write_text("[]")
    assert classify("st").reopenable() == str(tmp_path / "st")
    for name in ("smollm2-135m-nli", "all-minilm-l6-v2", "smollm2-135m", "not-there"):
        assert classify(name).reopenable() == name


@pytest.mark.parametrize(
    "adapter, recipe",
    [
        ("smollm2-135m-nli", "smollm2-nli.yaml"),
        ("smollm2-135m-nli-deep", "smollm2-nli-deep.yaml"),
        ("smollm2-135m-retrieval", "smollm2-retrieval.yaml"),
    ],
)
def test_bundled_adapter_was_trained_by_its_recipe(adapter, recipe):
    """A bundled adapter ships with the resolved options it was trained with; the recipe the README names for it must
    resolve to the same options (only the output folder may differ), so `spt-embed train --config` reproduces it."""
    import json

    from spt_embed.training.train_config import TrainConfig

    from spt_embed.model.specs import BUNDLED_ADAPTERS_DIR

    folder = BUNDLED_ADAPTERS_DIR / adapter
    shipped = json.loads((folder / "train_config.json").read_text())
    repo = Path(__file__).resolve().parents[1]
    resolved = TrainConfig.from_sources(repo / "train" / "configs" / recipe, output=shipped["output"]).to_dict()
    records = ("spt_embed_version", "mined_negatives")  # what a run records beside its options
    differ = {key: (value, resolved.get(key)) for key, value in shipped.items()
              if key not in records and json.dumps(value) != json.dumps(resolved.get(key))}
    assert not differ, f"{recipe} no longer resolves to what trained {adapter}: {differ}"
