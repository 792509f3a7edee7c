"""Adapter folders saved by spt-embed 0.1 keep loading and embedding the same.

tests/fixtures/adapter_v0_1/adapter was written by spt-embed 0.1 (`spt_embed.save(model, path,
include_backbone=True)` on a tiny random Llama of hidden size 16, built as conftest.make_backbone builds it, with
3 random soft tokens); its modules.json names the module `spt_embed.module.SuffixPromptModule`, the import path of
that release. expected.npy holds what 0.1 encoded for TEXTS from that folder, and the identities below are those 0.1 computed:
an index or eval results folder that recorded them must stay valid for the same model.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

import spt_embed
from spt_embed.model.baselines import baseline_encoder
from spt_embed.model.identity import folder_digest, model_fingerprint

from .conftest import SENTENCES

FIXTURE = Path(__file__).parent / "fixtures" / "adapter_v0_1"
ADAPTER = FIXTURE / "adapter"
TEXTS = [*SENTENCES, ""]


def files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def settings(path: Path) -> dict:
    """A saved config without the versions of the libraries that wrote it."""
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in ("spt_embed_version", "transformers_version")}


def test_fixture_names_the_old_import_path():
    types = [entry["type"] for entry in json.loads((ADAPTER / "modules.json").read_text())]
    assert types[0] == "spt_embed.module.SuffixPromptModule"
    assert sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file()) < 300_000


@pytest.mark.parametrize(
    "open_model",
    [
        lambda: spt_embed.load(ADAPTER),
        lambda: SentenceTransformer(str(ADAPTER), trust_remote_code=True, device="cpu"),
    ],
    ids=["spt_embed.load", "SentenceTransformer"],
)
def test_old_adapter_embeds_as_it_did(open_model):
    embeddings = open_model().encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(embeddings, np.load(FIXTURE / "expected.npy"), rtol=0, atol=1e-6)


def test_todays_save_writes_the_same_files(tmp_path):
    model = spt_embed.load(ADAPTER)
    spt_embed.save(model, tmp_path / "again", include_backbone=True)
    assert files(tmp_path / "again") == files(ADAPTER)
    # Fields added since 0.1 are written with the value a 0.1 folder is read with.
    added = {
        "spt_config.json": {"readout": "last", "method": "suffix", "tasks": [], "task_max_length": {}, "tail": "",
                            "deep_offsets": "states"},
        "backbone/config.json": {},
    }
    for name in ("spt_config.json", "backbone/config.json"):
        assert settings(tmp_path / "again" / name) == {**settings(ADAPTER / name), **added[name]}
    reloaded = spt_embed.load(tmp_path / "again").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(reloaded, np.load(FIXTURE / "expected.npy"), rtol=0, atol=1e-6)


def test_identities_are_those_saved_folders_recorded():
    model = spt_embed.load(ADAPTER)
    assert model[0].backbone_ref.fingerprint == "12b4af4b9a8a32f4"  # spt_config.json
    assert model_fingerprint(model) == ("a10d9feff6cb5490", "12b4af4b9a8a32f4")  # index_meta.json
    baseline = baseline_encoder(ADAPTER / "backbone", "prompteol")
    assert model_fingerprint(baseline) == ("66f25f7fec581261", "")
    assert folder_digest(ADAPTER) == "32fb4177cd4041ccaf5be7702a8717857aa5851188784a09140fcce9fadcdf9c"  # spt_eval.json
