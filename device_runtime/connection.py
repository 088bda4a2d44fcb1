"""The device's MQTT connection: broker URL, TLS and credentials, persistent session, last will, PUBACK waits."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt

logger = logging.getLogger(__name__)

RECONNECT_MIN_DELAY_S = 1
RECONNECT_MAX_DELAY_S = 30
KEEPALIVE_S = 30
_REMEMBERED_ACKS = 1024


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker listens and whether the connection uses TLS."""

    host: str
    port: int
    tls: bool


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse 'mqtt://host[:port]' (default 1883) or 'mqtts://host[:port]' (TLS, default 8883)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"broker URL {url!r}: only mqtt[s]://host[:port] is supported")
    if parts.username or parts.password:
        raise ValueError(f"broker URL {url!r}: give credentials with --username/--password, not in the URL")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"broker URL {url!r}: the port must be a number from 1 to 65535")
    tls = parts.scheme == "mqtts"
    return BrokerAddress(parts.hostname, port if port is not None else (8883 if tls else 1883), tls)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS: the CA bundle (None: system CAs) and an optional client certificate and key."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def check(self) -> None:
        """Raise ValueError naming any file that is missing, or a key without a certificate."""
        for what, path in (("CA file", self.ca), ("client certificate", self.cert), ("client key", self.key)):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"TLS {what} {path!r} does not exist")
        if self.key is not None and self.cert is None:
            raise ValueError("a TLS client key needs a client certificate (--tls-cert)")


@dataclass(frozen=True)
class BrokerSettings:
    """A broker and how to log in to it: 'mqtt[s]://host[:port]', user name and password, TLS files."""

    url: str
    username: str | None = None
    password: str | None = None
    tls: TlsFiles | None = None

    def __post_init__(self) -> None:
        """ValueError for a bad URL, a password without a user name, or a missing TLS file."""
        parse_broker_url(self.url)
        if self.password is not None and self.username is None:
            raise ValueError("a broker password needs a user name")
        if self.tls is not None:
            self.tls.check()

    @property
    def address(self) -> BrokerAddress:
        """Host, port and whether TLS is used."""
        return parse_broker_url(self.url)


class _QuietRetryFilter(logging.Filter):
    """Demote paho's 'Client is not connected' error, logged on every reconnect attempt, to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and str(record.msg).startswith("Client is not connected"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def new_client(broker: BrokerAddress, client_id: str, *, will: tuple[str, bytes], username: str | None = None,
               password: str | None = None, tls_files: TlsFiles | None = None) -> mqtt.Client:
    """A paho-mqtt v2 client as a device uses it: MQTT 3.1.1, persistent session, retained QoS 1 last will, TLS."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         clean_session=False, protocol=mqtt.MQTTv311)
    paho_logger = logging.getLogger("device_runtime.paho")
    if not any(isinstance(f, _QuietRetryFilter) for f in paho_logger.filters):
        paho_logger.addFilter(_QuietRetryFilter())
    client.enable_logger(paho_logger)
    client.will_set(will[0], will[1], qos=1, retain=True)
    if username is not None:
        client.username_pw_set(username, password)
    if broker.tls or tls_files is not None:
        files = tls_files or TlsFiles()
        files.check()
        client.tls_set(ca_certs=files.ca, certfile=files.cert, keyfile=files.key)
    return client


class MqttConnection:
    """A paho-mqtt v2 client with a persistent session, a last will and reconnects with back-off."""

    def __init__(
        self,
        broker: BrokerAddress,
        client_id: str,
        *,
        will: tuple[str, bytes],
        on_connect: Callable[[], None],
        on_message: Callable[[str, bytes], None],
        on_subscribed: Callable[[int], None] | None = None,
        username: str | None = None,
        password: str | None = None,
        tls_files: TlsFiles | None = None,
    ) -> None:
        """Configure the client; nothing touches the network before start()."""
        self.broker = broker
        self._on_connect_hook = on_connect
        self._on_message_hook = on_message
        self._on_subscribed_hook = on_subscribed
        self._stopping = False
        self.connected = threading.Event()
        self._acks: OrderedDict[int, None] = OrderedDict()
        self._ack_condition = threading.Condition()
        client = new_client(broker, client_id, will=will, username=username, password=password,
                            tls_files=tls_files)
        client.reconnect_delay_set(RECONNECT_MIN_DELAY_S, RECONNECT_MAX_DELAY_S)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_connect_fail = self._handle_connect_fail
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        self._client = client

    def start(self) -> None:
        """Connect in the background; paho's network thread retries with back-off until it succeeds."""
        logger.info("connecting to %s:%d%s", self.broker.host, self.broker.port, " (TLS)" if self.broker.tls else "")
        self._client.connect_async(self.broker.host, self.broker.port, keepalive=KEEPALIVE_S)
        self._client.loop_start()

    def subscribe(self, topics: Iterable[str], qos: int = 1) -> int | None:
        """Subscribe to `topics`; returns the SUBSCRIBE's mid, None while disconnected (re-subscribe on connect)."""
        topics = list(topics)
        if not topics:
            return None
        rc, mid = self._client.subscribe([(topic, qos) for topic in topics])
        return mid if rc == mqtt.MQTT_ERR_SUCCESS else None

    def unsubscribe(self, topic: str) -> None:
        """Drop a subscription (from the persistent session too)."""
        self._client.unsubscribe(topic)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """Queue a message; QoS 1 messages survive reconnects (paho resends them). Returns its mid."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == mqtt.MQTT_ERR_NO_CONN:
            logger.info("not connected: %s is queued and goes out after the reconnect", topic)
        elif info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"publishing to {topic} failed: {mqtt.error_string(info.rc)}")
        return info.mid

    def wait_for_ack(self, mid: int, timeout: float, abort: threading.Event | None = None) -> bool:
        """Wait until the broker acknowledged message `mid` (PUBACK); False on timeout or abort."""
        deadline = time.monotonic() + timeout
        with self._ack_condition:
            while mid not in self._acks:
                left = deadline - time.monotonic()
                if left <= 0 or (abort is not None and abort.is_set()):
                    return False
                self._ack_condition.wait(min(left, 0.1))
            del self._acks[mid]
            return True

    def close(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        """Publish `final` (retained, QoS 1) if connected, then disconnect cleanly and stop the network thread."""
        self._stopping = True
        if final is not None and self.connected.is_set():
            mid = self.publish(final[0], final[1], qos=1, retain=True)
            if not self.wait_for_ack(mid, timeout):
                logger.warning("no PUBACK for %s within %.0f s", final[0], timeout)
        self._client.disconnect()
        self._client.loop_stop()
        self.connected.clear()

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        """paho on_connect: log the outcome and run the agent's hook (status, subscriptions)."""
        if reason_code.is_failure:
            logger.error("broker refused the connection: %s; retrying", reason_code)
            return
        logger.info("connected to %s:%d (session present: %s)", self.broker.host, self.broker.port,
                    flags.session_present)
        self.connected.set()
        try:
            self._on_connect_hook()
        except Exception:
            logger.exception("on-connect handler failed")

    def _handle_connect_fail(self, client, userdata) -> None:
        """paho on_connect_fail: the broker is unreachable; paho retries with back-off."""
        logger.warning("cannot reach the broker at %s:%d; retrying with back-off %d..%d s",
                       self.broker.host, self.broker.port, RECONNECT_MIN_DELAY_S, RECONNECT_MAX_DELAY_S)

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        """paho on_disconnect: log it; paho's loop reconnects with back-off unless we are stopping."""
        self.connected.clear()
        if not self._stopping:
            logger.warning("disconnected from broker (%s); reconnecting with back-off %d..%d s",
                           reason_code, RECONNECT_MIN_DELAY_S, RECONNECT_MAX_DELAY_S)

    def _handle_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        """paho on_message: hand topic and payload to the agent (which must not block)."""
        try:
            self._on_message_hook(message.topic, bytes(message.payload))
        except Exception:
            logger.exception("message handler failed for %s", message.topic)

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        """paho on_subscribe: log refused subscriptions and tell the agent which SUBSCRIBE was acknowledged."""
        refused = [code for code in reason_codes if code.is_failure]
        if refused:
            logger.error("broker refused a subscription (mid %d): %s (check the topic ACLs)", mid, refused)
        elif self._on_subscribed_hook is not None:
            self._on_subscribed_hook(mid)

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        """paho on_publish: remember the acknowledged mid for wait_for_ack."""
        with self._ack_condition:
            self._acks[mid] = None
            self._acks.move_to_end(mid)
            while len(self._acks) > _REMEMBERED_ACKS:
                self._acks.popitem(last=False)
            self._ack_condition.notify_all()
