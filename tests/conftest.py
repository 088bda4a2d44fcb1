"""Shared fixtures: a real mosquitto broker on a free localhost port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

_BROKER_START_TIMEOUT_S = 10.0


def _find_mosquitto() -> str:
    """Path of the mosquitto binary; fails the test run if it is not installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    if os.access("/usr/sbin/mosquitto", os.X_OK):
        return "/usr/sbin/mosquitto"
    pytest.fail(
        "mosquitto is not installed; the tests need a real MQTT broker. "
        "Install it with `apt-get install mosquitto` (.ci/run does this).",
        pytrace=False,
    )


def _free_port() -> int:
    """A localhost TCP port that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _accepts(host: str, port: int) -> bool:
    """Whether a TCP connection to (host, port) succeeds."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def mosquitto_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """Start a private mosquitto on 127.0.0.1:<free port> for the session; yields (host, port)."""
    binary = _find_mosquitto()
    host, port = "127.0.0.1", _free_port()
    workdir: Path = tmp_path_factory.mktemp("mosquitto")
    config = workdir / "mosquitto.conf"
    config.write_text(f"listener {port} {host}\nallow_anonymous true\npersistence false\nlog_dest stderr\n")
    log_path = workdir / "mosquitto.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([binary, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + _BROKER_START_TIMEOUT_S
        while not _accepts(host, port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"mosquitto did not start on {host}:{port} (exit code {process.poll()}); "
                    f"log:\n{log_path.read_text(errors='replace')}",
                    pytrace=False,
                )
            time.sleep(0.05)
        yield host, port
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
