"""A local MQTT broker for simulations and tests: Mosquitto when installed, else amqtt in a thread.

The main job must run on a fresh machine with nothing but Python and `pip install`, so the
pure-Python amqtt broker (a desktop dependency) is the fallback; Mosquitto, when present, is
faster and is what the tests use. Both listen on 127.0.0.1 only. amqtt 0.12 does not queue
QoS 1 messages for an offline persistent session; fedge's tasks, models and weights are
retained, so a device that comes back still receives them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 10.0


class BrokerError(RuntimeError):
    """The broker could not be started."""


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary (Debian installs it in /usr/sbin, often not on PATH), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def accepts(host: str, port: int) -> bool:
    """Whether a TCP connection to (host, port) succeeds."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _raise_open_file_limit() -> None:
    """Let the broker hold one socket per device of a large fleet (the soft limit is often 1,024)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class EmbeddedBroker:
    """Start with `start()` (or `with`); `url` is then `mqtt://127.0.0.1:<port>`.

    `kind` is "auto" (Mosquitto if installed, else amqtt), "mosquitto" or "amqtt".
    """

    def __init__(self, kind: str = "auto", host: str = "127.0.0.1", port: int | None = None,
                 extra_config: str = "") -> None:
        if kind not in ("auto", "mosquitto", "amqtt"):
            raise ValueError(f"broker kind must be auto, mosquitto or amqtt, got {kind!r}")
        self.host, self.port = host, port or free_port(host)
        self._binary = find_mosquitto() if kind in ("auto", "mosquitto") else None
        if kind == "mosquitto" and self._binary is None:
            raise BrokerError("mosquitto is not installed (Debian: apt-get install mosquitto)")
        self.kind = "mosquitto" if self._binary else "amqtt"
        self._extra_config = extra_config
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._amqtt: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The Mosquitto process id (None for amqtt, which runs in this process, or when stopped)."""
        return None if self._process is None else self._process.pid

    def start(self) -> "EmbeddedBroker":
        """Start the broker and wait until it accepts connections."""
        if self.kind == "amqtt":
            self._start_amqtt()  # returns once amqtt listens; a probe connection would only make it log noise
            return self
        self._start_mosquitto()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not accepts(self.host, self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                log = self.log_text()
                self.stop()
                raise BrokerError(f"{self.kind} did not start on {self.host}:{self.port}; log:\n{log}")
            time.sleep(0.05)
        return self

    def _start_mosquitto(self) -> None:
        self._workdir = tempfile.TemporaryDirectory(prefix="fedge-mosquitto-")
        workdir = Path(self._workdir.name)
        config = workdir / "mosquitto.conf"
        config.write_text(f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n"
                          f"log_dest stderr\n{self._extra_config}")
        with open(workdir / "mosquitto.log", "wb") as log:
            self._process = subprocess.Popen([self._binary, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                             preexec_fn=_raise_open_file_limit)

    def _start_amqtt(self) -> None:
        try:
            from amqtt.broker import Broker
        except ImportError as error:
            raise BrokerError("neither mosquitto nor the amqtt package is installed: install fedge[desktop] "
                              "or Debian's mosquitto, or give an external broker") from error
        self._loop = asyncio.new_event_loop()
        self._amqtt = Broker({"listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                              "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}},
                             loop=self._loop)
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._amqtt.start())
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fedge-amqtt-broker", daemon=True)
        self._thread.start()
        if not started.wait(START_TIMEOUT_S):
            raise BrokerError(f"amqtt did not start on {self.host}:{self.port}")

    def log_text(self) -> str:
        """Mosquitto's log so far (empty for amqtt, which logs through `logging`)."""
        if self._workdir is None:
            return ""
        path = Path(self._workdir.name) / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Stop the broker (idempotent)."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._loop is not None and self._thread is not None:
            logging.getLogger("amqtt").setLevel(logging.CRITICAL)  # its shutdown logs cancelled tasks as errors
            asyncio.run_coroutine_threadsafe(self._amqtt.shutdown(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop = self._thread = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
