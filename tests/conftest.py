"""Shared fixtures: a real mosquitto broker on a free localhost port, and a fresh fleet id per test."""

from __future__ import annotations

import uuid
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


@pytest.fixture
def fleet() -> str:
    """A fresh fleet id per test, so retained messages and sessions of other tests never interfere."""
    return f"t{uuid.uuid4().hex[:10]}"
