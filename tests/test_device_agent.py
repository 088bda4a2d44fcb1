"""The MQTT device agent against a real mosquitto: the test plays the server with its own paho client."""

from __future__ import annotations

import getpass
import logging
import os
import pwd
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from device_artifacts import artifact_path
from fedge.broker import accepts, find_mosquitto, free_port
from device_runtime.agent import DeviceAgent
from device_runtime.artifact import read_manifest
from device_runtime.cli import main as cli_main
from device_runtime.model import TrainableModel
from device_runtime.model_cache import ModelCache
from device_runtime.protocol import Task, decode_status, decode_update, encode_task, encode_weights, payload_hash
from device_runtime.protocol.topics import model_topic, task_topic, update_wildcard, weights_topic
from device_runtime.rounds import device_shuffle_seed, supersedes
from device_runtime.training import train_locally
from tasks import task_of

pytestmark = pytest.mark.device

TIMEOUT_S = 20.0


# ------------------------------------------------------------------------------------------- helpers


def wait_until(condition: Callable[[], Any], what: str, timeout: float = TIMEOUT_S) -> Any:
    """Poll `condition` until it returns something truthy; fail naming `what` after `timeout`."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


class Server:
    """The test's side of the protocol: publishes models and tasks, collects updates and statuses."""

    def __init__(self, host: str, port: int, fleet: str, persistent: bool = False,
                 credentials: tuple[str, str] | None = None, tls_ca: str | None = None) -> None:
        self.fleet = fleet
        self.updates: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.statuses: list[tuple[str, dict]] = []
        self._subscribed = threading.Event()
        client_id = f"server-{fleet}" if persistent else f"server-{uuid.uuid4().hex[:12]}"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent)
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        if credentials:
            self.client.username_pw_set(*credentials)
        if tls_ca:
            self.client.tls_set(ca_certs=tls_ca)
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        assert self._subscribed.wait(TIMEOUT_S), "server subscription not acknowledged"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        client.subscribe([(update_wildcard(self.fleet), 1), (f"fedge/{self.fleet}/status/+", 1)])

    def _on_message(self, client, userdata, message) -> None:
        if "/update/" in message.topic:
            self.updates.put((message.topic, bytes(message.payload)))
        elif message.payload:
            self.statuses.append((message.topic.rsplit("/", 1)[1], decode_status(bytes(message.payload))))

    def publish(self, topic: str, payload: bytes, retain: bool = True) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(TIMEOUT_S)
        assert info.is_published(), f"no PUBACK for {topic}"

    def publish_model(self, model_bytes: bytes, model_hash: str | None = None) -> None:
        """Retain an artifact on the model topic of `model_hash` (default: its own content hash)."""
        self.publish(model_topic(self.fleet, model_hash or read_manifest(model_bytes).content_hash), model_bytes)

    def publish_task(self, model_hash: str, round_id: int, **fields: Any) -> Task:
        """Retain a task for `round_id` (defaults: every device, 1 epoch, float32, deadline in 60 s)."""
        values = dict(round=round_id, run_id="job-1", model_hash=model_hash, learning_rate=0.05, epochs=1, max_steps=None,
                      max_seconds=None, deadline=time.time() + 60, selected=None, fraction=None,
                      encoding="float32", topk=None, seed=1000 + round_id)
        values.update(fields)
        task = task_of(**values)
        self.publish(task_topic(self.fleet), encode_task(task))
        return task

    def next_update(self, timeout: float = TIMEOUT_S) -> tuple[str, bytes]:
        """The next (device id, payload) received on an update topic."""
        try:
            topic, payload = self.updates.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no update within {timeout:.0f} s")
        return topic.rsplit("/", 1)[1], payload

    def has_status(self, device_id: str, state: str) -> bool:
        """Whether `device_id` has reported `state`."""
        return any(device == device_id and status["state"] == state for device, status in list(self.statuses))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The 'mlp' test artifact: input (8,), 3 classes, batch 4."""
    return artifact_path("mlp", tmp_path_factory.mktemp("artifacts")).read_bytes()


@pytest.fixture(scope="module")
def model_hash(model_bytes: bytes) -> str:
    return read_manifest(model_bytes).content_hash


@pytest.fixture(scope="module")
def local_data() -> tuple[np.ndarray, np.ndarray]:
    """10 examples: two full batches of 4 and a padded one."""
    rng = np.random.default_rng(7)
    return rng.normal(size=(10, 8)).astype(np.float32), rng.integers(0, 3, size=10).astype(np.int32)


@pytest.fixture
def server(mosquitto_broker: tuple[str, int], fleet: str) -> Iterator[Server]:
    server = Server(*mosquitto_broker, fleet)
    yield server
    server.close()


@pytest.fixture
def make_agent(mosquitto_broker, fleet, local_data, tmp_path) -> Iterator[Callable[..., DeviceAgent]]:
    """Start DeviceAgents in-thread (on the session broker unless `broker` is given); stop them at teardown."""
    agents: list[DeviceAgent] = []

    def make(device_id: str, broker: tuple[str, int] | None = None, **options: Any) -> DeviceAgent:
        host, port = broker or mosquitto_broker
        options.setdefault("cache_dir", tmp_path / f"cache-{device_id}")
        agent = DeviceAgent(f"mqtt://{host}:{port}", fleet, device_id, local_data, num_threads=1, **options)
        agent.start()
        agents.append(agent)
        wait_until(lambda: agent.ready, f"agent {device_id} to connect and subscribe")
        return agent

    yield make
    for agent in agents:
        agent.stop(timeout=TIMEOUT_S)


def reference_delta(model_bytes: bytes, data, task: Task, device_id: str) -> tuple[list[np.ndarray], int]:
    """What train_locally computes in-process for this task and device."""
    result = train_locally(TrainableModel(model_bytes, num_threads=1), data, epochs=task.work.epochs,
                           shuffle_seed=device_shuffle_seed(task.seed, device_id), max_steps=task.work.max_steps,
                           learning_rate=task.work.learning_rate)
    return result.delta, result.num_examples


# --------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("encoding", ["float32", "float16", "int8"])
def test_update_matches_local_training(encoding, server, make_agent, model_bytes, model_hash, local_data):
    server.publish_model(model_bytes)
    agent = make_agent("dev-a")
    wait_until(lambda: server.has_status("dev-a", "online"), "status 'online'")
    task = server.publish_task(model_hash, 3, epochs=2, encoding=encoding)

    device, payload = server.next_update()
    update = decode_update(payload, read_manifest(model_bytes), fleet=server.fleet, device_id="dev-a")
    assert (device, update.round, update.device_id, update.model_hash) == ("dev-a", 3, "dev-a", model_hash)
    expected, num_examples = reference_delta(model_bytes, local_data, task, "dev-a")
    assert update.num_examples == num_examples == 20  # 10 examples, 2 epochs
    assert set(update.metrics) >= {"loss_sum", "num_examples"} and update.metrics["num_examples"] == 20
    for got, want in zip(update.tensors, expected, strict=True):
        assert got.shape == want.shape and got.dtype == np.float32
        if encoding == "float32":
            np.testing.assert_array_equal(got, want)
        elif encoding == "float16":
            np.testing.assert_allclose(got, want, rtol=2**-11, atol=1e-7)
        else:  # int8: symmetric per-tensor scale max|x|/127, rounding error at most half a step
            step = np.abs(want).max() / 127
            assert np.abs(got - want).max() <= step / 2 * 1.001 + 1e-9
    assert any(np.abs(t).max() > 0 for t in update.tensors), "training changed nothing"
    wait_until(lambda: server.has_status("dev-a", "training"), "status 'training'")
    wait_until(lambda: agent.stats["updates_published"] == 1, "the PUBACK of the update")
    assert agent.rounds_trained == [3]


def test_a_second_job_on_a_running_agent_trains_from_its_first_round(server, make_agent, model_bytes, model_hash):
    """Devices remember (run id, round): the rounds of a new job (a new `fedge serve`) are not refused."""
    server.publish_model(model_bytes)
    agent = make_agent("dev-j")
    manifest = read_manifest(model_bytes)
    rounds = []
    for run_id in ("job-1", "job-1", "job-2"):  # the first job's round 0 again is ignored
        server.publish_task(model_hash, 0, run_id=run_id)
        if run_id == "job-1" and rounds:
            wait_until(lambda: agent.stats["tasks_ignored"] == 1, "the repeated round to be ignored")
            continue
        device, payload = server.next_update()
        rounds.append(decode_update(payload, manifest).round)
    assert rounds == [0, 0] and agent.stats["rounds_trained"] == 2
    assert server.updates.empty()


def test_a_later_task_supersedes_a_queued_one_of_another_job_or_a_later_round():
    """The rule both task queues (the agent's and the simulator's) follow: device_runtime.rounds.supersedes."""
    def task(run_id: str, round_id: int) -> Task:
        return task_of(round=round_id, run_id=run_id, model_hash="sha256:" + "ab" * 32, learning_rate=None, epochs=1,
                    max_steps=None, max_seconds=None, deadline=time.time() + 60, selected=None, fraction=None,
                    encoding="float32", topk=None, seed=1)

    assert supersedes(task("job-1", 4), task("job-1", 3)) and supersedes(task("job-1", 3), task("job-1", 3))
    assert not supersedes(task("job-1", 2), task("job-1", 3))
    assert supersedes(task("job-2", 0), task("job-1", 7))  # a new job, whatever its round numbers


def test_a_fedprox_task_trains_with_its_mu(server, make_agent, tmp_path_factory, local_data):
    """A task's proximal_mu reaches the training: the update is train_locally's with that mu, not with mu = 0."""
    proximal = artifact_path("scalar", tmp_path_factory.mktemp("proximal")).read_bytes()
    manifest = read_manifest(proximal)
    server.publish_model(proximal)
    make_agent("dev-p")
    task = server.publish_task(manifest.content_hash, 1, proximal_mu=5.0, epochs=3)
    device, payload = server.next_update()
    got = decode_update(payload, manifest).tensors
    for mu, same in ((5.0, True), (0.0, False)):
        expected = train_locally(TrainableModel(proximal, num_threads=1), local_data, epochs=3, learning_rate=0.05,
                                 shuffle_seed=device_shuffle_seed(task.seed, "dev-p"), proximal_mu=mu).delta
        close = all(np.allclose(g, e, rtol=1e-5, atol=1e-7) for g, e in zip(got, expected, strict=True))
        assert close == same, f"mu={mu}"


def test_not_selected_device_does_not_publish(server, make_agent, model_bytes, model_hash):
    server.publish_model(model_bytes)
    agent = make_agent("dev-b")
    server.publish_task(model_hash, 1, selected=["someone-else"])
    server.publish_task(model_hash, 2, fraction=1.0)
    device, payload = server.next_update()  # tasks are handled in order: round 1's would come first
    assert decode_update(payload, read_manifest(model_bytes)).round == 2
    assert agent.rounds_trained == [2] and agent.stats["tasks_ignored"] == 1
    assert server.updates.empty()


def test_malformed_task_is_ignored_and_agent_keeps_running(server, make_agent, model_bytes, model_hash, caplog):
    caplog.set_level(logging.INFO, logger="device_runtime")
    server.publish_model(model_bytes)
    agent = make_agent("dev-c")
    for payload in (b"\xff not json", b'{"round": 1}', b"[1, 2]"):
        server.publish(task_topic(server.fleet), payload)
    server.publish_task(model_hash, 4, deadline=time.time() - 1)  # expired
    server.publish_task(model_hash, 5)

    device, payload = server.next_update()
    assert decode_update(payload, read_manifest(model_bytes)).round == 5
    assert agent.rounds_trained == [5] and agent.stats["tasks_ignored"] == 4
    ignored = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ignoring task")]
    assert sum("malformed task" in message for message in ignored) == 3, ignored
    assert any("round 4: deadline passed" in message for message in ignored), ignored


def test_model_with_wrong_hash_is_refused(server, make_agent, model_bytes, model_hash, caplog):
    caplog.set_level(logging.INFO, logger="device_runtime")
    claimed = "sha256:" + "ab" * 32
    server.publish_model(model_bytes, model_hash=claimed)  # the artifact's real hash is another one
    agent = make_agent("dev-d")
    server.publish_task(claimed, 1)
    wait_until(lambda: agent.stats["rounds_failed"] == 1, "the round to be refused")
    refusals = [r.getMessage() for r in caplog.records if "refusing the model" in r.getMessage()]
    assert len(refusals) == 1 and claimed in refusals[0] and model_hash in refusals[0]
    assert agent.cache.hashes() == [] and agent.rounds_trained == []

    server.publish_model(model_bytes)  # the agent is still running: a correct round goes through
    server.publish_task(model_hash, 2)
    device, payload = server.next_update()
    assert decode_update(payload, read_manifest(model_bytes)).round == 2
    assert server.updates.empty()


def test_data_unlike_the_model_fails_the_round_with_a_reason(server, fleet, mosquitto_broker, model_bytes,
                                                             model_hash, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="device_runtime")
    host, port = mosquitto_broker
    wrong = (np.zeros((6, 5), np.float32), np.zeros(6, np.int32))  # the model takes 8 features
    agent = DeviceAgent(f"mqtt://{host}:{port}", fleet, "dev-w", wrong, cache_dir=tmp_path, num_threads=1)
    agent.start()
    try:
        server.publish_model(model_bytes)
        wait_until(lambda: agent.ready, "the agent to connect")
        server.publish_task(model_hash, 1)
        wait_until(lambda: agent.stats["rounds_failed"] == 1, "the round to fail")
        failures = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round 1 failed")]
        assert len(failures) == 1 and "x: expected shape (N, 8)" in failures[0], failures
        wait_until(lambda: server.has_status("dev-w", "online"), "status 'online'")
        assert server.updates.empty() and agent.connected
    finally:
        agent.stop(timeout=TIMEOUT_S)


def test_model_is_cached_and_not_downloaded_again(server, make_agent, model_bytes, model_hash, tmp_path):
    cache_dir = tmp_path / "shared-cache"
    server.publish_model(model_bytes)
    agent = make_agent("dev-e", cache_dir=cache_dir)
    server.publish_task(model_hash, 1)
    assert decode_update(server.next_update()[1], read_manifest(model_bytes)).round == 1
    assert (cache_dir / model_hash.removeprefix("sha256:")).read_bytes() == model_bytes
    assert ModelCache(cache_dir).get(model_hash) == model_bytes

    server.publish(model_topic(server.fleet, model_hash), b"")  # clear the retained model: no download possible
    server.publish_task(model_hash, 2)
    assert decode_update(server.next_update()[1], read_manifest(model_bytes)).round == 2
    assert (agent.stats["models_downloaded"], agent.stats["models_from_cache"]) == (1, 1)

    server.publish_task(model_hash, 3, selected=["dev-f"])
    other = make_agent("dev-f", cache_dir=cache_dir)  # a fresh agent reuses the cache on disk
    device, payload = server.next_update()
    assert (device, decode_update(payload, read_manifest(model_bytes)).round) == ("dev-f", 3)
    assert (other.stats["models_downloaded"], other.stats["models_from_cache"]) == (0, 1)


def test_model_cache_verifies_and_keeps_most_recent(tmp_path, model_bytes, model_hash):
    cache = ModelCache(tmp_path, max_models=1)
    assert cache.get(model_hash) is None
    assert cache.put(model_bytes) == model_hash
    assert cache.get(model_hash) == model_bytes and cache.hashes() == [model_hash]
    corrupt = bytearray(model_bytes)
    corrupt[len(corrupt) // 2] ^= 0xFF
    with pytest.raises(ValueError, match="hash"):
        cache.put(bytes(corrupt))
    cache.path(model_hash).write_bytes(bytes(corrupt))  # damaged on disk: dropped, not returned
    assert cache.get(model_hash) is None and cache.hashes() == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


# ------------------------------------------------------------------------------ broker restart


def _user_name() -> str:
    """The name of the user running the tests."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return getpass.getuser()


class PrivateBroker:
    """A mosquitto of this test alone, with on-disk persistence, that can be stopped and restarted on its port."""

    def __init__(self, workdir: Path, extra_config: str = "allow_anonymous true\n") -> None:
        self.host, self.port = "127.0.0.1", free_port()
        (workdir / "db").mkdir()
        self.config = workdir / "mosquitto.conf"
        # Run as the current user: as root, mosquitto would switch to user 'mosquitto', who cannot write here.
        self.config.write_text(f"listener {self.port} {self.host}\npersistence true\n"
                               f"persistence_location {workdir / 'db'}/\nuser {_user_name()}\nlog_dest stderr\n"
                               + extra_config)
        self.log = workdir / "mosquitto.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([find_mosquitto(), "-c", str(self.config)], stdout=log,
                                            stderr=subprocess.STDOUT)
        wait_until(self._accepts, f"mosquitto on port {self.port} (log: {self.log})")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(TIMEOUT_S)

    def _accepts(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"mosquitto exited with {self.process.returncode}: {self.log.read_text()}")
        return accepts(self.host, self.port)


@pytest.fixture
def restartable_broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    broker = PrivateBroker(tmp_path)
    broker.start()
    yield broker
    broker.stop()


def test_broker_restart_mid_round(restartable_broker, fleet, make_agent, model_bytes, model_hash):
    broker = restartable_broker
    server = Server(broker.host, broker.port, fleet, persistent=True)  # its session queues updates meanwhile
    try:
        server.publish_model(model_bytes)
        agent = make_agent("dev-r", broker=(broker.host, broker.port), publish_timeout=60.0)
        server.publish_task(model_hash, 1)
        assert decode_update(server.next_update()[1], read_manifest(model_bytes)).round == 1

        # Round 2 trains for 3 s: the broker goes down meanwhile, so the update is published while offline.
        server.publish_task(model_hash, 2, epochs=100000, max_seconds=3.0)
        wait_until(lambda: server.has_status("dev-r", "training") and agent.rounds_trained == [1, 2],
                   "round 2 to start")
        broker.stop()
        wait_until(lambda: not agent.connected, "the agent to notice the broker is gone")
        wait_until(lambda: agent.stats["rounds_trained"] == 2, "round 2 to finish while the broker is down")
        assert agent.stats["updates_published"] == 1
        broker.start()

        device, payload = server.next_update(timeout=40)  # paho resends the queued QoS 1 update
        update = decode_update(payload, read_manifest(model_bytes))
        assert (device, update.round) == ("dev-r", 2) and update.num_examples > 0
        wait_until(lambda: agent.stats["updates_published"] == 2, "the PUBACK of round 2's update")

        server.publish_task(model_hash, 3)  # a new round after the restart
        assert decode_update(server.next_update()[1], read_manifest(model_bytes)).round == 3
        assert agent.rounds_trained == [1, 2, 3]
        assert agent.stats["rounds_trained"] == 3, "a round was trained twice"
        assert server.updates.empty()
    finally:
        server.close()


# ------------------------------------------------------------------------------------------ the CLI


def test_cli_process_trains_and_stops_on_sigterm(mosquitto_broker, server, model_bytes, model_hash, local_data,
                                                 tmp_path):
    host, port = mosquitto_broker
    data_path = tmp_path / "local.npz"
    np.savez(data_path, x=local_data[0], y=local_data[1])
    command = [sys.executable, "-m", "device_runtime", "--broker", f"mqtt://{host}:{port}", "--fleet", server.fleet,
               "--device-id", "dev-cli", "--data", str(data_path), "--cache-dir", str(tmp_path / "cache"),
               "--num-threads", "1", "--log-level", "INFO"]
    log_path = tmp_path / "agent.log"
    server.publish_model(model_bytes)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env={k: v for k, v in os.environ.items() if k != "FEDGE_MQTT_PASSWORD"})
    try:
        wait_until(lambda: server.has_status("dev-cli", "online") or process.poll() is not None,
                   "the agent process to come online")
        assert process.poll() is None, log_path.read_text()
        task = server.publish_task(model_hash, 1)
        device, payload = server.next_update()
        update = decode_update(payload, read_manifest(model_bytes), device_id="dev-cli")
        expected, _ = reference_delta(model_bytes, local_data, task, "dev-cli")
        for got, want in zip(update.tensors, expected, strict=True):
            np.testing.assert_array_equal(got, want)
        server.statuses.clear()
        process.send_signal(signal.SIGTERM)
        assert process.wait(TIMEOUT_S) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    wait_until(lambda: server.has_status("dev-cli", "offline"), "status 'offline'")
    assert "received SIGTERM" in log_path.read_text()


def exit_code(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """What the command exits with: its return value, or argparse's exit for a usage mistake."""
    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code


@pytest.mark.parametrize("arguments, message", [
    (["--broker", "http://localhost"], "scheme must be mqtt:// or mqtts://"),
    (["--broker", "mqtt://localhost:99999"], "port"),
    (["--data", "/nonexistent/data.npz"], "no such data file"),
    (["--device-id", "a/b"], "device id"),
    (["--tls-ca", "/nonexistent/ca.pem"], "TLS CA file"),
    (["--num-threads", "0"], "positive integer"),
])
def test_cli_rejects_bad_arguments_before_connecting(arguments, message, tmp_path, local_data, capsys):
    data_path = tmp_path / "local.npz"
    np.savez(data_path, x=local_data[0], y=local_data[1])
    defaults = {"--broker": "mqtt://127.0.0.1:1", "--fleet": "f", "--device-id": "d", "--data": str(data_path),
                "--cache-dir": str(tmp_path / "cache")}
    defaults.update(dict(zip(arguments[::2], arguments[1::2])))
    assert exit_code(cli_main, [item for pair in defaults.items() for item in pair]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1 and error.startswith("fedge-device: error: "), error


# ------------------------------------------------------------------------------ TLS and credentials


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[PrivateBroker, Path]]:
    """A broker that takes only TLS (self-signed certificate for 127.0.0.1) and users with passwords."""
    if not shutil.which("openssl") or not shutil.which("mosquitto_passwd"):
        pytest.fail("the TLS test needs openssl and mosquitto_passwd (Debian's openssl and mosquitto packages)")
    cert, key, passwords = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "passwords"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    for user, password in (("server", "srv-pass"), ("dev", "s3cret")):
        flags = ["-b"] if passwords.exists() else ["-c", "-b"]
        subprocess.run(["mosquitto_passwd", *flags, str(passwords), user, password], check=True, capture_output=True)
    broker = PrivateBroker(tmp_path, f"allow_anonymous false\npassword_file {passwords}\n"
                                     f"certfile {cert}\nkeyfile {key}\n")
    broker.start()
    yield broker, cert
    broker.stop()


def test_tls_with_password(tls_broker, fleet, local_data, model_bytes, model_hash, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="device_runtime")
    broker, cert = tls_broker
    server = Server(broker.host, broker.port, fleet, credentials=("server", "srv-pass"), tls_ca=str(cert))
    url = f"mqtts://{broker.host}:{broker.port}"
    agents = [DeviceAgent(url, fleet, device, local_data, cache_dir=tmp_path / device, username="dev",
                          password=password, tls_ca=str(cert), num_threads=1)
              for device, password in (("dev-tls", "s3cret"), ("dev-bad", "wrong"))]
    try:
        server.publish_model(model_bytes)
        for agent in agents:
            agent.start()
        wait_until(lambda: agents[0].ready, "the agent to connect over TLS")
        server.publish_task(model_hash, 1)
        device, payload = server.next_update()
        assert (device, decode_update(payload, read_manifest(model_bytes)).round) == ("dev-tls", 1)
        wait_until(lambda: any("broker refused the connection" in r.getMessage() for r in caplog.records),
                   "the wrong password to be refused")
        assert not agents[1].connected and agents[1].rounds_trained == []
    finally:
        for agent in agents:
            agent.stop(timeout=TIMEOUT_S)
        server.close()


def test_round_starts_from_the_published_global_weights(server, make_agent, model_bytes, model_hash, local_data):
    manifest = read_manifest(model_bytes)
    rng = np.random.default_rng(3)
    weights = [rng.normal(size=w.shape).astype(np.float32) for w in manifest.weights]
    payload = encode_weights(server.fleet, 5, model_hash, weights, manifest.metrics.variables, run_id="job-1")
    server.publish_model(model_bytes)
    server.publish(weights_topic(server.fleet), payload)
    make_agent("dev-w")
    task = server.publish_task(model_hash, 5, weights_hash=payload_hash(payload))

    _, update_payload = server.next_update()
    update = decode_update(update_payload, manifest, device_id="dev-w")
    expected = train_locally(TrainableModel(model_bytes, num_threads=1), local_data, epochs=task.work.epochs,
                             shuffle_seed=device_shuffle_seed(task.seed, "dev-w"),
                             learning_rate=task.work.learning_rate, initial_weights=weights)
    from_artifact, _ = reference_delta(model_bytes, local_data, task, "dev-w")
    for got, want in zip(update.tensors, expected.delta, strict=True):
        np.testing.assert_array_equal(got, want)
    assert any(not np.array_equal(a, b) for a, b in zip(expected.delta, from_artifact)), \
        "starting from other weights must give another delta"


def test_round_without_its_global_weights_fails_and_publishes_nothing(server, make_agent, model_bytes, model_hash,
                                                                      caplog):
    manifest = read_manifest(model_bytes)
    stale = encode_weights(server.fleet, 1, model_hash, [np.zeros(w.shape, np.float32) for w in manifest.weights],
                           manifest.metrics.variables, run_id="job-1")
    server.publish_model(model_bytes)
    server.publish(weights_topic(server.fleet), stale)  # last round's weights, not the ones the task names
    agent = make_agent("dev-s", model_fetch_timeout=1.0)
    server.publish_task(model_hash, 2, weights_hash="sha256:" + "ab" * 32)
    wait_until(lambda: agent.stats["rounds_failed"] == 1, "the round to fail for want of its weights")
    assert "global weights did not arrive" in caplog.text
    assert server.updates.empty() and agent.stats["updates_published"] == 0
