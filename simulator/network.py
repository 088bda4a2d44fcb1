"""Many paho MQTT clients on one asyncio loop thread, through paho's external-loop API (no thread per client).

Each `LoopClient` registers its socket with the loop (`add_reader` / `add_writer` calling
paho's `loop_read` / `loop_write`) and the loop calls `loop_misc` on all of them once a second
for keep-alives. Every paho call for a client happens on its loop thread, except the blocking
TCP (and TLS) connect, which runs on a shared connector thread pool so a slow broker does not
stall the other clients of the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

import paho.mqtt.client as mqtt

from device_runtime.connection import KEEPALIVE_S, BrokerAddress, TlsFiles, new_client

logger = logging.getLogger(__name__)

MISC_INTERVAL_S = 1.0
_T = TypeVar("_T")


class LoopThread:
    """An asyncio event loop running in a daemon thread, shared by many clients."""

    def __init__(self, name: str) -> None:
        """Create the loop; start() runs it."""
        self.loop = asyncio.new_event_loop()
        self.clients: set[LoopClient] = set()
        self._ident: int | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Run the loop in its thread."""
        self._thread.start()

    def submit(self, coroutine: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Run `coroutine` on the loop; a future for its result, usable from any thread."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def in_loop(self, function: Callable[..., Any], *args: Any) -> None:
        """Call `function(*args)` now when on the loop thread, else soon on it."""
        if threading.get_ident() == self._ident:
            function(*args)
        else:
            self.loop.call_soon_threadsafe(function, *args)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop, wait for its thread and close it."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()

    def _run(self) -> None:
        """Thread body: run the keep-alive sweep and everything scheduled until stop()."""
        self._ident = threading.get_ident()
        asyncio.set_event_loop(self.loop)
        self.loop.create_task(self._misc())
        self.loop.run_forever()
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        self.loop.run_until_complete(asyncio.sleep(0))

    async def _misc(self) -> None:
        """Call loop_misc (keep-alive pings, dead-connection detection) on every open client once a second."""
        while True:
            await asyncio.sleep(MISC_INTERVAL_S)
            for client in list(self.clients):
                client.misc()


class LoopClient:
    """One device's paho client driven by a LoopThread; awaitable connect, publish (PUBACK) and subscribe (SUBACK)."""

    def __init__(self, loop_thread: LoopThread, connector: concurrent.futures.Executor, broker: BrokerAddress,
                 client_id: str, *, will: tuple[str, bytes], on_message: Callable[[str, bytes], None],
                 on_connection_lost: Callable[[], None], username: str | None = None, password: str | None = None,
                 tls_files: TlsFiles | None = None) -> None:
        """Configure the client as a device agent does (new_client); nothing touches the network before connect()."""
        self._thread, self._connector, self.broker, self.client_id = loop_thread, connector, broker, client_id
        self._on_message_hook, self._on_lost_hook = on_message, on_connection_lost
        self._client = new_client(broker, client_id, will=will, username=username, password=password,
                                  tls_files=tls_files)
        self._client.connect_async(broker.host, broker.port, keepalive=KEEPALIVE_S)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_publish = self._handle_ack
        self._client.on_subscribe = self._handle_subscribe
        self._client.on_socket_open = self._socket_open
        self._client.on_socket_close = self._socket_close
        self._client.on_socket_register_write = self._register_write
        self._client.on_socket_unregister_write = self._unregister_write
        self._fd: int | None = None
        self._closed = asyncio.Event()
        self._connack: asyncio.Future[bool] | None = None
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._leaving = False
        self.connected = False

    async def connect(self) -> bool:
        """Open the connection and wait for the CONNACK; False when the broker is unreachable or refuses."""
        loop = self._thread.loop
        self._leaving = False
        self._connack = loop.create_future()
        opening = loop.run_in_executor(self._connector, self._client.reconnect)
        try:
            await asyncio.shield(opening)
        except asyncio.CancelledError:
            await asyncio.gather(opening, return_exceptions=True)  # its socket is registered before anyone closes it
            raise
        except (OSError, ValueError) as error:
            logger.debug("%s: cannot reach the broker at %s:%d: %s", self.client_id, self.broker.host,
                         self.broker.port, error)
            return False
        try:
            return await asyncio.wait_for(self._connack, KEEPALIVE_S)
        except asyncio.TimeoutError:
            logger.warning("%s: no CONNACK within %d s", self.client_id, KEEPALIVE_S)
            self.drop()
            return False

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> asyncio.Future[None]:
        """Queue a QoS 1 message (paho resends it after a reconnect); the future completes on its PUBACK."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise RuntimeError(f"publishing to {topic} failed: {mqtt.error_string(info.rc)}")
        acked = self._thread.loop.create_future()
        self._acks[info.mid] = acked
        return acked

    def subscribe(self, topics: Iterable[str]) -> asyncio.Future[None] | None:
        """Subscribe at QoS 1; a future for the SUBACK, None while disconnected (re-subscribe on connect)."""
        topics = list(topics)
        if not topics:
            return None
        rc, mid = self._client.subscribe([(topic, 1) for topic in topics])
        if rc != mqtt.MQTT_ERR_SUCCESS:
            return None
        acked = self._acks[mid] = self._thread.loop.create_future()
        return acked

    def unsubscribe(self, topic: str) -> None:
        """Drop a subscription (from the persistent session too)."""
        self._client.unsubscribe(topic)

    async def disconnect(self, timeout: float = 5.0) -> None:
        """Send DISCONNECT (the broker then discards the last will) and wait for paho to close the socket."""
        self._leaving = True
        if self._fd is not None:
            self._client.disconnect()
            try:
                await asyncio.wait_for(self._closed.wait(), timeout)
            except asyncio.TimeoutError:
                logger.warning("%s: DISCONNECT not sent within %.0f s; dropping the connection", self.client_id,
                               timeout)
                self.drop()
        self.connected = False

    def drop(self) -> None:
        """Vanish: close the TCP connection without DISCONNECT, so the broker publishes the last will."""
        self._leaving = True
        sock = self._client.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # paho's next loop_read sees the end of stream and closes it
            except OSError:
                pass  # already shut down
        self.connected = False

    def misc(self) -> None:
        """paho's periodic work: keep-alive pings, and closing a connection the broker stopped answering."""
        self._client.loop_misc()

    # -- paho callbacks, on the loop thread (socket open / register write may come from the connector) ----

    def _socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        """Watch the new socket for reads."""
        self._thread.in_loop(self._watch, sock.fileno())

    def _watch(self, fd: int) -> None:
        """Register `fd` with the loop (on the loop thread)."""
        self._fd = fd
        self._closed.clear()
        self._thread.loop.add_reader(fd, self._client.loop_read)
        self._thread.clients.add(self)

    def _socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        """Stop watching the socket, before paho closes it (its number may be reused at once)."""
        if self._fd is not None:
            self._thread.loop.remove_reader(self._fd)
            self._thread.loop.remove_writer(self._fd)
            self._fd = None
        self._closed.set()
        self._thread.clients.discard(self)

    def _register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        """paho has bytes to send: call loop_write when the socket is writable."""
        self._thread.in_loop(self._want_write, True)

    def _unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        """paho's output queue is empty."""
        self._thread.in_loop(self._want_write, False)

    def _want_write(self, wanted: bool) -> None:
        """Add or remove the writer of the open socket (on the loop thread)."""
        if self._fd is None:
            return
        if wanted:
            self._thread.loop.add_writer(self._fd, self._client.loop_write)
        else:
            self._thread.loop.remove_writer(self._fd)

    def _handle_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                        properties: Any) -> None:
        """CONNACK: complete connect()."""
        if reason_code.is_failure:
            logger.error("%s: the broker refused the connection: %s", self.client_id, reason_code)
        self.connected = not reason_code.is_failure
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(self.connected)

    def _handle_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                           properties: Any) -> None:
        """The connection closed: tell the device unless it chose to leave."""
        was_connected, self.connected = self.connected, False
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(False)
        if was_connected and not self._leaving:
            logger.debug("%s: connection lost (%s)", self.client_id, reason_code)
            self._on_lost_hook()

    def _handle_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        """Hand topic and payload to the device."""
        try:
            self._on_message_hook(message.topic, bytes(message.payload))
        except Exception:
            logger.exception("%s: message handler failed for %s", self.client_id, message.topic)

    def _handle_ack(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        """PUBACK: complete the publish future."""
        acked = self._acks.pop(mid, None)
        if acked is not None and not acked.done():
            acked.set_result(None)

    def _handle_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any,
                          properties: Any) -> None:
        """SUBACK: complete the subscribe future; log refused topics (check the ACLs)."""
        refused = [code for code in reason_codes if code.is_failure]
        if refused:
            logger.error("%s: the broker refused a subscription: %s (check the topic ACLs)", self.client_id, refused)
        self._handle_ack(client, userdata, mid, None, properties)
