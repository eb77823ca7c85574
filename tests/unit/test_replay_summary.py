"""The terminal summary that ``fusionrec replay`` prints."""

from collections import Counter

from stream.replay import ReplaySummary


def _count_column(lines: list[str], names: list[str]) -> set[int]:
    columns = set()
    for name in names:
        (line,) = [line for line in lines if line.strip().startswith(name)]
        columns.add(line.rindex(" ") + 1)
    return columns


def test_counts_align_under_long_topic_names() -> None:
    summary = ReplaySummary(path="events.csv", fmt="taobao", dry_run=False)
    summary.by_topic = Counter(
        {
            "demo-1796490113.events.click": 6853,
            "demo-1796490113.events.purchase": 1750,
            "demo-1796490113.events.view": 75872,
        }
    )
    lines = summary.to_text().splitlines()
    assert len(_count_column(lines, list(summary.by_topic))) == 1
    assert "  demo-1796490113.events.purchase 1750" in lines


def test_counts_align_across_sections() -> None:
    summary = ReplaySummary(path="events.csv", fmt="taobao", dry_run=True)
    summary.by_topic = Counter({"events.click": 2, "events.view": 10})
    summary.skipped = Counter({"timestamp_in_future": 1, "invalid_behavior_type": 3})
    summary.failed = Counter({"KafkaTimeoutError": 1})
    lines = summary.to_text().splitlines()
    names = [*summary.by_topic, *summary.skipped, *summary.failed]
    assert len(_count_column(lines, names)) == 1
