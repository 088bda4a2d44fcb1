"""One emulated device: the device agent's protocol behaviour as coroutines on a shared loop, with a profile.

It speaks exactly what `device_runtime.agent.DeviceAgent` speaks (status with a last will,
retained tasks, the model fetched by hash and cached, the round's global weights, selection,
QoS 1 updates) with the same rules (`device_runtime.rounds`), and adds its profile: training
stretched by the speed factor, transfers delayed by the bandwidth, online only in its
availability windows, and a seeded chance to vanish mid-round.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from device_runtime.agent import MODEL_FETCH_TIMEOUT_S, PUBLISH_TIMEOUT_S
from device_runtime.artifact import ArtifactError
from device_runtime.connection import RECONNECT_MAX_DELAY_S, RECONNECT_MIN_DELAY_S, BrokerAddress, TlsFiles
from device_runtime.data import LocalData
from device_runtime.model_cache import DEFAULT_MAX_MODELS
from device_runtime.protocol import ProtocolError, Task, encode_status
from device_runtime.protocol.topics import status_topic, task_topic, update_topic
from device_runtime.rounds import DeviceRound, Fetch, round_key, skip_reason, supersedes, task_to_train
from device_runtime.signing import Ed25519PublicKey, TaskVerifier
from simulator.network import LoopClient, LoopThread
from simulator.scenario import DeviceProfile
from simulator.trainer import TrainerPool

logger = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 5.0


@dataclass
class DeviceStats:
    """What one emulated device did; `bytes_down` counts model and weights payloads, `bytes_up` update payloads."""

    connects: int = 0
    tasks_received: int = 0
    tasks_ignored: int = 0
    rounds_trained: int = 0
    rounds_dropped: int = 0  # vanished mid-round (dropout)
    rounds_abandoned: int = 0  # its availability window closed, or the fleet stopped, mid-round
    rounds_failed: int = 0
    updates_published: int = 0  # acknowledged by the broker
    models_downloaded: int = 0
    models_from_cache: int = 0
    bytes_down: int = 0
    bytes_up: int = 0


@dataclass(frozen=True)
class DeviceContext:
    """What a fleet's devices share: fleet id, seed, broker and credentials, connector threads, trainer, start time."""

    fleet: str
    seed: int
    broker: BrokerAddress
    connector: concurrent.futures.Executor
    trainer: TrainerPool
    start: float  # time.monotonic() when the fleet started
    username: str | None = None
    password: str | None = None
    tls_files: TlsFiles | None = None
    server_public_key: Ed25519PublicKey | None = None  # set: run only tasks the server signed (device_runtime.signing)


class SimulatedDevice:
    """An emulated device living on a LoopThread: run() follows its availability windows until shutdown()."""

    def __init__(self, profile: DeviceProfile, data: LocalData, context: DeviceContext,
                 loop_thread: LoopThread) -> None:
        """Prepare the device; nothing touches the network before run()."""
        self.profile, self.device_id, self._data, self._context = profile, profile.device_id, data, context
        self.stats = DeviceStats()
        self._status_topic = status_topic(context.fleet, self.device_id)
        self._task_topic = task_topic(context.fleet)
        self._verifier = TaskVerifier(self._task_topic, context.server_public_key)
        self._client = LoopClient(loop_thread, context.connector, context.broker,
                                  f"fedge-{context.fleet}-{self.device_id}",
                                  will=(self._status_topic, encode_status("offline")), on_message=self._on_message,
                                  on_connection_lost=self._on_connection_lost, username=context.username,
                                  password=context.password, tls_files=context.tls_files)
        self._status: tuple[str, int | None] = ("online", None)
        self._started_rounds: set[tuple[str, int]] = set()  # (run id, round)
        self._models: OrderedDict[str, None] = OrderedDict()  # hashes this device holds (the artifacts are shared)
        self._fetches: dict[str, asyncio.Queue[bytes]] = {}
        self._life: asyncio.Task[None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._next_task: Task | None = None
        self._training_round: int | None = None
        self._wake = asyncio.Event()
        self._lost = self._vanished = self._stopping = False

    @property
    def connected(self) -> bool:
        """Whether the device is connected to the broker now."""
        return self._client.connected

    @property
    def stopped(self) -> bool:
        """Whether shutdown() has finished: run() and any round are over and the device is disconnected."""
        life_over = self._life is None or self._life.done()
        return self._stopping and life_over and self._worker is None and not self.connected

    async def run(self) -> None:
        """Connect when an availability window opens, leave when it closes; after a dropout, stay away a while."""
        availability = self.profile.group.availability
        while not self._stopping:
            window = availability.next_window(self._elapsed())
            if window is None:
                return
            await self._sleep_until(window[0])
            if await self._stay_online(window[1]):
                await asyncio.sleep(self.profile.group.downtime)

    def start(self) -> None:
        """Begin run() on the running loop (call it on the device's loop thread)."""
        self._life = asyncio.get_running_loop().create_task(self.run())

    async def shutdown(self) -> None:
        """Stop run(), abandon any round, publish status 'offline' and disconnect cleanly.

        The stop flag (checked by every loop of run()) ends run() even where Python 3.11's
        asyncio.wait_for swallows a cancellation that races with the awaited result.
        """
        self._stopping = True
        self._wake.set()
        if self._life is not None:
            self._life.cancel()
            await asyncio.gather(self._life, return_exceptions=True)
        await self._go_offline()

    def drop_connection(self) -> None:
        """Close the TCP connection without DISCONNECT, if still open (after the loop stopped, as a last resort)."""
        self._client.drop()

    # -- connection ------------------------------------------------------------------------------

    async def _stay_online(self, end: float) -> bool:
        """Stay connected until `end` (reconnecting with back-off); True when the device vanished (dropout) first."""
        delay = RECONNECT_MIN_DELAY_S
        self._vanished = False
        while not self._stopping and self._elapsed() < end:
            self._lost = False
            self._wake.clear()
            if await self._client.connect():
                delay = RECONNECT_MIN_DELAY_S
                self.stats.connects += 1
                self._on_connected()
                await self._wait_until(end)
                if not (self._lost or self._vanished):
                    break  # the window is over
            if not self._vanished:
                self._wake.clear()
                await self._wait_until(min(self._elapsed() + delay, end))  # back off before (re)connecting
                delay = min(2 * delay, RECONNECT_MAX_DELAY_S)
            if self._vanished:
                self._client.drop()  # in case it vanished while (re)connecting
                return True
        await self._go_offline()
        return False

    def _on_connected(self) -> None:
        """(Re-)subscribe to the task and any pending download, then announce the current status."""
        self._client.subscribe([self._task_topic, *self._fetches])
        self._publish_status()

    def _on_connection_lost(self) -> None:
        """The broker went away: wake run() to reconnect."""
        self._lost = True
        self._wake.set()

    def _vanish(self) -> None:
        """Dropout: drop the TCP connection without DISCONNECT (the broker publishes the last will)."""
        self._vanished = True
        self._status = ("online", None)
        self._next_task = None
        self._client.drop()
        self._wake.set()

    async def _go_offline(self) -> None:
        """Abandon the round in progress, publish status 'offline' (retained) and disconnect cleanly."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.wait([self._worker], timeout=STATUS_TIMEOUT_S)
        self._status = ("offline", None)
        if self.connected:
            acked = self._publish_status()
            try:
                await asyncio.wait_for(acked, STATUS_TIMEOUT_S)
            except asyncio.TimeoutError:
                logger.warning("%s: no PUBACK for status 'offline' within %.0f s", self.device_id, STATUS_TIMEOUT_S)
        await self._client.disconnect()
        self._status = ("online", None)

    def _publish_status(self) -> asyncio.Future[None]:
        """Publish the current status (retained, QoS 1)."""
        return self._client.publish(self._status_topic, encode_status(*self._status), retain=True)

    def _set_status(self, state: str, round_id: int | None = None) -> asyncio.Future[None] | None:
        """Remember the status and publish it when connected (connecting publishes it anyway); its PUBACK future."""
        self._status = (state, round_id)
        return self._publish_status() if self.connected else None

    # -- messages and tasks ----------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        """Route a message: tasks to the round worker, models and weights to the pending download."""
        if topic == self._task_topic:
            self._receive_task(payload)
        elif topic in self._fetches and payload:
            self._fetches[topic].put_nowait(payload)

    def _receive_task(self, payload: bytes) -> None:
        """Decode a task and start (or queue) its round unless it is malformed, stale or not for this device."""
        self.stats.tasks_received += 1
        task, reason = task_to_train(payload, self.device_id, self._started_rounds, time.time(), self._verifier)
        if reason:
            self._ignore(reason)
        elif task is None or self._stopping:
            return  # the server cleared the retained task, or the device is leaving for good
        elif self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work(task))
        elif self._next_task is None or supersedes(task, self._next_task):
            if self._next_task is not None and round_key(self._next_task) != round_key(task):
                self._ignore(f"round {self._next_task.round}: superseded by round {task.round}")
            self._next_task = task
        else:
            self._ignore(f"round {task.round}: superseded by round {self._next_task.round}")

    def _ignore(self, reason: str) -> None:
        """Log why a task is ignored and count it."""
        self.stats.tasks_ignored += 1
        logger.debug("%s: ignoring task: %s", self.device_id, reason)

    async def _work(self, task: Task | None) -> None:
        """Run a round, then the newest task that arrived meanwhile, until none is left."""
        try:
            while task is not None:
                reason = skip_reason(task, self.device_id, self._started_rounds, time.time())
                if reason:
                    self._ignore(f"round {task.round}: {reason}")
                else:
                    await self._round(task)
                task, self._next_task = self._next_task, None
        finally:
            self._worker = None

    async def _round(self, task: Task) -> None:
        """One round, counting a failure or an abandoned round; the device announces 'online' again after it."""
        try:
            await self._run_round(task)
        except asyncio.CancelledError:
            if self._training_round is not None:
                self.stats.rounds_abandoned += 1
            raise
        except (ValueError, ProtocolError, ArtifactError) as error:  # e.g. data unlike the model's input
            self.stats.rounds_failed += 1
            logger.error("%s: round %d failed: %s", self.device_id, task.round, error)
        except Exception:
            self.stats.rounds_failed += 1
            logger.exception("%s: round %d failed", self.device_id, task.round)
        finally:
            self._training_round = None
        if not self._vanished:
            self._set_status("online")

    async def _run_round(self, task: Task) -> None:
        """Fetch the model and weights, maybe vanish, train (stretched by the speed factor), upload the update."""
        group = self.profile.group
        device_round = DeviceRound(self._context.fleet, self.device_id, task)
        if not await self._model_for(device_round):
            self.stats.rounds_failed += 1
            return
        if round_key(task) in self._started_rounds:
            return
        self._started_rounds.add(round_key(task))
        self._training_round = task.round
        initial_weights = None
        if device_round.weights_fetch is not None:
            initial_weights = await self._global_weights(device_round)
            if initial_weights is None:
                self.stats.rounds_failed += 1
                return
        announced = self._set_status("training", task.round)
        if self._drops_out(task):
            logger.debug("%s: round %d: vanishing mid-round for %.0f s", self.device_id, task.round, group.downtime)
            if announced is not None:
                await asyncio.wait([announced], timeout=STATUS_TIMEOUT_S)
            self.stats.rounds_dropped += 1
            self._vanish()
            return
        submitted = time.monotonic()
        budget = device_round.time_budget(time.time())
        outcome = await self._context.trainer.train(device_round, self._data, initial_weights,
                                                    None if budget is None else budget / group.speed)
        self.stats.rounds_trained += 1
        await asyncio.sleep(max(0.0, group.speed * outcome.result.seconds - (time.monotonic() - submitted)))
        await asyncio.sleep(_transfer_seconds(len(outcome.payload), group.upload))
        acked = self._client.publish(update_topic(self._context.fleet, self.device_id), outcome.payload)
        self.stats.bytes_up += len(outcome.payload)
        try:
            await asyncio.wait_for(asyncio.shield(acked), PUBLISH_TIMEOUT_S)
            self.stats.updates_published += 1
        except asyncio.TimeoutError:
            logger.warning("%s: round %d: no PUBACK for the update within %.0f s; paho resends it after a reconnect",
                           self.device_id, task.round, PUBLISH_TIMEOUT_S)

    def _drops_out(self, task: Task) -> bool:
        """Whether the device vanishes in this round: a draw from its generator seeded by (seed, device, round)."""
        dropout = self.profile.group.dropout
        if dropout == 0:
            return False
        return np.random.default_rng([self._context.seed, self.profile.index, task.round]).random() < dropout

    async def _model_for(self, device_round: DeviceRound) -> bool:
        """Make sure the round's model is held: from the device's cache, else fetched from its retained topic."""
        task, trainer = device_round.task, self._context.trainer
        if task.model_hash in self._models and trainer.has_model(task.model_hash):
            self._models.move_to_end(task.model_hash)
            self.stats.models_from_cache += 1
            return True
        payload = await self._download(task, device_round.model_fetch)
        if payload is None:
            return False
        try:
            await trainer.add_model(payload, device_round)
        except ArtifactError as error:
            logger.error("%s: round %d: refusing the model on %s: %s", self.device_id, task.round,
                         device_round.model_fetch.topic, error)
            return False
        self._models[task.model_hash] = None
        while len(self._models) > DEFAULT_MAX_MODELS:
            self._models.popitem(last=False)
        self.stats.models_downloaded += 1
        return True

    async def _global_weights(self, device_round: DeviceRound) -> list[np.ndarray] | None:
        """The round's global weights, or None when they do not arrive or are refused."""
        payload = await self._download(device_round.task, device_round.weights_fetch)
        if payload is None:
            return None
        try:
            return await self._context.trainer.global_weights(payload, device_round)
        except ProtocolError as error:
            logger.error("%s: round %d: refusing the global weights: %s", self.device_id, device_round.task.round,
                         error)
            return None

    async def _download(self, task: Task, fetch: Fetch) -> bytes | None:
        """Subscribe to a fetch's retained topic and wait (until the deadline or a timeout) for its payload."""
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._fetches[fetch.topic] = queue
        self._client.subscribe([fetch.topic])
        wait = max(0.0, min(MODEL_FETCH_TIMEOUT_S, task.deadline - time.time()))
        end = time.monotonic() + wait
        try:
            while True:
                payload = await asyncio.wait_for(queue.get(), max(0.0, end - time.monotonic()))
                if await self._context.trainer.matches(fetch, payload):
                    break
        except asyncio.TimeoutError:
            logger.error("%s: round %d: the %s did not arrive on %s within %.0f s", self.device_id, task.round,
                         fetch.what, fetch.topic, wait)
            return None
        finally:
            del self._fetches[fetch.topic]
            self._client.unsubscribe(fetch.topic)
        self.stats.bytes_down += len(payload)
        await asyncio.sleep(_transfer_seconds(len(payload), self.profile.group.download))
        return payload

    # -- time ------------------------------------------------------------------------------------

    def _elapsed(self) -> float:
        """Seconds since the fleet started."""
        return time.monotonic() - self._context.start

    async def _sleep_until(self, elapsed: float) -> None:
        """Sleep until `elapsed` seconds after the fleet started."""
        while not self._stopping and (left := elapsed - self._elapsed()) > 0:
            await asyncio.sleep(left)

    async def _wait_until(self, elapsed: float) -> None:
        """Sleep until `elapsed` seconds after the start (inf: forever); wake early on a lost or dropped connection."""
        while not (self._stopping or self._wake.is_set()) and (left := elapsed - self._elapsed()) > 0:
            try:
                await asyncio.wait_for(self._wake.wait(), None if math.isinf(left) else left)
            except asyncio.TimeoutError:
                pass


def _transfer_seconds(num_bytes: int, bandwidth: float | None) -> float:
    """How long `num_bytes` take at `bandwidth` bytes/s (0 when unlimited)."""
    return 0.0 if bandwidth is None else num_bytes / bandwidth
