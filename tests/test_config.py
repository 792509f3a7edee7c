import json

import pytest

from spt_embed.model.config import CONFIG_NAME, BackboneRef, Init, Placement, SuffixPromptConfig

REF = BackboneRef(source="x", fingerprint="f", model_type="llama", hidden_size=8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_tokens": 0}, "num_tokens must be an integer >= 1"),
        ({"num_tokens": -3}, "num_tokens must be an integer >= 1"),
        ({"num_tokens": 2.5}, "num_tokens must be an integer >= 1"),
        ({"init": "zeros"}, "init='zeros' is not supported; choose one of 'random', 'vocab', 'text'"),
        ({"placement": "middle"}, "placement='middle' is not supported; choose one of 'suffix', 'prefix'"),
        ({"num_tokens": 16, "max_length": 16}, "leaves no room for text"),
        ({"init": "text", "init_text": "   "}, "needs a non-empty init_text"),
    ],
)
def test_invalid_config(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SuffixPromptConfig(backbone=REF, **kwargs)


def test_round_trip(tmp_path):
    config = SuffixPromptConfig(backbone=REF, num_tokens=5, init="vocab", placement="prefix")
    config.save(tmp_path)
    loaded = SuffixPromptConfig.load(tmp_path)
    assert loaded == config
    assert loaded.init is Init.VOCAB and loaded.placement is Placement.PREFIX
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["spt_embed_version"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "has no 'backbone' entry"),
        ('{"backbone": {"source": "x", "fingerprint": "f"}, "colour": 1}', "unknown keys"),
        ('{"backbone": {"source": "x", "fingerprint": "f"}, "num_tokens": 0}', "num_tokens must be"),
    ],
)
def test_corrupted_config_file(tmp_path, content, message):
    (tmp_path / CONFIG_NAME).write_text(content)
    with pytest.raises(ValueError, match=message):
        SuffixPromptConfig.load(tmp_path)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a spt-embed adapter folder"):
        SuffixPromptConfig.load(tmp_path)
