"""Paths of the public data sets that some tests read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("FUSIONREC_SHARED_DATA", REPO.parent / "shared" / "data"))
TAOBAO = SHARED_DATA / "taobao-userbehavior" / "taobao_first_users.csv.gz"
TAOBAO_SLICE = SHARED_DATA / "taobao-userbehavior" / "taobao_timeslice_20171126.csv.gz"
RETAIL = SHARED_DATA / "online-retail" / "online_retail.csv.gz"
DIGINETICA = SHARED_DATA / "diginetica-sample" / "diginetica_sample_train-item-views.csv"


def shared_file(path: Path) -> Path:
    """Return ``path``, or skip the test when the data file is absent."""
    if not path.is_file():
        pytest.skip(f"shared data file {path} is absent; set FUSIONREC_SHARED_DATA to its folder")
    return path
