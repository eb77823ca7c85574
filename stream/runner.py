"""Run a worker as a child process and wait for its effects in Redis.

The demo, the benchmark and the integration tests start real ``fusionrec
worker`` processes through this module, so they exercise the same entry point
that a deployment runs.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any, ClassVar

import orjson

from stream.settings import PREFIX, Settings
from stream.sink import redis_client

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def settings_env(settings: Settings) -> dict[str, str]:
    """Return ``FUSIONREC_*`` variables that reproduce ``settings`` in a child process."""
    env: dict[str, str] = {}
    for name, value in vars(settings).items():
        text = ("1" if value else "0") if isinstance(value, bool) else str(value)
        env[PREFIX + name.upper()] = text
    return env


class WorkerProcess:
    """A ``fusionrec worker`` child process with its own log file.

    Every started process is recorded in `WorkerProcess.running`, so that a
    test harness can stop the ones a failed test left behind.
    """

    running: ClassVar[set[WorkerProcess]] = set()

    def __init__(
        self, settings: Settings, log_path: Path, extra_env: Mapping[str, str] | None = None
    ) -> None:
        self.settings = settings
        self.log_path = log_path
        self.extra_env = dict(extra_env or {})
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> WorkerProcess:
        """Start the worker; return once its process runs (not once it is ready)."""
        env = {**os.environ, **settings_env(self.settings), **self.extra_env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stream.cli", "worker"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        WorkerProcess.running.add(self)
        return self

    @property
    def health_url(self) -> str:
        """URL of the worker's health endpoint."""
        return f"http://{self.settings.web_host}:{self.settings.web_port}/health"

    def health(self) -> dict[str, Any] | None:
        """Return the health report, or None while the endpoint is unreachable."""
        try:
            with urllib.request.urlopen(self.health_url, timeout=2.0) as response:  # noqa: S310
                report: dict[str, Any] = orjson.loads(response.read())
                return report
        except urllib.error.HTTPError as exc:
            report = orjson.loads(exc.read())
            return report
        except (OSError, ValueError):
            return None

    def metrics(self) -> str:
        """Return the Prometheus text of the worker's metrics endpoint."""
        url = f"http://{self.settings.web_host}:{self.settings.web_port}/metrics"
        with urllib.request.urlopen(url, timeout=5.0) as response:  # noqa: S310
            text: str = response.read().decode()
            return text

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Wait until the worker reports ready on /health, with every condition of readiness met."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            report = self.health()
            if report is not None and report.get("ready"):
                return
            time.sleep(0.2)
        msg = f"worker not ready after {timeout_s:.0f} s; see {self.log_path}"
        raise TimeoutError(msg)

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            msg = f"worker exited with code {self.process.returncode}; see {self.log_path}"
            raise RuntimeError(msg)

    def terminate(self, timeout_s: float = 60.0) -> int:
        """Send SIGTERM and wait for the exit code."""
        return self._signal(signal.SIGTERM, timeout_s)

    def kill(self) -> int:
        """Send SIGKILL, as a crash would, and wait for the process to end."""
        return self._signal(signal.SIGKILL, 30.0)

    def _signal(self, signum: int, timeout_s: float) -> int:
        if self.process is None:
            msg = "worker was never started"
            raise RuntimeError(msg)
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        WorkerProcess.running.discard(self)
        return code

    def log_text(self) -> str:
        """Return what the worker wrote to its log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.terminate()


async def wait_for_lists(
    settings: Settings,
    user_ids: Iterable[str],
    timeout_s: float = 120.0,
    *,
    since_ms: int = 0,
) -> dict[str, dict[str, Any]]:
    """Wait until every user has a list computed at or after ``since_ms``; return them.

    Raises `TimeoutError` naming how many users still lack a list.
    """
    users = list(dict.fromkeys(user_ids))
    client = redis_client(settings)
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    prefix = f"{settings.redis_key_prefix}user:"
    try:
        while True:
            missing = [u for u in users if u not in found]
            for start in range(0, len(missing), 1000):
                chunk = missing[start : start + 1000]
                values = await client.mget([prefix + u for u in chunk])
                for user, raw in zip(chunk, values, strict=True):
                    if raw is None:
                        continue
                    value = orjson.loads(raw)
                    if value["computed_at"] >= since_ms:
                        found[user] = value
            if len(found) == len(users):
                return found
            if time.monotonic() > deadline:
                msg = (
                    f"{len(users) - len(found)} of {len(users)} users have no list in Redis "
                    f"after {timeout_s:.0f} s"
                )
                raise TimeoutError(msg)
            await asyncio.sleep(0.5)
    finally:
        await client.aclose()


class RedisServer:
    """A redis-server on a free port of 127.0.0.1, without persistence."""

    def __init__(self, folder: Path, password: str | None = None) -> None:
        """Prepare a server in ``folder``; `start` runs it."""
        binary = shutil.which("redis-server")
        if binary is None:
            msg = "redis-server is not installed; scripts/services.sh installs it"
            raise FileNotFoundError(msg)
        self.binary = binary
        self.folder = folder
        self.password = password
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """URL of the server for redis-py."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start the server on its port and wait until it accepts connections."""
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.folder),
        ]
        if self.password:
            command += ["--requirepass", self.password]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        _wait_port(self.port, 10.0)
        return self

    def kill(self) -> None:
        """Stop the server at once, as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


class KafkaBroker:
    """A broker of its own, started by scripts/services.sh in a private folder."""

    def __init__(self, folder: Path) -> None:
        """Prepare a broker whose files live in ``folder``."""
        self.folder = folder
        self.port = free_port()
        self.controller_port = free_port()
        self.env = {
            **os.environ,
            "FUSIONREC_SERVICES_DIR": str(folder),
            "FUSIONREC_KAFKA_PORT": str(self.port),
            "FUSIONREC_KAFKA_CONTROLLER_PORT": str(self.controller_port),
        }

    @property
    def bootstrap(self) -> str:
        """Bootstrap address of the broker."""
        return f"127.0.0.1:{self.port}"

    def _services(self, action: str) -> None:
        subprocess.run(
            [str(REPO / "scripts" / "services.sh"), action, "kafka"],
            env=self.env,
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def start(self) -> KafkaBroker:
        """Start the broker (again) and wait until it is ready."""
        self._services("up")
        return self

    def stop(self) -> None:
        """Stop the broker and wait for its process to exit."""
        self._services("down")

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    msg = f"nothing listens on 127.0.0.1:{port} after {timeout_s} s"
    raise TimeoutError(msg)
