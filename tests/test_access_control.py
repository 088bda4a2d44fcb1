"""Broker access control from `fedge broker-config` on a real mosquitto: TLS from the generated CA, per-device
passwords, topic ACLs, anonymous clients refused; and a whole round with signed tasks (fedge server + devices).

Under MQTT 3.1.1 a broker drops a publish the ACL denies without telling the client (the PUBACK still
comes), so the tests show a forged message never reaches whoever subscribes to its topic.
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_runtime.agent import DeviceAgent
from device_runtime.connection import BrokerSettings, TlsFiles
from device_runtime.protocol import decode_status, encode_status
from device_runtime.protocol.topics import (model_topic, status_topic, status_wildcard, task_topic, update_topic,
                                            update_wildcard, weights_topic)
from device_runtime.signing import key_id, load_public_key, load_signing_key
from fedge.broker import accepts, find_mosquitto, free_port
from fedge.broker_config import SERVER_USER, BrokerFiles, write_broker_config
from fedge.cli import main as fedge_main
from fedge.server import MqttExecutor
from fedge.simulation.datasets import ClientData
from simulator import Fleet
from test_device_agent import _user_name, wait_until
from test_server import artifact, make_process, toy_data  # noqa: F401 (artifact is a fixture)

TIMEOUT_S = 20.0
FLEET = "acl"
DEVICES = ["dev-1", "dev-2", "dev-3"]
QUIET_S = 1.0  # how long "nothing else arrives" is watched for, after a later message on the same connection did


class SecureBroker:
    """mosquitto running the configuration `write_broker_config` generated (plus, for the test, the user to run as)."""

    def __init__(self, directory: Path, client_certs: bool = False) -> None:
        self.port = free_port()
        self.files: BrokerFiles = write_broker_config(directory, FLEET, DEVICES, hostnames=["127.0.0.1"],
                                                      port=self.port, bind="127.0.0.1", client_certs=client_certs)
        # As root (CI), mosquitto would switch to user 'mosquitto', who cannot read the 0600 files written here.
        config = directory / "test.conf"
        config.write_text(self.files.config.read_text() + f"user {_user_name()}\nlog_dest stderr\n")
        self.log = directory / "mosquitto.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([find_mosquitto(), "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self.process.poll() is not None or accepts("127.0.0.1", self.port),
                   f"mosquitto on port {self.port}")
        assert self.process.poll() is None, self.log.read_text()

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(TIMEOUT_S)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    broker = SecureBroker(tmp_path_factory.mktemp("secure-broker"))
    yield broker
    broker.stop()


class Client:
    """A raw paho client (MQTT 3.1.1, TLS): records its CONNACK (None: none came), its SUBACKs and the live messages
    it receives (retained ones that a subscription replays, with the RETAIN flag set, are left out)."""

    def __init__(self, broker: SecureBroker, user: str | None, password: str | None = None, *,
                 ca: Path | None = None, cert: tuple[Path, Path] | None = None,
                 will: tuple[str, bytes] | None = None, timeout: float = TIMEOUT_S,
                 client_id: str | None = None) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311,
                                  client_id=client_id or f"test-{uuid.uuid4().hex[:10]}")
        if user is not None:
            self.client.username_pw_set(user, password if password is not None else broker.files.passwords[user])
        self.client.tls_set(ca_certs=str(ca or broker.files.ca_cert),
                            certfile=None if cert is None else str(cert[0]), keyfile=None if cert is None else str(cert[1]))
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connack: mqtt.ReasonCode | None = None
        self.granted: list[list[str]] = []
        self._answered = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.granted.append([str(code) for code in codes])
        self.client.on_message = self._on_message
        self.disconnects = 0
        self.client.on_disconnect = self._on_disconnect
        self.client.connect("127.0.0.1", broker.port, keepalive=30)
        self.client.loop_start()
        self._answered.wait(timeout)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connack = reason_code
        self._answered.set()

    def _on_disconnect(self, *args) -> None:
        self.disconnects += 1
        self._answered.set()  # refused after the handshake: stop waiting

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        if not message.retain:
            self.messages.put((message.topic, bytes(message.payload)))

    def subscribe(self, *topics: str) -> None:
        """Subscribe and wait for the SUBACK."""
        count = len(self.granted)
        self.client.subscribe([(topic, 1) for topic in topics])
        wait_until(lambda: len(self.granted) > count, f"SUBACK for {topics}")

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the PUBACK (which a denied publish gets too)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(TIMEOUT_S)
        assert info.is_published(), f"no PUBACK for {topic}"

    def received(self, quiet: float = 0.0) -> list[tuple[str, bytes]]:
        """Everything received so far, after `quiet` more seconds."""
        time.sleep(quiet)
        items = []
        while not self.messages.empty():
            items.append(self.messages.get_nowait())
        return items

    def next_message(self) -> tuple[str, bytes]:
        try:
            return self.messages.get(timeout=TIMEOUT_S)
        except queue.Empty:
            pytest.fail(f"nothing received within {TIMEOUT_S:.0f} s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients(broker: SecureBroker) -> Iterator[Callable[..., Client]]:
    """Connected Clients of the module's broker; disconnected at teardown."""
    made: list[Client] = []

    def make(user: str | None, password: str | None = None, **options) -> Client:
        client = Client(broker, user, password, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


# ------------------------------------------------------------------------------------- who may connect


def test_accounts_connect_and_anonymous_or_wrong_passwords_are_refused(clients):
    assert clients(SERVER_USER).connack == 0 and clients("dev-1").connack == 0
    for user, password in ((None, None), ("dev-1", "wrong"), ("dev-1", ""), ("intruder", "x")):
        refused = clients(user, password)
        assert refused.connack.is_failure and str(refused.connack) == "Not authorized", (user, password)
        assert not refused.client.is_connected()


def test_a_client_that_does_not_trust_the_fleet_ca_fails_tls(broker, tmp_path):
    other = write_broker_config(tmp_path / "other", FLEET, DEVICES)  # another CA, same names
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        Client(broker, "dev-1", broker.files.passwords["dev-1"], ca=other.ca_cert)
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as plain:  # no TLS: no CONNACK either
        plain.sendall(bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 30, 0, 0]))
        plain.settimeout(5)
        try:
            answer = plain.recv(4)
        except (ConnectionResetError, socket.timeout):
            answer = b""
        assert not answer.startswith(b"\x20"), "the TLS listener answered a plain-TCP CONNECT"


def test_client_certificates_when_required(tmp_path):
    broker = SecureBroker(tmp_path, client_certs=True)
    try:
        cert = broker.files.client_certs["dev-1"]
        assert Client(broker, "dev-1", cert=cert).connack == 0
        try:  # the password alone is not enough: the handshake fails (TLS 1.2) or the broker drops the connection
            without = Client(broker, "dev-1", timeout=5.0)
        except (ssl.SSLError, OSError):
            pass
        else:
            assert without.connack is None and not without.client.is_connected()
    finally:
        broker.stop()


# --------------------------------------------------------------------------------- what each may do


def test_a_device_cannot_take_over_the_servers_session_by_its_client_id(clients):
    server_session = f"fedge-server-{FLEET}"  # the persistent session fedge serve keeps its queued updates in
    server = clients(SERVER_USER, client_id=server_session)
    intruder = clients("dev-1", client_id=server_session)
    assert server.connack == 0 and intruder.connack == 0
    time.sleep(1.0)  # a broker that honoured the intruder's client id would have dropped the server by now
    assert server.disconnects == 0 and server.client.is_connected()


def test_a_device_cannot_publish_as_another_device_nor_as_the_server(clients):
    server, victim, forger = clients(SERVER_USER), clients("dev-2"), clients("dev-1")
    server.subscribe(update_wildcard(FLEET), status_wildcard(FLEET))
    victim.subscribe(task_topic(FLEET), weights_topic(FLEET), f"fedge/{FLEET}/model/+")
    forged_hash = "sha256:" + "cd" * 32
    forger.publish(update_topic(FLEET, "dev-2"), b"forged update")
    forger.publish(status_topic(FLEET, "dev-2"), encode_status("offline"), retain=True)
    forger.publish(task_topic(FLEET), b"forged task", retain=True)
    forger.publish(weights_topic(FLEET), b"forged weights", retain=True)
    forger.publish(model_topic(FLEET, forged_hash), b"forged model", retain=True)
    forger.publish(update_topic(FLEET, "dev-1"), b"its own update")  # the broker handles one connection in order
    assert server.next_message() == (update_topic(FLEET, "dev-1"), b"its own update")
    assert server.received(QUIET_S) == [] and victim.received() == []


def test_a_device_cannot_read_another_devices_update_or_status(clients):
    server, reader, writer = clients(SERVER_USER), clients("dev-1"), clients("dev-2")
    server.subscribe(update_wildcard(FLEET))
    reader.subscribe(update_wildcard(FLEET), update_topic(FLEET, "dev-2"), status_wildcard(FLEET))
    writer.publish(status_topic(FLEET, "dev-2"), encode_status("online"), retain=True)
    writer.publish(update_topic(FLEET, "dev-2"), b"private update")
    assert server.next_message() == (update_topic(FLEET, "dev-2"), b"private update")
    assert reader.received(QUIET_S) == []


def test_a_devices_last_will_reaches_the_server_only_on_its_own_status_topic(clients):
    server = clients(SERVER_USER)
    server.subscribe(status_wildcard(FLEET))
    server.received(QUIET_S)  # retained statuses of earlier tests
    honest = clients("dev-3", will=(status_topic(FLEET, "dev-3"), encode_status("offline")))
    forger = clients("dev-1", will=(status_topic(FLEET, "dev-2"), encode_status("offline")))
    for client in (forger, honest):  # vanish without DISCONNECT: the broker publishes the wills
        client.client.loop_stop()
        client.client.socket().shutdown(socket.SHUT_RDWR)
    topic, payload = server.next_message()
    assert (topic, decode_status(payload)["state"]) == (status_topic(FLEET, "dev-3"), "offline")
    assert server.received(QUIET_S) == []


def test_broker_config_command_adds_a_device_and_keeps_the_ca_and_passwords(tmp_path, capsys):
    directory = tmp_path / "broker"
    assert fedge_main(["broker-config", str(directory), "--fleet", "f", "--devices", "a", "b"]) == 0
    ca, first = (directory / "ca.crt").read_bytes(), write_broker_config(directory, "f", ["a", "b"]).passwords
    (tmp_path / "devices.txt").write_text("b\nc\n")
    assert fedge_main(["broker-config", str(directory), "--fleet", "f", "--devices", "a",
                       "--devices-file", str(tmp_path / "devices.txt")]) == 0
    again = write_broker_config(directory, "f", ["a", "b", "c"]).passwords
    assert (directory / "ca.crt").read_bytes() == ca
    assert {user: again[user] for user in first} == first and set(again) == {SERVER_USER, "a", "b", "c"}
    assert (directory / "passwords").stat().st_mode & 0o777 == 0o600
    assert "user c\ntopic read fedge/f/task" in (directory / "acl").read_text()
    assert "mosquitto -c" in capsys.readouterr().out
    assert fedge_main(["broker-config", str(directory), "--fleet", "f", "--devices", "a:b"]) == 2
    assert "broker user names use only" in capsys.readouterr().err


def test_signing_key_command_writes_a_pair_that_fedge_serve_loads_and_refuses_a_bad_key(tmp_path, artifact,
                                                                                        capsys):
    private = tmp_path / "keys" / "task-signing.pem"
    private.parent.mkdir()
    assert fedge_main(["signing-key", str(private)]) == 0
    public = tmp_path / "keys" / "task-signing.pub.pem"
    kid = key_id(load_public_key(public))
    assert kid in capsys.readouterr().out and key_id(load_signing_key(private).public_key()) == kid
    assert fedge_main(["signing-key", str(private)]) == 2  # never overwrites a key
    assert "exists; a signing key is never overwritten" in capsys.readouterr().err and key_id(load_signing_key(private).public_key()) == kid
    model = tmp_path / "model.tflite"
    model.write_bytes(artifact.tflite_bytes)
    common = ["serve", str(model), "--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--rounds", "1",
              "--clients-per-round", "1", "--checkpoint-dir", str(tmp_path / "ckpt")]
    assert fedge_main([*common, "--signing-key", str(public)]) == 2  # a public key where the private one goes
    assert "signing key" in capsys.readouterr().err


# ------------------------------------------------------------------- whole rounds, signed tasks included


def test_devices_train_a_signed_round_with_the_fedge_server_over_tls_with_their_credentials(broker, artifact,
                                                                                          tmp_path):
    key = Ed25519PrivateKey.generate()
    files = broker.files
    agents = [DeviceAgent(broker.url, FLEET, device, toy_data(12, seed=i), cache_dir=tmp_path / device,
                          username=device, password=files.passwords[device], tls_ca=str(files.ca_cert),
                          server_public_key=key.public_key(), num_threads=1)
              for i, device in enumerate(DEVICES[:2])]
    server_login = BrokerSettings(broker.url, SERVER_USER, files.passwords[SERVER_USER], TlsFiles(str(files.ca_cert)))
    executor = MqttExecutor(server_login, FLEET, min_reports=2, deadline_s=30, signing_key=key)
    try:
        for agent in agents:
            agent.start()
        with executor:
            for agent in agents:
                wait_until(lambda: agent.ready, f"{agent.device_id} to connect over TLS")
            process = make_process(artifact, executor)
            state, metrics = process.next(process.initialize(), DEVICES[:2])
    finally:
        for agent in agents:
            agent.stop(timeout=TIMEOUT_S)
    assert state.round_num == 1 and metrics["distributor"]["accepted"] == 2
    assert metrics["distributor"]["dropped"] == {}
    assert [agent.stats["updates_published"] for agent in agents] == [1, 1]


def _fleet(broker_url: str, fleet: str, public_key) -> Fleet:
    rng = np.random.default_rng(0)
    clients = ClientData.from_arrays({f"c{i}": toy_data(int(rng.integers(6, 12)), seed=i) for i in range(3)})
    return Fleet.from_scenario({"fleet": fleet, "seed": 0, "groups": [{"name": "a", "count": 3}]}, broker_url,
                               client_data=clients, workers=1, server_public_key=public_key)


def test_simulated_devices_verify_tasks_with_the_same_rule(mosquitto_broker, artifact, caplog):
    caplog.set_level(logging.WARNING, logger="device_runtime")
    host, port = mosquitto_broker
    url, fleet_id, key = f"mqtt://{host}:{port}", f"sig{uuid.uuid4().hex[:8]}", Ed25519PrivateKey.generate()
    fleet = _fleet(url, fleet_id, key.public_key())
    fleet.start()
    try:
        assert fleet.wait_connected(timeout=TIMEOUT_S)
        with MqttExecutor(url, fleet_id, min_reports=3, deadline_s=30, signing_key=key) as executor:
            process = make_process(artifact, executor)
            state, metrics = process.next(process.initialize(), fleet.device_ids)
        assert metrics["distributor"]["accepted"] == 3
        with MqttExecutor(url, fleet_id, min_reports=1, deadline_s=3,
                          signing_key=Ed25519PrivateKey.generate()) as impostor:
            process = make_process(artifact, impostor)
            _, refused = process.next(state, fleet.device_ids)  # the round fails; the weights stay
        assert (refused["distributor"]["outcome"], refused["distributor"]["accepted"]) == ("failed", 0)
    finally:
        fleet.stop()
    totals = fleet.totals()
    assert totals.rounds_trained == 3 and totals.updates_published == 3
    refusals = [r.getMessage() for r in caplog.records if f"refusing the task on {task_topic(fleet_id)}" in r.getMessage()]
    assert len(refusals) == 3 and all("this device trusts only server key" in line for line in refusals)
