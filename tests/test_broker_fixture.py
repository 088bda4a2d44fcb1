"""The mosquitto_broker fixture runs a real broker that delivers a QoS 1 message."""

import threading
import uuid

import paho.mqtt.client as mqtt
import pytest

pytestmark = pytest.mark.device


def _start(client: mqtt.Client, host: str, port: int) -> mqtt.Client:
    """Connect `client` to the broker and start its network loop."""
    client.connect(host, port, keepalive=30)
    client.loop_start()
    return client


def _new_client(role: str) -> mqtt.Client:
    """A paho-mqtt client using the version 2 callback API and a unique client id."""
    return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{role}-{uuid.uuid4().hex[:12]}")


def test_qos1_publish_is_received(mosquitto_broker) -> None:
    host, port = mosquitto_broker
    topic = f"fedge/test/{uuid.uuid4().hex}"
    subscribed, got_message = threading.Event(), threading.Event()
    granted, received = [], []

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        granted.extend(reason_codes)
        subscribed.set()

    def on_message(client, userdata, message):
        received.append(message)
        got_message.set()

    subscriber = _new_client("sub")
    subscriber.on_connect = lambda client, userdata, flags, reason, properties: client.subscribe(topic, qos=1)
    subscriber.on_subscribe = on_subscribe
    subscriber.on_message = on_message
    clients = [_start(subscriber, host, port)]
    try:
        assert subscribed.wait(10), "subscription was not acknowledged"
        publisher = _start(_new_client("pub"), host, port)
        clients.append(publisher)
        info = publisher.publish(topic, b"hello fedge", qos=1)
        info.wait_for_publish(timeout=10)
        assert info.is_published(), "PUBACK not received"
        assert got_message.wait(10), "message was not delivered"
    finally:
        for client in clients:
            client.disconnect()
            client.loop_stop()

    assert [code.value for code in granted] == [1], "broker did not grant QoS 1"
    (message,) = received
    assert message.topic == topic
    assert message.payload == b"hello fedge"
    assert message.qos == 1
