"""Every package with doctests is collected by the default pytest run."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_packages_with_doctests_collected():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    testpaths = set(config["tool"]["pytest"]["ini_options"]["testpaths"])
    with_doctests = {
        path.parent.name
        for path in ROOT.glob("*/*.py")
        if path.parent.name not in ("tests", ".venv") and ">>> " in path.read_text()
    }
    assert with_doctests
    assert with_doctests <= testpaths, sorted(with_doctests - testpaths)
