"""The fedge server: federated rounds over MQTT (check-in, over-selection, deadlines, streaming aggregation).

`MqttExecutor` runs any fedge.learning process's client work on devices; `FederatedServer`
adds the round loop (selection, evaluation, checkpoints, metrics log, resume); `fedge serve`
is the command line. docs/server.md describes the rounds, docs/protocol.md the messages.
"""

from fedge.server.mqtt_executor import MqttExecutor, RoundInterruptedError
from fedge.server.reports import DROP_REASONS
from fedge.server.rounds import FederatedServer, ServerSettings

__all__ = ["DROP_REASONS", "FederatedServer", "MqttExecutor", "RoundInterruptedError", "ServerSettings"]
