"""The MQTT executor: a round's client work done by devices (real or simulated) over a broker.

It implements fedge.learning's Executor, so any learning process runs over MQTT unchanged:
`process.next(state, device_ids)` publishes the model (retained, once per hash), the round's
global weights (retained) and the task naming the selected devices, then yields each update
the ReportGate accepts, as it arrives, until `goal` reports are in or the deadline passes.
A round with fewer than `min_reports` accepted updates raises RoundFailedError (the process
keeps its weights). With `use_journal` every update is on disk before its PUBACK and a killed
run's updates are replayed into the next round (fedge.server.journal). docs/protocol.md
specifies the messages; docs/server.md the rounds.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import queue
import secrets
import threading
import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from device_runtime.artifact import Artifact
from device_runtime.connection import BrokerSettings, MqttConnection
from device_runtime.protocol import (
    ProtocolError,
    RoundConfig,
    Task,
    check_id,
    encode_task,
    encode_weights,
    model_topic,
    payload_hash,
    status_wildcard,
    task_topic,
    update_wildcard,
    weights_topic,
)
from device_runtime.manifest import Manifest
from device_runtime.signing import Ed25519PrivateKey, sign_task
from fedge.learning.executors import ClientUpdate, FleetExecutor, RoundFailedError, RoundInterruptedError, round_seed
from fedge.server.checkin import DeviceRegistry
from fedge.server.journal import Message, UpdateJournal
from fedge.server.reports import ReportGate, RoundWindow
from fedge.server.selection import over_selected, select_devices

logger = logging.getLogger(__name__)

_POLL_S = 0.2  # how often a waiting round looks at the stop flag


class MqttExecutor(FleetExecutor):
    """Client work over MQTT: `federated_data` is the list of selected device ids; updates arrive as devices report.

    `clients_per_round` is the goal K (None: every selected device); `select` picks
    ceil(over_selection * K) available devices; the first K accepted updates close the round,
    else the deadline (`deadline_s` after the task) does, and fewer than `min_reports` fails it.
    How devices train and encode their updates is the round's ClientWork (the process's), sent in the task.
    """

    def __init__(self, broker: str | BrokerSettings, fleet: str, *, clients_per_round: int | None = None,
                 min_reports: int = 1, deadline_s: float = 60.0, over_selection: float = 1.3,
                 signing_key: Ed25519PrivateKey | None = None, run_id: str | None = None,
                 connect_timeout_s: float = 30.0, publish_timeout_s: float = 30.0,
                 selection_grace_s: float = 2.0) -> None:
        """Check the settings; nothing touches the network before start() (or the first round).

        `broker` is a URL or a BrokerSettings with credentials and TLS files. With `signing_key` every
        task is signed (device_runtime.signing); it binds the model and weights by hash. `run_id` names
        the job in its tasks (default: a fresh random id); devices train each (run_id, round) once.
        FederatedServer replaces it with the id kept in its checkpoint folder when it resumes a job.
        A fleet too small for over-selection's margin (busy devices counted) but large enough for the goal starts its
        rounds once no device has come or gone for `selection_grace_s` seconds, instead of after the whole check-in
        wait."""
        broker = BrokerSettings(broker) if isinstance(broker, str) else broker
        self.fleet = check_id(fleet, "fleet")
        if clients_per_round is not None:
            _check_int("clients_per_round", clients_per_round, 1)
        _check_int("min_reports", min_reports, 1)
        if clients_per_round is not None and min_reports > clients_per_round:
            raise ValueError(f"min_reports ({min_reports}) cannot exceed clients_per_round ({clients_per_round})")
        _check_number("deadline_s", deadline_s, 0.0, low_open=True)
        _check_number("over_selection", over_selection, 1.0)
        _check_number("selection_grace_s", selection_grace_s, 0.0)
        self.clients_per_round, self.min_reports = clients_per_round, min_reports
        self.deadline_s, self.over_selection = float(deadline_s), float(over_selection)
        self.selection_grace_s = float(selection_grace_s)
        self._said_fleet_is_short = False
        self.publish_timeout_s, self.connect_timeout_s = publish_timeout_s, connect_timeout_s
        self._signing_key = signing_key
        self.run_id = secrets.token_hex(8) if run_id is None else check_id(run_id, "run_id")
        self.registry = DeviceRegistry()
        self._gate = ReportGate(self.fleet, self.registry.known)
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._journal: UpdateJournal | None = None
        self._replay: Iterator[Message] | None = None
        self._retained: dict[str, bytes] = {}  # what the open round needs on the broker: republished on reconnect
        self._retained_lock = threading.Lock()
        self._published_models: set[str] = set()
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._subscription: int | None = None
        self._started = False
        self._connection = MqttConnection(
            broker.address, f"fedge-server-{self.fleet}",
            will=(task_topic(self.fleet), b""),  # a server gone without closing clears its task
            on_connect=self._on_connect, on_message=self._on_message, on_subscribed=self._on_subscribed,
            username=broker.username, password=broker.password, tls_files=broker.tls)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect (persistent session) and subscribe to statuses and updates; ConnectionError after the timeout."""
        if self._started:
            return
        self._started = True
        self._connection.start()
        if not self._subscribed.wait(self.connect_timeout_s):
            raise ConnectionError(f"no connection to the broker at {self._connection.broker.host}:"
                                  f"{self._connection.broker.port} within {self.connect_timeout_s:.0f} s")

    def use_journal(self, path: str | os.PathLike[str]) -> None:
        """Journal every update to `path` before acknowledging it, and replay what a killed run left there first.

        Call it before start(): updates received earlier are not journaled (fedge.server.journal).
        """
        if self._journal is not None:
            self._journal.close()
        self._journal = UpdateJournal(path)
        self._replay = self._journal.replay()

    def checkpointed(self) -> None:
        """The round just ended is checkpointed: its journaled updates are no longer needed."""
        if self._journal is not None:
            self._journal.clear()

    def interrupt(self) -> None:
        """Stop for good, soon: the round in progress raises RoundInterruptedError, waits for devices return."""
        self._stop.set()

    def close(self) -> None:
        """Clear the retained task (no device should start a round of a stopped server) and disconnect, for good."""
        self._stop.set()
        if self._started:
            self._connection.close(final=(task_topic(self.fleet), b""))
            self._started = False
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    # -- check-in and selection -------------------------------------------------------------------

    def wait_for_devices(self, timeout: float) -> list[str]:
        """The available devices once enough to over-select are checked in; or, in a fleet too small to over-select
        even when its busy devices are back, once enough for the goal are and none has come or gone for the
        selection grace (said once in the log); or what is available at `timeout`."""
        self.start()
        goal = max(self.clients_per_round or 1, self.min_reports)
        wanted = max(goal, over_selected(goal, self.over_selection) if self.clients_per_round else 1)
        available = self.registry.wait_for(wanted, timeout, self._stop, enough=goal, settle=self.selection_grace_s)
        if goal <= len(available) < wanted and not self._said_fleet_is_short:
            self._said_fleet_is_short = True
            logger.info("%d devices available where over-selection asks for %d: rounds start with the available "
                        "ones once none has come or gone for %.1f s", len(available), wanted, self.selection_grace_s)
        return available

    def select(self, seed: int | None, round_num: int) -> list[str]:
        """ceil(over_selection * clients_per_round) available devices drawn with the round's seed (all, without a goal)."""
        available = self.registry.available()
        if self.clients_per_round is None:
            return available
        draw = round_seed(seed, round_num)
        return select_devices(available, self.clients_per_round, self.over_selection,
                              secrets.randbits(63) if draw is None else draw)

    # -- Executor -------------------------------------------------------------------------------

    def prepare(self, federated_data: Iterable[Any], manifest: Manifest) -> list[str]:
        """The selected device ids, checked: valid topic levels, no repeats, at least min_reports of them."""
        if isinstance(federated_data, (str, bytes)) or not isinstance(federated_data, Iterable):
            raise TypeError(f"over MQTT, federated_data is a list of device ids, got {type(federated_data).__name__}")
        devices = list(federated_data)
        for index, device in enumerate(devices):
            if not isinstance(device, str):
                raise TypeError(f"federated_data[{index}]: over MQTT a client is a device id (str), "
                                f"got {type(device).__name__}")
            try:
                check_id(device, f"federated_data[{index}]")
            except ProtocolError as error:
                raise ValueError(str(error)) from None
        if len(set(devices)) != len(devices):
            raise ValueError("federated_data names a device more than once")
        if len(devices) < self.min_reports:
            raise ValueError(f"{len(devices)} selected devices cannot give min_reports={self.min_reports} reports")
        return devices

    def train(self, artifact: Artifact, weights: Sequence[np.ndarray], clients: Sequence[str],
              config: RoundConfig) -> Generator[ClientUpdate, None, dict[str, Any]]:
        """Configure the round on the broker, then yield accepted updates as they arrive; returns the round report."""
        manifest = artifact.manifest
        self.start()
        started = time.time()
        weights_payload = encode_weights(self.fleet, config.round, manifest.content_hash, list(weights),
                                         manifest.metrics.variables, run_id=self.run_id)
        goal = len(clients) if self.clients_per_round is None else min(self.clients_per_round, len(clients))
        if config.seed is None:  # devices always shuffle: a round without a seed gets a random one
            config = dataclasses.replace(config, seed=secrets.randbits(63))
        task = Task(self.run_id, config, manifest.content_hash, payload_hash(weights_payload),
                    deadline=started + self.deadline_s, selected=tuple(sorted(clients)))
        task_payload = encode_task(task)
        if self._signing_key is not None:
            task_payload = sign_task(self._signing_key, task_topic(self.fleet), task_payload)
        window = RoundWindow(self.run_id, config.round, frozenset(clients), task.deadline, goal, manifest)
        self._gate.open(window)
        bytes_published = self._configure(artifact, weights_payload, task_payload)
        configured = time.time()
        logger.info("round %d: task published: %d devices selected, goal %d, at least %d, deadline in %.1f s",
                    config.round, len(clients), goal, self.min_reports, task.deadline - configured)
        closed_by = yield from self._reports(window, len(weights_payload))
        self._publish_retained(task_topic(self.fleet), b"")  # devices that have not started need not start
        report = {"outcome": "completed" if window.accepted >= self.min_reports else "failed",
                  "closed_by": closed_by, "selected": len(clients), "goal": goal, "min_reports": self.min_reports,
                  "accepted": window.accepted,
                  "dropped": dict(sorted((reason.value, count) for reason, count in window.dropped.items())),
                  "bytes_published": bytes_published, "configure_seconds": configured - started,
                  "reporting_seconds": time.time() - configured}
        logger.info("round %d: closed by %s with %d of %d selected devices reporting (goal %d); dropped %s",
                    config.round, closed_by, window.accepted, len(clients), goal, report["dropped"] or "none")
        if window.accepted < self.min_reports:
            raise RoundFailedError(f"{window.accepted} accepted updates by the deadline, fewer than min_reports="
                                   f"{self.min_reports}", report)
        return report

    def evaluate(self, artifact: Artifact, weights: Sequence[np.ndarray],
                 clients: Sequence[str]) -> Iterator[dict[str, float]]:
        """Not available: protocol version 2 has no evaluation task (evaluate in-process on held-out data)."""
        raise NotImplementedError("protocol version 2 has no evaluation task; evaluate held-out data in-process "
                                  "(fedge.learning.FederatedEvaluation with an InProcessExecutor)")

    # -- one round --------------------------------------------------------------------------------

    def _configure(self, artifact: Artifact, weights_payload: bytes, task_payload: bytes) -> int:
        """Publish model (once per hash), global weights and task, retained and in that order; the bytes sent."""
        model_hash, model_bytes = artifact.content_hash, artifact.tflite_bytes
        sent = 0
        with self._retained_lock:
            self._retained.clear()
        if model_hash not in self._published_models:
            self._publish_retained(model_topic(self.fleet, model_hash), model_bytes)
            self._published_models.add(model_hash)
            sent += len(model_bytes)
        else:
            with self._retained_lock:
                self._retained[model_topic(self.fleet, model_hash)] = model_bytes
        self._publish_retained(weights_topic(self.fleet), weights_payload)
        self._publish_retained(task_topic(self.fleet), task_payload)
        return sent + len(weights_payload) + len(task_payload)

    def _reports(self, window: RoundWindow, weights_bytes: int) -> Generator[ClientUpdate, None, str]:
        """Yield accepted updates until the goal or the deadline; returns what closed the round."""
        for message in self._replayed():  # a killed run's journal: these arrived before anything queued now
            if window.accepted >= window.goal:
                break
            update = self._accept(message, weights_bytes)
            if update is not None:
                yield update
        while window.accepted < window.goal:
            if self._stop.is_set():
                self._gate.close("interrupted")
                raise RoundInterruptedError(f"round {window.round} interrupted: the server is stopping")
            left = window.deadline - time.time()
            if left <= 0:  # updates that arrived in time but are still queued count; later ones are late
                for _ in range(self._inbox.qsize()):
                    if window.accepted >= window.goal:
                        break
                    update = self._accept(self._inbox.get_nowait(), weights_bytes)
                    if update is not None:
                        yield update
                break
            try:
                item = self._inbox.get(timeout=min(_POLL_S, left))
            except queue.Empty:
                continue
            update = self._accept(item, weights_bytes)
            if update is not None:
                yield update
        closed_by = "goal" if window.accepted >= window.goal else "deadline"
        self._gate.close(closed_by)
        return closed_by

    def _replayed(self) -> Iterator[Message]:
        """The journaled messages of a killed run, once (the first round after use_journal gets them)."""
        replay, self._replay = self._replay, None
        return replay if replay is not None else iter(())

    def _accept(self, item: Message, weights_bytes: int) -> ClientUpdate | None:
        """The ClientUpdate of an inbox message the gate accepts, else None (the gate counted the drop)."""
        topic, payload, received_at = item
        update = self._gate.check(topic, payload, received_at)
        if update is None:
            return None
        self.registry.mark_idle(update.device_id)
        return ClientUpdate(update.tensors, update.num_examples, update.metrics, weights_bytes, len(payload))

    def _publish_retained(self, topic: str, payload: bytes) -> None:
        """Publish a retained QoS 1 message and wait (bounded) for the broker's PUBACK."""
        with self._retained_lock:
            if payload:
                self._retained[topic] = payload
            else:
                self._retained.pop(topic, None)
        mid = self._connection.publish(topic, payload, qos=1, retain=True)
        if not self._connection.wait_for_ack(mid, self.publish_timeout_s, self._stop) and not self._stop.is_set():
            logger.warning("no PUBACK for %s within %.0f s; it is resent after a reconnect", topic,
                           self.publish_timeout_s)

    # -- paho's network thread: must not block ------------------------------------------------------

    def _on_connect(self) -> None:
        """(Re)subscribe, and republish the open round's retained messages (a restarted broker may have lost them)."""
        self._subscribed.clear()
        self._subscription = self._connection.subscribe([status_wildcard(self.fleet), update_wildcard(self.fleet)])
        with self._retained_lock:
            retained = list(self._retained.items())
        for topic, payload in retained:
            self._connection.publish(topic, payload, qos=1, retain=True)

    def _on_subscribed(self, mid: int) -> None:
        """Note that the broker acknowledged the subscription."""
        if mid == self._subscription:
            self._subscribed.set()

    def _on_message(self, topic: str, payload: bytes) -> None:
        """Statuses go to the registry; updates are queued with their arrival time for the round in progress."""
        kind = topic.split("/")[2] if topic.count("/") == 3 else None
        if kind == "update":
            message = (topic, payload, time.time())
            if self._journal is not None:  # on disk before paho sends the PUBACK (after this returns)
                try:
                    self._journal.append(message)
                except OSError as error:
                    logger.error("could not journal an update from %s: %s; a crash now would lose it", topic, error)
            self._inbox.put(message)
        elif kind == "status":
            self.registry.on_status(topic.rsplit("/", 1)[1], payload)


def _check_int(name: str, value: Any, minimum: int) -> None:
    """ValueError unless `value` is an int >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False) -> None:
    """ValueError unless `value` is a finite number in [low, high] ((low, high] when `low_open`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or (low_open and value == low) or value > high:
        raise ValueError(f"{name} must be a finite number in {'(' if low_open else '['}{low}, {high}], got {value!r}")
