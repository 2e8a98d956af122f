"""The validated-mappings cache (omgtool/arch/mapping_cache.py): a warm start builds exactly the
models pydantic validation builds, and any edit to a mapping is validated again."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from omgtool.arch import mapping, mapping_cache
from omgtool.errors import InvalidArgument
from tests.paths import FINETUNE

ROOT = Path(__file__).resolve().parent.parent


def _load(root: Path):
    return mapping.load_registry.__wrapped__(root)  # bypass the in-process lru_cache


@pytest.fixture
def mappings(tmp_path, monkeypatch):
    root = Path(shutil.copytree(ROOT / "mappings", tmp_path / "mappings"))
    monkeypatch.setenv("OMGTOOL_CACHE_DIR", str(tmp_path / "cache"))
    return root, tmp_path / "cache"


def test_warm_start_builds_the_same_models(mappings, monkeypatch):
    root, cache = mappings
    cold = _load(root)
    assert len(list(cache.glob("mappings-*.json"))) == 1
    calls = []
    real = mapping._validate
    monkeypatch.setattr(mapping, "_validate", lambda cls, data: calls.append(1) or real(cls, data))
    warm = _load(root)
    assert calls == []  # nothing validated: the cache answered
    for table in ("architectures", "families", "conversions", "keymaps"):
        assert getattr(warm, table) == getattr(cold, table), table
        for name, model in getattr(warm, table).items():
            assert type(model) is type(getattr(cold, table)[name])
            assert mapping_cache.dump(model) == mapping_cache.dump(getattr(cold, table)[name])
    fam = warm.families["omg-llava"]
    assert isinstance(fam.components[0], mapping.ComponentSpec) and isinstance(fam.lora, mapping.LoraSpec)
    assert fam.lora.default_alpha == 256


def test_validation_refuses_what_the_schemas_do_not_allow(mappings):
    root, _ = mappings
    path = root / "family_omg_llava.toml"
    text = path.read_text()
    for bad, why in [(text.replace("priority = 10", "priority = \"high\"", 1), "priority"),
                     (text.replace("kind = \"family\"", "kind = \"famly\"", 1), "'kind' must be one of"),
                     (text + "\n[[tokens.added]]\ncontent = \"[SEG]\"\n", "listed twice")]:
        path.write_text(bad)
        with pytest.raises(InvalidArgument, match=why):
            _load(root)


def test_an_edited_mapping_is_validated_again(mappings):
    root, cache = mappings
    _load(root)
    path = root / "arch_llama.toml"
    path.write_text(path.read_text().replace('kind = "architecture"', 'kind = "architecture"\ntypo_field = 1', 1))
    with pytest.raises(InvalidArgument, match="arch_llama.toml: invalid mapping"):
        _load(root)


def test_corrupt_or_disabled_cache_is_ignored(mappings, monkeypatch):
    root, cache = mappings
    cold = _load(root)
    (entry,) = cache.glob("mappings-*.json")
    entry.write_text("{not json")
    assert _load(root).families == cold.families
    json.loads(entry.read_text())  # rewritten whole
    monkeypatch.setenv("OMGTOOL_CACHE_DIR", "")
    shutil.rmtree(cache)
    assert _load(root).families == cold.families and not cache.exists()


def test_inspect_reports_the_same_cold_and_warm(tmp_path):
    env = {**__import__("os").environ, "OMGTOOL_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "omgtool.cli", "inspect", str(FINETUNE), "--json"]
    cold = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    warm = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert cold.returncode == warm.returncode == 0, cold.stderr + warm.stderr
    assert json.loads(cold.stdout) == json.loads(warm.stdout)
    assert len(list((tmp_path / "cache").glob("mappings-*.json"))) == 1
