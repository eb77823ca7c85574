"""The README documents every setting with its real default."""

from dataclasses import fields
from pathlib import Path

import pytest

from stream.settings import SETTINGS_DOC, Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


@pytest.mark.parametrize("spec", fields(Settings), ids=lambda spec: spec.name)
def test_readme_documents_setting(spec):
    default = "(empty)" if spec.default == "" else spec.default
    row = f"| `FUSIONREC_{spec.name.upper()}` | `{default}` |"
    assert row in README


def test_every_setting_has_a_description():
    assert set(SETTINGS_DOC) == {spec.name for spec in fields(Settings)}


def test_readme_names_both_setup_commands():
    assert "make demo" in README
    assert "make test" in README
