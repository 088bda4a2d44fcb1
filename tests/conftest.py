"""Shared fixtures: a real mosquitto broker on a free localhost port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fedge.broker import BrokerError, EmbeddedBroker


@pytest.fixture(scope="session")
def mosquitto_broker() -> Iterator[tuple[str, int]]:
    """Start a private mosquitto on 127.0.0.1:<free port> for the session; yields (host, port)."""
    try:
        broker = EmbeddedBroker("mosquitto").start()
    except BrokerError as error:
        pytest.fail(f"the tests need a real MQTT broker: {error} (.ci/run installs it)", pytrace=False)
    try:
        yield broker.host, broker.port
    finally:
        broker.stop()
