"""Mapping rows of historical event files to events."""

from __future__ import annotations

import gzip
import os
import threading
import time
from pathlib import Path

import orjson
import pytest

from stream.sources import EXAMPLES_PER_REASON, SourceError, read_events, retail_family

from shared_data import DIGINETICA, shared_file

RETAIL_HEADER = (
    "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
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
    assert first.event_id.startswith("retail.csv.gz:2:")
    assert first.title == "ALARM CLOCK PINK"


DIGINETICA_HEADER = "session_id;user_id;item_id;timeframe;eventdate\n"


def test_diginetica_rows_to_views_in_time_order(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "views.csv",
        DIGINETICA_HEADER
        + "7;NA;81766;526309;2016-05-09\n"
        + "7;NA;31331;1031018;2016-05-09\n"
        + "8;42;32118;0;2016-05-09\n",
    )

    events = read_events(path, "diginetica").events

    midnight = 1_462_752_000_000  # 2016-05-09T00:00:00Z
    assert [(e.user_id, e.item_id, e.session_id, e.timestamp_ms) for e in events] == [
        ("42", "32118", "8", midnight),
        ("session-7", "81766", "7", midnight + 526_309),
        ("session-7", "31331", "7", midnight + 1_031_018),
    ]
    assert {e.type for e in events} == {"view"}
    assert events[1].event_id.startswith("views.csv:2:")


def test_diginetica_published_header(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "train-item-views.csv",
        "sessionId;userId;itemId;timeframe;eventdate\n1;NA;81766;526309;2016-05-09\n",
    )

    events = read_events(path, "diginetica").events

    assert [(e.user_id, e.item_id, e.session_id) for e in events] == [("session-1", "81766", "1")]


def test_diginetica_skip_reasons(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "views.csv",
        DIGINETICA_HEADER
        + "1;NA;100;10;2016-05-09\n"
        + "2;NA;101;10;2016-13-40\n"
        + "3;NA;102;-5;2016-05-09\n"
        + "4;NA;103;\u00b2;2016-05-09\n"
        + "5;NA;;10;2016-05-09\n"
        + "6;NA;105\n",
    )

    result = read_events(path, "diginetica")

    assert [e.item_id for e in result.events] == ["100"]
    assert result.skipped == {"invalid_timestamp": 3, "empty_id": 1, "short_row": 1}


def test_empty_id_detail_names_fields(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "views.csv",
        DIGINETICA_HEADER
        + "1;NA;100;10;2016-05-09\n"
        + ";NA;;10;2016-05-09\n"
        + "3;NA;;10;2016-05-09\n",
    )
    examples = read_events(path, "diginetica").examples["empty_id"]
    assert examples[0].detail == "session_id and item_id are empty; expected non-empty ids"
    assert examples[1].detail == "item_id is empty; expected a non-empty id"


def test_diginetica_sample_reads_whole() -> None:
    result = read_events(shared_file(DIGINETICA), "diginetica")
    assert result.summary() == {
        "rows_read": 12391,
        "events": 12391,
        "skipped": {},
        "skipped_examples": {},
    }
    anonymous = {e.session_id for e in result.events if e.user_id.startswith("session-")}
    registered = {e.user_id for e in result.events if not e.user_id.startswith("session-")}
    assert (len(registered), len(anonymous)) == (1270, 1724)


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


TAOBAO_HEADER = "user_id,item_id,category_id,behavior_type,timestamp\n"


def test_truncated_gzip_named(tmp_path: Path) -> None:
    whole = _write(tmp_path / "whole.csv.gz", TAOBAO_HEADER + "1,2,3,pv,1511544070\n" * 2000)
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(whole.read_bytes()[:200])
    with pytest.raises(SourceError, match="not a complete gzip file"):
        read_events(cut, "taobao")


def test_directory_named(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="is a directory"):
        read_events(tmp_path, "taobao")


def test_byte_order_mark_ignored(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (TAOBAO_HEADER + "1,2,3,pv,1511544070\n").encode())
    assert len(read_events(path, "taobao").events) == 1


def test_bad_bytes_skip_their_row_only(tmp_path: Path) -> None:
    path = tmp_path / "bytes.csv"
    rows = [b"1,2,3,pv,1511544070", b"1,\xe9,3,pv,1511544071", b"1,4,3,pv,1511544072"]
    path.write_bytes(TAOBAO_HEADER.encode() + b"\n".join(rows) + b"\n")
    loaded = read_events(path, "taobao")
    assert [e.item_id for e in loaded.events] == ["2", "4"]
    assert loaded.skipped["not_utf8"] == 1


def test_stray_quote_keeps_later_rows(tmp_path: Path) -> None:
    rows = ["1,2,3,pv,1511544070", '1,"5,3,pv,1511544071'] + ["1,4,3,pv,1511544072"] * 50
    path = _write(tmp_path / "quote.csv", TAOBAO_HEADER + "\n".join(rows) + "\n")
    assert len(read_events(path, "taobao").events) == 52


def test_oversized_field_skipped(tmp_path: Path) -> None:
    rows = ["1,2,3,pv,1511544070", f"1,{'x' * 200_000},3,pv,1511544071", "1,4,3,pv,1511544072"]
    path = _write(tmp_path / "long.csv", TAOBAO_HEADER + "\n".join(rows) + "\n")
    loaded = read_events(path, "taobao")
    assert [e.item_id for e in loaded.events] == ["2", "4"]
    assert loaded.skipped["malformed_row"] == 1


def test_long_id_skipped_with_contract_reason(tmp_path: Path) -> None:
    rows = ["1,2,3,pv,1511544070", f"1,{'x' * 300},3,pv,1511544071"]
    path = _write(tmp_path / "id.csv", TAOBAO_HEADER + "\n".join(rows) + "\n")
    loaded = read_events(path, "taobao")
    assert [e.item_id for e in loaded.events] == ["2"]
    assert loaded.skipped["id_too_long"] == 1


def test_contract_violations_skipped_with_reason(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "retail.csv",
        RETAIL_HEADER
        + "536370,22728,CLOCK,24,2010-12-01 08:45:00,3.75,12583,France\n"
        + "536370,22729,CLOCK,5000000,2010-12-01 08:45:00,3.75,12583,France\n"
        + "536370,22730,CLOCK,inf,2010-12-01 08:45:00,3.75,12583,France\n"
        + "536370,22731,CLOCK,2.5,2010-12-01 08:45:00,3.75,12583,France\n"
        + "536370,22732,CLOCK,24,1990-12-01 08:45:00,3.75,12583,France\n"
        + "536370,22733,CLOCK,24,2010-12-01T08:45:00+05:00,3.75,12583,France\n",
    )
    loaded = read_events(path, "online-retail")
    assert [e.item_id for e in loaded.events] == ["22728"]
    assert loaded.skipped["invalid_quantity"] == 1
    assert loaded.skipped["invalid_number"] == 2
    assert loaded.skipped["timestamp_too_old"] == 1
    assert loaded.skipped["invalid_timestamp"] == 1


def test_jsonl_rows_skipped_with_worker_reasons(tmp_path: Path) -> None:
    head = '{"event_id":"e1","type":"view","user_id":"u1","item_id":"i1","timestamp":1700000000000'
    lines = [
        head + "}",
        head + ',"price":1e400}',
        head + ',"price":NaN}',
        head + ',"title":"caf\\udce9"}',
        "[1, 2]",
        head,
    ]
    path = _write(tmp_path / "events.jsonl", "\n".join(lines) + "\n")
    loaded = read_events(path, "jsonl")
    assert len(loaded.events) == 1
    assert loaded.skipped["not_finite"] == 2
    assert loaded.skipped["lone_surrogate"] == 1
    assert loaded.skipped["not_object"] == 1
    assert loaded.skipped["not_json"] == 1


def test_all_rows_skipped_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "wrong.jsonl", TAOBAO_HEADER + "1,2,3,pv,1511544070\n")
    with pytest.raises(SourceError, match=r"none of the 2 rows .* not_json 2"):
        read_events(path, "jsonl")


@pytest.mark.parametrize(
    ("name", "text", "fmt"),
    [
        ("empty.jsonl", "", "jsonl"),
        ("header.csv", TAOBAO_HEADER, "taobao"),
        ("blank.jsonl", "\n\n", "jsonl"),
    ],
)
def test_file_without_rows_is_an_error(tmp_path: Path, name: str, text: str, fmt: str) -> None:
    path = _write(tmp_path / name, text)
    with pytest.raises(SourceError, match=f"{name} has no rows"):
        read_events(path, fmt)


def test_event_id_is_start_line_after_quoted_newline(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "multi.csv",
        RETAIL_HEADER
        + '536370,22728,"CLOCK\nPINK",24,2010-12-01 08:45:00,3.75,12583,France\n'
        + "536370,22729,CLOCK,24,2010-12-01 08:45:00,3.75,12583,France\n",
    )
    events = read_events(path, "online-retail").events
    assert [e.event_id.rsplit(":", 1)[0] for e in events] == ["multi.csv:2", "multi.csv:4"]


def test_same_named_exports_get_distinct_ids(tmp_path: Path) -> None:
    first = _write(tmp_path / "day1" / "events.csv", TAOBAO_HEADER + "1,10,100,pv,1511658000\n")
    second = _write(tmp_path / "day2" / "events.csv", TAOBAO_HEADER + "2,11,100,pv,1511744400\n")

    ids_first = [e.event_id for e in read_events(first, "taobao").events]
    ids_second = [e.event_id for e in read_events(second, "taobao").events]

    assert ids_first != ids_second
    assert ids_first == [e.event_id for e in read_events(first, "taobao").events]


@pytest.mark.parametrize(
    ("fmt", "header", "row"),
    [
        ("taobao", TAOBAO_HEADER, "1,2,3,pv,1511544070"),
        ("online-retail", RETAIL_HEADER, "536370,22728,CLOCK,24,2010-12-01 08:45:00,3.75,12583,UK"),
        ("diginetica", "session_id;user_id;item_id;timeframe;eventdate\n", "1;NA;2;100;2016-05-09"),
    ],
    ids=["taobao", "online-retail", "diginetica"],
)
def test_blank_lines_not_rows(tmp_path: Path, fmt: str, header: str, row: str) -> None:
    path = tmp_path / "blank.csv"
    path.write_bytes((header + "\r\n" + row + "\r\n\r\n" + row + "\n\n\n").encode())
    loaded = read_events(path, fmt)
    assert len(loaded.events) == 2
    assert loaded.rows_read == 2
    assert loaded.skipped == {}


def test_skipped_rows_kept_with_line_and_value(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "retail.csv",
        RETAIL_HEADER
        + "536370,22728,CLOCK,24,2010-12-01 08:45:00,3.75,12583,France\n"
        + "536370,POST,POSTAGE,1,2010-12-01 08:45:00,18.0,12583,France\n"
        + "536370,22729,CLOCK,two,2010-12-01 08:45:00,3.75,12583,France\n"
        + "536370,22730,CLOCK,2,2010-12-01 08:45:00,free,12583,France\n"
        + "536370,22731,CLOCK,-3,2010-12-01 08:45:00,3.75,12583,France\n"
        + "536370,22732,CLOCK,1,1 Dec 2010,3.75,12583,France\n"
        + "536370,22733,CLOCK,1,2010-12-01 08:45:00,3.75,,France\n",
    )
    loaded = read_events(path, "online-retail")
    details = {
        reason: [(rejection.line, rejection.detail) for rejection in rejections]
        for reason, rejections in loaded.examples.items()
    }
    assert details["non_product_code"][0][0] == 3
    assert "StockCode 'POST'" in details["non_product_code"][0][1]
    assert [line for line, _ in details["invalid_number"]] == [4, 5]
    assert "Quantity 'two'" in details["invalid_number"][0][1]
    assert "UnitPrice 'free'" in details["invalid_number"][1][1]
    assert "Quantity '-3'" in details["non_positive_quantity"][0][1]
    assert "InvoiceDate '1 Dec 2010'" in details["invalid_timestamp"][0][1]
    assert details["missing_customer"][0][0] == 8
    assert loaded.summary()["skipped_examples"]["missing_customer"][0]["line"] == 8


def test_skipped_examples_capped_per_reason(tmp_path: Path) -> None:
    rows = ["1,2,3,pv,1511544070"] + ["1,2,3,wish,1511544070"] * (EXAMPLES_PER_REASON + 5)
    path = _write(tmp_path / "many.csv", TAOBAO_HEADER + "\n".join(rows) + "\n")
    loaded = read_events(path, "taobao")
    examples = loaded.examples["unknown_behavior_type"]
    assert loaded.skipped["unknown_behavior_type"] == EXAMPLES_PER_REASON + 5
    assert [rejection.line for rejection in examples] == list(range(3, 3 + EXAMPLES_PER_REASON))


def test_jsonl_skipped_row_keeps_worker_detail(tmp_path: Path) -> None:
    head = '{"event_id":"e1","type":"view","user_id":"u1","item_id":"i1","timestamp":1700000000000'
    path = tmp_path / "events.jsonl"
    path.write_bytes((head + "}\n\n" + head + ',"price":-2}\n').encode() + b"\xff\n")
    loaded = read_events(path, "jsonl")
    price = loaded.examples["negative_price"][0]
    assert price.line == 3
    assert "price -2" in price.detail
    assert loaded.examples["not_utf8"][0].line == 4
    assert "b'\\xff'" in loaded.examples["not_utf8"][0].detail


def test_no_valid_row_error_names_first_rejection(tmp_path: Path) -> None:
    path = _write(tmp_path / "wrong.csv", TAOBAO_HEADER + "1,2,3,like,1511544070\n")
    with pytest.raises(SourceError, match=r"first: line 2: behavior_type 'like' is unknown"):
        read_events(path, "taobao")


def test_no_valid_row_error_names_earliest_line(tmp_path: Path) -> None:
    # A refund left out has no line of its own in its rejection, yet the
    # row on line 2 was skipped before it.
    path = _write(
        tmp_path / "retail.csv",
        RETAIL_HEADER
        + "536380,22728,ALARM CLOCK PINK,4,2010-12-01 09:00:00,3.75,,France\n"
        + "C536381,22728,ALARM CLOCK PINK,-1,2010-12-01 10:00:00,3.75,12583,France\n",
    )
    with pytest.raises(SourceError, match=r"first: line 2: CustomerID is empty"):
        read_events(path, "online-retail", refunds=False)


def test_taobao_ids_stripped_and_odd_digits_rejected(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "taobao.csv",
        "user_id,item_id,category_id,behavior_type,timestamp\n"
        " 1,100 , 7,pv,1511544070\n"
        "1,101,7,pv,1_511_544_071\n"
        "1,102,7,pv,\u0661\u0665\u0661\u0661\u0665\u0664\u0664\u0660\u0667\u0662\n",
    )

    result = read_events(path, "taobao")

    assert [(e.user_id, e.item_id, e.category) for e in result.events] == [("1", "100", "7")]
    assert result.skipped == {"invalid_timestamp": 2}


def test_quoted_taobao_fields_unquoted(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "quoted.csv",
        '"user_id","item_id","category_id","behavior_type","timestamp"\n'
        '"1","10","5","pv","1511544070"\n'
        '2,"a""b",5,buy,1511544071\n'
        '3,"11,5,pv,1511544072\n',
    )
    loaded = read_events(path, "taobao")
    assert [(e.user_id, e.item_id, e.category) for e in loaded.events] == [
        ("1", "10", "5"),
        ("2", 'a"b', "5"),
        ("3", '"11', "5"),
    ]


def test_quoted_diginetica_fields_unquoted(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "views.csv",
        '"sessionId";"userId";"itemId";"timeframe";"eventdate"\n"1";"NA";"2";"100";"2016-05-09"\n',
    )
    [event] = read_events(path, "diginetica").events
    assert (event.user_id, event.item_id, event.session_id) == ("session-1", "2", "1")


TAOBAO_ROWS = TAOBAO_HEADER + "".join(f"{n % 3},{n % 5},7,pv,{1511544070 + n}\n" for n in range(30))


@pytest.mark.parametrize("name", ["export.csv", "export.CSV.GZ", "export.csv.gz"])
def test_gzip_detected_by_content(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(gzip.compress(TAOBAO_ROWS.encode()))

    assert len(read_events(path, "taobao").events) == 30


def test_plain_file_named_gz(tmp_path: Path) -> None:
    path = tmp_path / "mislabelled.csv.gz"
    path.write_text(TAOBAO_ROWS, encoding="utf-8")

    assert len(read_events(path, "taobao").events) == 30


def test_latin1_file_name_event_ids(tmp_path: Path) -> None:
    # A Latin-1 file name reaches Python with a lone surrogate for "ä".
    path = os.fsdecode(os.fsencode(tmp_path) + b"/k\xe4ufe.csv")
    Path(path).write_text(TAOBAO_ROWS, encoding="utf-8")

    events = read_events(path, "taobao").events

    assert events[0].event_id.startswith("k\\xe4ufe.csv:2:")
    for event in events:
        orjson.dumps(event.to_json())


def test_latin1_header_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes(
        b"user_id,item_id,kategorie_\xe4,behavior_type,timestamp\n1,2,3,pv,1511544070\n"
    )

    with pytest.raises(SourceError, match=r"kategorie_\\xe4") as caught:
        read_events(path, "taobao")

    orjson.dumps(str(caught.value))


def test_read_from_pipe(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    os.write(write_fd, gzip.compress(TAOBAO_ROWS.encode()))
    os.close(write_fd)
    try:
        events = read_events(f"/dev/fd/{read_fd}", "taobao").events
    finally:
        os.close(read_fd)

    assert len(events) == 30


def test_taobao_comma_space_separators(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "spaced.csv",
        "user_id, item_id, category_id, behavior_type, timestamp\n"
        "1, 2, 3, pv, 1511544070\n"
        "1, 3, 3, buy, 1511544071\n",
    )

    events = read_events(path, "taobao").events

    assert [(event.type, event.item_id) for event in events] == [("view", "2"), ("purchase", "3")]


def _write_first_byte_alone(fifo: Path, data: bytes) -> None:
    with open(fifo, "wb", buffering=0) as pipe:
        pipe.write(data[:1])
        time.sleep(0.3)
        pipe.write(data[1:])


def test_gzip_pipe_first_byte_alone(tmp_path: Path) -> None:
    fifo = tmp_path / "events"
    os.mkfifo(fifo)
    data = gzip.compress(TAOBAO_ROWS.encode())
    writer = threading.Thread(target=_write_first_byte_alone, args=(fifo, data))
    writer.start()
    try:
        loaded = read_events(fifo, "taobao")
    finally:
        writer.join(5)

    assert loaded.rows_read == 30
    assert len(loaded.events) == 30
