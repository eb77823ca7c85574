"""Argument and connection errors of the ``fusionrec`` commands."""

from __future__ import annotations

import socket

import pytest

from stream.cli import main


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_topics_create_without_broker(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("FUSIONREC_KAFKA_BOOTSTRAP", address)
    assert main(["topics", "--create"]) == 1
    err = capsys.readouterr().err
    assert f"cannot create the topics on Kafka at {address}" in err
    assert "Traceback" not in err
