"""Mapping rows of historical event files to events."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from stream.sources import SourceError, read_events, retail_family

RETAIL_HEADER = (
    "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
)


def _write(path: Path, text: str) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_retail_line_to_purchase(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "retail.csv.gz",
        RETAIL_HEADER
        + "536370,22728,ALARM CLOCK PINK,24,2010-12-01 08:45:00,3.75,12583.0,France\n"
        + "536370,85123A,HEART HOLDER,6,2010-12-01 08:45:00,2.55,12583.0,France\n",
    )

    events = read_events(path, "online-retail").events

    assert [(e.item_id, e.category, e.session_id) for e in events] == [
        ("22728", "2272", "536370"),
        ("85123A", "8512", "536370"),
    ]
    first = events[0]
    assert first.type == "purchase"
    assert first.user_id == "12583"
    assert first.quantity == 24
    assert first.price == 3.75
    assert first.event_id == "retail.csv.gz:2"
    assert first.title == "ALARM CLOCK PINK"


def test_retail_long_description_cut_to_limit(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "retail.csv",
        RETAIL_HEADER + f"536370,22728,{'A' * 600},24,2010-12-01 08:45:00,3.75,12583,France\n",
    )

    events = read_events(path, "online-retail").events

    assert len(events) == 1
    assert events[0].title == "A" * 512


def test_retail_without_descriptions_has_no_titles(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "retail.csv",
        "InvoiceNo,StockCode,Quantity,InvoiceDate,UnitPrice,CustomerID\n"
        "536370,22728,24,2010-12-01 08:45:00,3.75,12583\n",
    )

    events = read_events(path, "online-retail").events

    assert [(e.item_id, e.title) for e in events] == [("22728", None)]


def test_retail_skip_reasons(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "retail.csv",
        RETAIL_HEADER
        + "536371,POST,POSTAGE,1,2010-12-01 09:00:00,18.0,12583,France\n"
        + "536372,22728,ALARM CLOCK PINK,2,2010-12-01 09:00:00,3.75,,France\n"
        + "536373,22728,ALARM CLOCK PINK,2,2010-12-01 09:00:00,0,12583,France\n"
        + "536374,22728,ALARM CLOCK PINK,-2,2010-12-01 09:00:00,3.75,12583,France\n"
        + "536375,22728,ALARM CLOCK PINK,two,2010-12-01 09:00:00,3.75,12583,France\n"
        + "536376,22728,ALARM CLOCK PINK,2,yesterday,3.75,12583,France\n"
        + "536377,22728\n"
        + "536378,22727,ALARM CLOCK RED,2,2010-12-01 09:00:00,3.75,12583,France\n",
    )

    result = read_events(path, "online-retail")

    assert [e.session_id for e in result.events] == ["536378"]
    assert result.rows_read == 8
    assert result.skipped == {
        "non_product_code": 1,
        "missing_customer": 1,
        "non_positive_price": 1,
        "non_positive_quantity": 1,
        "invalid_number": 1,
        "invalid_timestamp": 1,
        "short_row": 1,
    }


def test_retail_cancellation_refunds(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "retail.csv",
        RETAIL_HEADER
        + "536380,22728,ALARM CLOCK PINK,4,2010-12-01 09:00:00,3.75,12583,France\n"
        + "C536381,22728,ALARM CLOCK PINK,-1,2010-12-01 10:00:00,3.75,12583,France\n",
    )

    with_refunds = read_events(path, "online-retail").events
    evaluated = read_events(path, "online-retail", refunds=False)

    assert [e.quantity for e in with_refunds] == [4, -1]
    assert with_refunds[1].is_refund
    assert [e.quantity for e in evaluated.events] == [4]
    assert evaluated.skipped == {"refund_excluded": 1}


def test_time_sort_is_stable(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "retail.csv",
        RETAIL_HEADER
        + "536391,21754,BLOCK WORD HOME,1,2010-12-01 11:00:00,5.95,13047,United Kingdom\n"
        + "536390,22623,JIGSAW BLOCKS,1,2010-12-01 10:00:00,4.95,13047,United Kingdom\n"
        + "536390,22622,ALPHABET BLOCKS,1,2010-12-01 10:00:00,9.95,13047,United Kingdom\n"
        + "536390,22310,MUG COSY,1,2010-12-01 10:00:00,1.65,13047,United Kingdom\n",
    )

    events = read_events(path, "online-retail").events

    assert [e.item_id for e in events] == ["22623", "22622", "22310", "21754"]


def test_taobao_behaviour_types(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "taobao.csv",
        "user_id,item_id,category_id,behavior_type,timestamp\n"
        "1,100,7,pv,1511544070\n"
        "1,101,7,cart,1511544071\n"
        "1,102,8,fav,1511544072\n"
        "1,103,8,buy,1511544073\n"
        "1,104,8,share,1511544074\n",
    )

    result = read_events(path, "taobao")

    assert [(e.type, e.category) for e in result.events] == [
        ("view", "7"),
        ("click", "7"),
        ("click", "8"),
        ("purchase", "8"),
    ]
    assert result.events[0].timestamp_ms == 1_511_544_070_000
    assert result.skipped == {"unknown_behavior_type": 1}


def test_missing_columns_named(tmp_path: Path) -> None:
    path = _write(tmp_path / "retail.csv", "InvoiceNo,StockCode\n1,22728\n")

    with pytest.raises(SourceError, match="missing Quantity, InvoiceDate, UnitPrice, CustomerID"):
        read_events(path, "online-retail")


def test_unknown_format_named(tmp_path: Path) -> None:
    path = _write(tmp_path / "events.csv", "a\n")

    with pytest.raises(SourceError, match="unknown format 'parquet'"):
        read_events(path, "parquet")


@pytest.mark.parametrize(
    ("code", "family"),
    [("22726", "2272"), ("22729", "2272"), ("84029G", "8402"), ("DCGS0003", "DCGS")],
)
def test_retail_family_code_head(code: str, family: str) -> None:
    assert retail_family(code) == family
