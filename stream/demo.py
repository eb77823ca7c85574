"""Run the main job end to end on a file, against the running Kafka and Redis.

``python -m stream.demo`` generates the built-in synthetic sample (or takes a
file with ``--path`` and ``--format``), creates topics under a prefix of its
own, starts a worker process, replays the file through Kafka, waits until
every user of the file has a list in Redis, prints a few lists, stops the
worker with SIGTERM and deletes its topics and lists again.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import orjson
from aiokafka.admin import AIOKafkaAdminClient

from schemas import RecommendationList, validator
from stream.kafka import client_options
from stream.logs import configure_logging
from stream.runner import WorkerProcess, free_port, settings_env, wait_for_lists
from stream.settings import Settings
from stream.sink import redis_client
from stream.sources import FORMATS, read_events
from stream.topics import ALL_TOPICS, create_topics

logger = logging.getLogger("stream.demo")

SAMPLE_EVENTS = 60_000
SAMPLE_USERS = 3_000
SAMPLE_ITEMS = 2_000


def _sample(folder: Path) -> Path:
    from stream.synthetic import generate_events, write_jsonl

    path = folder / "sample.jsonl"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        count = write_jsonl(
            path, generate_events(SAMPLE_EVENTS, SAMPLE_USERS, SAMPLE_ITEMS, seed=7)
        )
        logger.info("generated the built-in sample: %d events in %s", count, path)
    return path


async def _delete_run(settings: Settings) -> None:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, **client_options(settings)
    )
    await admin.start()
    try:
        await admin.delete_topics([settings.topic(name) for name in ALL_TOPICS])
    finally:
        await admin.close()
    client = redis_client(settings)
    try:
        keys = [key async for key in client.scan_iter(f"{settings.redis_key_prefix}*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
    finally:
        await client.aclose()


def run(path: Path, fmt: str, *, show: int, timeout_s: float, keep: bool) -> int:
    """Run the job on ``path``; return 0 when every user got a valid list."""
    base = Settings.from_env()
    run_id = f"demo-{int(time.time())}"
    settings = replace(
        base,
        app_id=f"fusionrec-{run_id}",
        topic_prefix=f"{run_id}.",
        redis_key_prefix=f"{run_id}:recs:",
        data_dir=str(Path(base.data_dir) / run_id),
        web_port=free_port(),
        checkpoint_interval_s=10.0,
    )
    users = sorted({event.user_id for event in read_events(path, fmt).events})
    logger.info("%s holds events of %d users", path.name, len(users))

    asyncio.run(create_topics(settings))
    log_path = Path(settings.data_dir) / "worker.log"
    worker = WorkerProcess(settings, log_path).start()
    started = time.monotonic()
    try:
        worker.wait_ready()
        logger.info("worker ready (log: %s); replaying %s", log_path, path)
        replay = subprocess.run(
            [sys.executable, "-m", "stream.cli", "replay", str(path), "--format", fmt],
            env={**os.environ, **settings_env(settings)},
            check=False,
        )
        if replay.returncode != 0:
            logger.error("replay failed with exit code %d", replay.returncode)
            return 1
        lists = asyncio.run(wait_for_lists(settings, users, timeout_s))
        elapsed = time.monotonic() - started
        check = validator("recommendations.schema.json")
        invalid = [user for user, value in lists.items() if not check.is_valid(value)]
        print(
            f"\n{len(lists)} of {len(users)} users have a list in Redis "
            f"({len(invalid)} invalid) after {elapsed:.1f} s\n"
        )
        for user in users[:show]:
            value = RecommendationList.from_json(orjson.dumps(lists[user]))
            print(f"recs for user {user!r} (key {settings.redis_key_prefix}user:{user}):")
            for rank, entry in enumerate(value.items[:5], start=1):
                sources = ",".join(entry.sources)
                print(f"  {rank:>2}. {entry.item_id:<12} {entry.score:8.4f}  {sources}")
            print()
        return 0 if not invalid else 1
    finally:
        code = worker.terminate()
        logger.info("worker stopped with exit code %d", code)
        if not keep:
            asyncio.run(_delete_run(settings))


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the demo."""
    parser = argparse.ArgumentParser(prog="python -m stream.demo", description=__doc__)
    parser.add_argument("--path", type=Path, help="file to replay (default: the built-in sample)")
    parser.add_argument("--format", choices=FORMATS, default="jsonl", help="format of --path")
    parser.add_argument("--show", type=int, default=3, help="lists to print")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for lists")
    parser.add_argument("--keep", action="store_true", help="keep the run's topics and lists")
    args = parser.parse_args(argv)
    configure_logging("info")
    base = Settings.from_env()
    path = args.path or _sample(Path(base.data_dir) / "sample")
    return run(path, args.format, show=args.show, timeout_s=args.timeout, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
