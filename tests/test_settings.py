"""The settings file documents every setting and parses to the defaults."""

from pathlib import Path

import pytest

from core.settings import Settings
from tests.conftest import ROOT

pytestmark = pytest.mark.fast


def example_keys() -> list[str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return [line.split("=", 1)[0] for line in lines if line and not line.startswith("#")]


def test_env_example_lists_every_setting() -> None:
    assert sorted(example_keys()) == sorted(name.upper() for name in Settings.model_fields)


def test_env_example_parses_to_the_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    (tmp_path / ".env").write_text((ROOT / ".env.example").read_text())
    monkeypatch.chdir(tmp_path)
    assert Settings() == Settings(_env_file=None)


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name.upper() for name in Settings.model_fields if f"`{name.upper()}`" not in readme]
    assert not missing, f"README lacks {missing}"
