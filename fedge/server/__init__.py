"""The fedge server: federated rounds over MQTT (check-in, over-selection, deadlines, streaming aggregation).

`MqttExecutor` runs any fedge.learning process's client work on devices; `FederatedServer`
adds the round loop (selection, evaluation, checkpoints, metrics log, resume); `fedge serve`
is the command line. docs/server.md describes the rounds, docs/protocol.md the messages.
"""

from fedge.learning.executors import RoundInterruptedError
from fedge.server.mqtt_executor import MqttExecutor
from fedge.server.reports import DropReason
from fedge.server.rounds import FederatedServer, ServerSettings

__all__ = ["DropReason", "FederatedServer", "MqttExecutor", "RoundInterruptedError", "ServerSettings"]
