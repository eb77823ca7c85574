"""The worker's refresh loop, driven without Kafka or Redis."""

from __future__ import annotations

import asyncio

from stream.app import Worker
from stream.settings import Settings


def _worker(tmp_path) -> tuple[Worker, list[dict[str, str]]]:
    worker = Worker(Settings(data_dir=str(tmp_path)))
    refreshed: list[dict[str, str]] = []

    def refresh_some(limit: int | None = None) -> int:
        refreshed.append(dict(worker.dirty))
        worker.dirty.clear()
        return len(refreshed[-1])

    worker.refresh_some = refresh_some  # type: ignore[method-assign]
    return worker, refreshed


async def _run_briefly(worker: Worker) -> None:
    task = asyncio.create_task(worker.refresher())
    await asyncio.sleep(0.1)
    worker._stopping = True
    assert worker._refresh_wakeup is not None
    worker._refresh_wakeup.set()
    await asyncio.wait_for(task, timeout=5)


def test_refresher_serves_owed_lists_at_start(tmp_path):
    worker, refreshed = _worker(tmp_path)
    worker.dirty["pseudonym-1"] = "user-1"

    asyncio.run(_run_briefly(worker))

    assert refreshed == [{"pseudonym-1": "user-1"}]
