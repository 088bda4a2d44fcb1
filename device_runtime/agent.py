"""The MQTT device agent: receives round tasks, fetches and caches the model, trains locally, publishes updates."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from device_runtime.artifact import ArtifactError
from device_runtime.connection import MqttConnection, TlsFiles, parse_broker_url
from device_runtime.data import load_local_data
from device_runtime.model import TrainableModel
from device_runtime.model_cache import ModelCache, default_cache_dir
from device_runtime.protocol import ProtocolError, Task, encode_status
from device_runtime.protocol.topics import status_topic, task_topic, update_topic
from device_runtime.rounds import DeviceRound, Fetch, round_key, skip_reason, supersedes, task_to_train
from device_runtime.signing import Ed25519PublicKey, TaskVerifier

logger = logging.getLogger(__name__)

MODEL_FETCH_TIMEOUT_S = 60.0
PUBLISH_TIMEOUT_S = 30.0


class _PendingFetch:
    """A download in progress from a retained topic: what is awaited, and the payload once it arrived."""

    def __init__(self, fetch: Fetch) -> None:
        self.fetch = fetch
        self.topic = fetch.topic
        self.payload: bytes | None = None
        self.arrived = threading.Event()


class DeviceAgent:
    """One device of a fleet: an MQTT client plus a worker thread that trains the rounds it is selected for."""

    def __init__(
        self,
        broker_url: str,
        fleet: str,
        device_id: str,
        data: Any,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        server_public_key: Ed25519PublicKey | None = None,
        num_threads: int | None = None,
        clock: Callable[[], float] = time.time,
        model_fetch_timeout: float = MODEL_FETCH_TIMEOUT_S,
        publish_timeout: float = PUBLISH_TIMEOUT_S,
    ) -> None:
        """Check the arguments and load the local data; nothing touches the network before start().

        With `server_public_key` the agent runs only tasks signed by that key (device_runtime.signing)."""
        self.fleet, self.device_id = fleet, device_id
        self._task_topic = task_topic(fleet)
        self._verifier = TaskVerifier(self._task_topic, server_public_key)
        self._status_topic = status_topic(fleet, device_id)
        self._update_topic = update_topic(fleet, device_id)
        if num_threads is not None and (isinstance(num_threads, bool) or num_threads < 1):
            raise ValueError(f"num_threads must be a positive integer, got {num_threads!r}")
        self._num_threads = num_threads
        self._data = load_local_data(data)
        self.cache = ModelCache(cache_dir if cache_dir is not None else default_cache_dir())
        self._clock = clock
        self._model_fetch_timeout = model_fetch_timeout
        self._publish_timeout = publish_timeout
        tls_files = None if (tls_ca, tls_cert, tls_key) == (None, None, None) else TlsFiles(tls_ca, tls_cert, tls_key)
        if tls_files is not None:
            tls_files.check()
        self._connection = MqttConnection(
            parse_broker_url(broker_url), f"fedge-{fleet}-{device_id}",
            will=(self._status_topic, encode_status("offline")),
            on_connect=self._on_connect, on_message=self._on_message, on_subscribed=self._on_subscribed,
            username=username, password=password, tls_files=tls_files)
        self._tasks: queue.Queue[Task | None] = queue.Queue()
        self._lock = threading.Lock()
        self._status: tuple[str, int | None] = ("online", None)
        self._started_rounds: set[tuple[str, int]] = set()  # (run id, round)
        self._fetches: dict[str, _PendingFetch] = {}
        self._stop = threading.Event()
        self._task_subscription: int | None = None
        self._subscribed = threading.Event()
        self._worker = threading.Thread(target=self._work, name=f"fedge-agent-{device_id}", daemon=True)
        self.stats = {"tasks_received": 0, "tasks_ignored": 0, "models_downloaded": 0, "models_from_cache": 0,
                      "rounds_trained": 0, "rounds_failed": 0, "updates_published": 0}

    @property
    def connected(self) -> bool:
        """Whether the MQTT connection is up right now."""
        return self._connection.connected.is_set()

    @property
    def ready(self) -> bool:
        """Whether the agent is connected and the broker acknowledged its task subscription."""
        return self.connected and self._subscribed.is_set()

    @property
    def rounds_trained(self) -> list[int]:
        """Round numbers this agent has started training (of any job), in ascending order."""
        with self._lock:
            return sorted(round_num for _, round_num in self._started_rounds)

    def start(self) -> None:
        """Start the worker and the MQTT network thread (which connects and reconnects with back-off)."""
        self._worker.start()
        self._connection.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Finish the round in progress (bounded by its budget), publish status 'offline' and disconnect."""
        if self._stop.is_set():
            return
        logger.info("stopping: finishing the current round, if any, then going offline")
        self._stop.set()
        self._tasks.put(None)
        if self._worker.is_alive():
            self._worker.join(timeout)
            if self._worker.is_alive():
                logger.warning("the current round did not finish within %.0f s; abandoning it", timeout)
        self._status = ("offline", None)
        self._connection.close(final=(self._status_topic, encode_status("offline")))
        logger.info("stopped")

    # -- paho's network thread: must not block -------------------------------------------------

    def _on_connect(self) -> None:
        """(Re-)subscribe to the task and any model being fetched, then announce the current status.

        The broker handles one connection's packets in order, so once the status is visible the
        task subscription is in place.
        """
        self._subscribed.clear()
        with self._lock:
            topics = [self._task_topic, *(fetch.topic for fetch in self._fetches.values())]
        self._task_subscription = self._connection.subscribe(topics, qos=1)
        self._publish_status(*self._status)

    def _on_subscribed(self, mid: int) -> None:
        """Note that the broker acknowledged the task subscription."""
        if mid == self._task_subscription:
            self._subscribed.set()

    def _on_message(self, topic: str, payload: bytes) -> None:
        """Route a message: tasks to the worker's queue, models and weights to the pending fetch."""
        if topic == self._task_topic:
            self._receive_task(payload)
            return
        with self._lock:
            fetch = next((f for f in self._fetches.values() if f.topic == topic), None)
        if fetch is None:
            logger.debug("ignoring a message on %s (nothing is waiting for it)", topic)
        elif not payload:
            logger.debug("ignoring an empty retained message on %s", topic)
        elif not fetch.fetch.matches(payload):
            logger.debug("ignoring a message on %s that is not the one awaited", topic)
        else:
            fetch.payload = payload
            fetch.arrived.set()

    def _receive_task(self, payload: bytes) -> None:
        """Decode a task and queue it for the worker unless it is malformed, stale or not for this device."""
        self._count("tasks_received")
        with self._lock:
            task, reason = task_to_train(payload, self.device_id, self._started_rounds, self._clock(),
                                         self._verifier)
        if reason:
            self._ignore(reason)
        elif task is not None:
            self._tasks.put(task)

    def _skip_reason(self, task: Task) -> str | None:
        """Why this device should not train `task`, or None if it should (rounds.skip_reason)."""
        with self._lock:
            return skip_reason(task, self.device_id, self._started_rounds, self._clock())

    def _count(self, name: str) -> None:
        """Increment one of the counters in `stats` (called from both threads)."""
        with self._lock:
            self.stats[name] += 1

    def _ignore(self, reason: str) -> None:
        """Log why a task is ignored and count it."""
        self._count("tasks_ignored")
        logger.info("ignoring task: %s", reason)

    # -- the worker thread ---------------------------------------------------------------------

    def _work(self) -> None:
        """Run queued tasks one at a time until stop()."""
        while not self._stop.is_set():
            task = self._newest_task()
            if task is None or self._stop.is_set():
                return
            reason = self._skip_reason(task)  # the round may have been started meanwhile, or expired
            if reason:
                self._ignore(f"round {task.round}: {reason}")
                continue
            try:
                self._run_round(task)
            except ValueError as error:  # e.g. local data unlike the model's input: a clear message suffices
                logger.error("round %d failed: %s", task.round, error)  # logged before counted: who sees
                self._count("rounds_failed")  # the count also finds the reason
            except Exception:
                logger.exception("round %d failed", task.round)
                self._count("rounds_failed")
            finally:
                self._set_state("online")

    def _newest_task(self) -> Task | None:
        """Block for a task, then skip any that a newer queued task supersedes; None means stop."""
        task = self._tasks.get()
        while task is not None:
            try:
                newer = self._tasks.get_nowait()
            except queue.Empty:
                return task
            if newer is None:
                return None
            if supersedes(newer, task):
                task, newer = newer, task
            if round_key(newer) != round_key(task):
                self._ignore(f"round {newer.round}: superseded by round {task.round}")
        return None

    def _run_round(self, task: Task) -> None:
        """Fetch the model (and the global weights), train on the local data and publish the update of one round."""
        device_round = DeviceRound(self.fleet, self.device_id, task)
        model_path = self._model_for(device_round)
        if model_path is None:
            self._count("rounds_failed")
            return
        with self._lock:
            if round_key(task) in self._started_rounds:
                return
            self._started_rounds.add(round_key(task))
        model = TrainableModel.from_file(model_path, num_threads=self._num_threads, verify=False)  # verified on fetch
        initial_weights = None
        if device_round.weights_fetch is not None:
            initial_weights = self._global_weights(device_round, model)
            if initial_weights is None:
                self._count("rounds_failed")
                return
        self._set_state("training", task.round)
        max_seconds = device_round.time_budget(self._clock())
        logger.info("round %d: training (epochs %d, max_steps %s, max_seconds %s)",
                    task.round, task.work.epochs, task.work.max_steps, max_seconds)
        outcome = device_round.train(model, self._data, initial_weights, max_seconds)
        result = outcome.result
        self._count("rounds_trained")
        logger.info("round %d: trained %d steps on %d examples in %.2f s%s", task.round, result.steps,
                    result.num_examples, result.seconds, " (budget cut it short)" if result.stopped_early else "")
        mid = self._connection.publish(self._update_topic, outcome.payload, qos=1)
        if self._connection.wait_for_ack(mid, self._publish_timeout):
            self._count("updates_published")
            logger.info("round %d: update %s delivered (%d bytes, %s)", task.round, outcome.update.update_id,
                        len(outcome.payload), task.work.encoding)
        else:
            logger.warning("round %d: no PUBACK for the update within %.0f s; paho keeps it and resends it "
                           "after a reconnect", task.round, self._publish_timeout)

    def _model_for(self, device_round: DeviceRound) -> Path | None:
        """The cached file of the round's model, fetched from its retained topic (verified and cached) when the
        cache lacks it; None if refused. Training maps this file (TrainableModel.from_file)."""
        task = device_round.task
        if self.cache.get(task.model_hash) is not None:
            self._count("models_from_cache")
            logger.info("round %d: model %s from the cache", task.round, task.model_hash)
            return self.cache.path(task.model_hash)
        payload = self._download(task, device_round.model_fetch)
        if payload is None:
            return None
        try:
            device_round.check_model(payload)
        except ArtifactError as error:
            logger.error("round %d: refusing the model on %s: %s", task.round, device_round.model_fetch.topic, error)
            return None
        cached_hash = self.cache.put(payload)
        self._count("models_downloaded")
        logger.info("round %d: model %s downloaded (%d bytes) and cached", task.round, task.model_hash, len(payload))
        return self.cache.path(cached_hash)

    def _global_weights(self, device_round: DeviceRound, model: TrainableModel) -> list | None:
        """The round's global weights (None when they do not arrive or are refused)."""
        task = device_round.task
        payload = self._download(task, device_round.weights_fetch)
        if payload is None:
            return None
        try:
            weights = device_round.global_weights(payload, model)
        except ProtocolError as error:
            logger.error("round %d: refusing the global weights: %s", task.round, error)
            return None
        logger.info("round %d: global weights received (%d bytes)", task.round, len(payload))
        return weights

    def _download(self, task: Task, fetch: Fetch) -> bytes | None:
        """Subscribe to a fetch's retained topic and wait for its payload (until the deadline or a timeout)."""
        pending = _PendingFetch(fetch)
        with self._lock:
            self._fetches[fetch.topic] = pending
        self._connection.subscribe([fetch.topic], qos=1)
        try:
            wait = max(0.0, min(self._model_fetch_timeout, task.deadline - self._clock()))
            end = time.monotonic() + wait
            while not pending.arrived.wait(min(0.1, max(0.0, end - time.monotonic()))):
                if self._stop.is_set():
                    logger.info("round %d: stopping, so the %s download is abandoned", task.round, fetch.what)
                    return None
                if time.monotonic() >= end:
                    logger.error("round %d: the %s did not arrive on %s within %.0f s", task.round, fetch.what,
                                 fetch.topic, wait)
                    return None
            return pending.payload
        finally:
            with self._lock:
                self._fetches.pop(fetch.topic, None)
            self._connection.unsubscribe(fetch.topic)

    def _set_state(self, state: str, round_id: int | None = None) -> None:
        """Remember and publish the device's status."""
        self._status = (state, round_id)
        self._publish_status(state, round_id)

    def _publish_status(self, state: str, round_id: int | None = None) -> None:
        """Publish a retained status message (queued by paho while disconnected)."""
        try:
            self._connection.publish(self._status_topic, encode_status(state, round_id), qos=1, retain=True)
        except RuntimeError as error:
            logger.warning("could not publish status %r: %s", state, error)
