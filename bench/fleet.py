"""Server and fleet: 1,000 simulated devices over Mosquitto, server aggregation throughput, bytes per round.

Prints three tables:

1. a fleet of simulated devices (simulator/scenarios/fleet_1000.toml, scaled to --devices)
   against an embedded Mosquitto and a FederatedServer with an MqttExecutor (goal
   --per-round reports, over-selection 1.3) running the digits CNN: the time until every
   device is connected and checked in, one line per round (configure, reporting, accepted,
   dropped), the median and max round time and its parts, the CPU time of this process and of
   Mosquitto, and the peak RSS (VmHWM) of both. The fleet, the model and the server are built
   from a job (fedge.job.build, as `fedge simulate` builds them). The first --rounds rounds ask
   for float32 updates, the next --rounds for int8 (a second job, resuming the same checkpoint).
2. the updates per second the server checks, decodes (ReportGate.check -> decode_update) and
   folds into its running sums (fedge.learning.process.aggregate_round, the WeightedMean of
   every executor) for the McMahan CNN (1,663,370 parameters), from --updates random deltas
   of the real size encoded as float32 and as int8, in one process; the aggregation's
   tracemalloc peak next to the model's float32 size; and the same work end to end over
   MQTT: a publisher process sends --mqtt-updates encoded updates through Mosquitto as fast as
   it can and an MqttExecutor round (paho, report queue, gate, aggregation) takes them in.
3. bytes per round for float32 and int8 updates: measured in (1) for the digits CNN, and for
   the McMahan CNN with --per-round reports from the payload sizes of (2).

    python bench/fleet.py [--devices 1000] [--per-round 100] [--rounds 5] [--updates 200] [--mqtt-updates 100]
"""

from __future__ import annotations

import argparse
import collections
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import tomllib

if TYPE_CHECKING:
    from device_runtime.manifest import Manifest
    from fedge.job import Job

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "simulator" / "scenarios" / "fleet_1000.toml"
MB = 1e6
MIB = 1024 * 1024
ENCODINGS = ("float32", "int8")
INGEST_RUN = "bench-ingest"  # the run id of the MQTT intake round, which the publisher's updates name


def proc_status_kb(pid: int | str, field: str) -> int:
    """A `kB` field (VmHWM, VmRSS) of /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def proc_cpu_s(pid: int | str) -> float:
    """User + system CPU seconds of a process (/proc/<pid>/stat, all its threads)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scaled_scenario(devices: int) -> dict:
    """fleet_1000.toml as a dict, its group counts scaled to `devices` in all (the last group takes the rest)."""
    with open(SCENARIO, "rb") as f:
        scenario = tomllib.load(f)
    groups = scenario["groups"]
    total = sum(group["count"] for group in groups)
    left = devices
    for group in groups[:-1]:
        group["count"] = max(1, round(group["count"] * devices / total))
        left -= group["count"]
    if left < 1:
        raise SystemExit(f"--devices {devices} is too few for {len(groups)} groups")
    groups[-1]["count"] = left
    return scenario


def convert(model, learning_rate: float, momentum: float, batch_size: int):
    """The trainable artifact of a Keras model (sparse categorical cross-entropy, SGD, accuracy)."""
    import keras

    from converters import convert_keras_model

    return convert_keras_model(model, loss="sparse_categorical_crossentropy",
                               optimizer=keras.optimizers.SGD(learning_rate, momentum=momentum),
                               batch_size=batch_size, metrics=["accuracy"])


# ------------------------------------------------------------------------------ 1. the fleet


def fleet_job(args: argparse.Namespace, encoding: str, rounds: int) -> Job:
    """The bench's job: the digits CNN over the scaled fleet, `rounds` rounds whose devices send `encoding` updates."""
    from device_runtime.protocol import ClientWork
    from fedge.job import ClientOptimizerSpec, DataSpec, FleetSpec, Job, ModelSpec, ProcessSpec, RoundsSpec
    from simulator.scenario import load_scenario

    scenario = load_scenario(scaled_scenario(args.devices))
    return Job(name="bench-fleet",
               model=ModelSpec("factory", "fedge.simulation.models:digits_cnn", "sparse_categorical_crossentropy",
                               batch_size=16, optimizer=ClientOptimizerSpec("sgd", 0.1, {"momentum": 0.9})),
               data=DataSpec(dataset="digits", partition="iid"),
               process=ProcessSpec(client_work=ClientWork(1, encoding=encoding)),
               rounds=RoundsSpec(count=rounds, clients_per_round=args.per_round,
                                 min_reports=args.min_reports or max(1, args.per_round // 2), deadline=args.deadline,
                                 checkin_wait=60.0, seed=args.seed),
               fleet=FleetSpec(scenario.fleet, scenario.groups))


def run_fleet(args: argparse.Namespace, workdir: Path) -> dict:
    """Broker, fleet and server in this process, built from a job as `fedge simulate` builds them; the first
    --rounds rounds with float32 updates, then the same server resumed for --rounds more with int8."""
    from device_runtime.connection import BrokerSettings
    from fedge.broker import EmbeddedBroker
    from fedge.job.build import build_executor, build_model, build_process, build_server
    from simulator.fleet import Fleet

    jobs = [fleet_job(args, encoding, (i + 1) * args.rounds) for i, encoding in enumerate(ENCODINGS)]
    job = jobs[0]
    artifact = build_model(job).artifact
    result: dict = {"num_parameters": artifact.manifest.num_parameters, "artifact_bytes": len(artifact.tflite_bytes),
                    "devices": job.fleet.num_devices, "min_reports": job.rounds.min_reports, "rounds": {}}
    setup_rss_kb = proc_status_kb("self", "VmRSS")
    with EmbeddedBroker("mosquitto") as broker:
        broker_pid = broker.pid  # the bench reads the broker's /proc entry
        fleet = Fleet.from_job(job, broker.url)
        scenario = fleet.scenario
        executor = build_executor(job, BrokerSettings(broker.url))
        executor.start()  # subscribed before the devices connect: every status is seen as it comes
        started = time.monotonic()
        fleet.start()
        connected_s = checked_in_s = None
        while connected_s is None or checked_in_s is None:
            now = time.monotonic() - started
            if now > args.connect_timeout:
                raise SystemExit(f"after {args.connect_timeout:.0f} s: {fleet.connected_count()} devices connected, "
                                 f"{len(executor.registry.available())} checked in, of {scenario.num_devices}")
            if connected_s is None and fleet.connected_count() == scenario.num_devices:
                connected_s = now
            if checked_in_s is None and len(executor.registry.available()) == scenario.num_devices:
                checked_in_s = now
            time.sleep(0.01)
        result.update(connected_s=connected_s, checked_in_s=checked_in_s,
                      connected_rss_kb=proc_status_kb("self", "VmRSS"), setup_rss_kb=setup_rss_kb,
                      broker_connected_rss_kb=proc_status_kb(broker_pid, "VmRSS"))
        print(f"# 1. {scenario.num_devices} devices ({', '.join(f'{g.count} {g.name}' for g in scenario.groups)}) "
              f"on Mosquitto; all connected after {connected_s:.2f} s, all checked in with the server after "
              f"{checked_in_s:.2f} s", flush=True)
        print(f"{'round':>5s} {'encoding':8s} {'selected':>8s} {'accepted':>8s} {'dropped':>16s} {'configure s':>11s} "
              f"{'reporting s':>11s} {'round s':>7s} {'up kB':>8s} {'device down kB':>14s} {'CPU s':>6s} "
              f"{'broker CPU s':>12s}", flush=True)
        marks = {"cpu": sum(os.times()[:2]), "broker_cpu": proc_cpu_s(broker_pid), "fleet": fleet.totals()}

        def on_round(record: dict) -> None:
            encoding = ENCODINGS[record["round"] // args.rounds]
            totals = fleet.totals()
            cpu, broker_cpu = sum(os.times()[:2]), proc_cpu_s(broker_pid)
            record = dict(record, encoding=encoding, cpu_s=cpu - marks["cpu"],
                          broker_cpu_s=broker_cpu - marks["broker_cpu"],
                          device_bytes_down=totals.bytes_down - marks["fleet"].bytes_down,
                          device_bytes_up=totals.bytes_up - marks["fleet"].bytes_up)
            marks.update(cpu=cpu, broker_cpu=broker_cpu, fleet=totals)
            result["rounds"].setdefault(encoding, []).append(record)
            dropped = ", ".join(f"{n} {reason}" for reason, n in record["dropped"].items()) or "0"
            print(f"{record['round'] + 1:>5d} {encoding:8s} {record['selected']:>8d} {record['accepted']:>8d} "
                  f"{dropped:>16s} {record['times']['configure']:>11.3f} {record['times']['reporting']:>11.3f} "
                  f"{record['seconds']:>7.3f} {record['bytes_up'] / 1e3:>8.1f} "
                  f"{record['device_bytes_down'] / 1e3:>14.1f} {record['cpu_s']:>6.2f} "
                  f"{record['broker_cpu_s']:>12.2f}", flush=True)

        try:
            with executor:  # each encoding's job resumes the checkpoint: same connection, report gate and registry
                for encoding_job in jobs:
                    process = build_process(encoding_job, artifact, executor)
                    build_server(encoding_job, process, executor, workdir / "checkpoints", None, None,
                                 on_round=on_round).run()
        finally:
            fleet.stop()
        result["broker_peak_kb"] = proc_status_kb(broker_pid, "VmHWM")
        log = broker.log_text()
        result["broker"] = ("mosquitto " + log.split("mosquitto version ", 1)[1].split()[0]
                            if "mosquitto version " in log else "mosquitto")
    result["peak_kb"] = proc_status_kb("self", "VmHWM")
    result["tensorflow_imported"] = "tensorflow" in sys.modules
    return result


def summarize_fleet(fleet: dict) -> None:
    """Median and max of the round times and their parts, reports, memory."""
    print(f"\nper encoding, {fleet['devices']} devices, goal {fleet['rounds_goal']} reports of "
          f"{fleet['rounds_selected']} selected, at least {fleet['min_reports']}, deadline {fleet['deadline']:.0f} s; "
          f"seconds, median / max over the rounds:")
    print(f"{'encoding':8s} {'rounds':>6s} {'round s':>13s} {'check-in s':>13s} {'configure s':>13s} "
          f"{'reporting s':>13s} {'checkpoint s':>13s} {'accepted':>8s} {'dropped':>7s} {'CPU s/round':>11s} "
          f"{'broker CPU s/round':>18s}")
    for encoding, records in fleet["rounds"].items():
        def mm(values: list[float]) -> str:
            return f"{statistics.median(values):.3f} / {max(values):.3f}"
        print(f"{encoding:8s} {len(records):>6d} {mm([r['seconds'] for r in records]):>13s} "
              f"{mm([r['times']['checkin'] for r in records]):>13s} {mm([r['times']['configure'] for r in records]):>13s} "
              f"{mm([r['times']['reporting'] for r in records]):>13s} "
              f"{mm([r['times']['checkpoint'] for r in records]):>13s} {sum(r['accepted'] for r in records):>8d} "
              f"{sum(sum(r['dropped'].values()) for r in records):>7d} "
              f"{statistics.mean(r['cpu_s'] for r in records):>11.2f} "
              f"{statistics.mean(r['broker_cpu_s'] for r in records):>18.2f}")
    print(f"peak RSS (VmHWM): this process (server + fleet + TensorFlow, imported by the converter and fedge.learning: "
          f"{fleet['tensorflow_imported']}) {fleet['peak_kb'] / 1024:.1f} MiB; its RSS after imports and conversion "
          f"{fleet['setup_rss_kb'] / 1024:.1f} MiB, with every device connected {fleet['connected_rss_kb'] / 1024:.1f} "
          f"MiB; {fleet['broker']} {fleet['broker_peak_kb'] / 1024:.1f} MiB (RSS with every device connected and idle "
          f"{fleet['broker_connected_rss_kb'] / 1024:.1f} MiB)")


# ------------------------------------------------------------------------------ 2. aggregation throughput


# A device fleet reduced to its uploads: generates the updates first (prints "ready"), then waits for the
# round's retained task and publishes every update (QoS 1) as fast as the broker acknowledges them.
_PUBLISHER = """
import json, sys, threading, time, uuid
import numpy as np
import paho.mqtt.client as mqtt
from device_runtime.protocol import ModelUpdate, decode_task, encode_update, task_topic, update_topic
host, port, spec_path, count, encoding, seed, run_id = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6]), sys.argv[7]
spec = json.load(open(spec_path))
rng = np.random.default_rng(seed)
encoded = []
for i in range(count):  # round 0: the bench's only round
    delta = [rng.standard_normal(shape, dtype=np.float32) * np.float32(1e-3) for shape in spec["shapes"]]
    encoded.append((f"dev-{i:04d}", encode_update(ModelUpdate("bench", 0, f"dev-{i:04d}", uuid.uuid4().hex,
        spec["hash"], int(rng.integers(10, 600)), {name: 0.5 for name in spec["variables"]}, delta, run_id), encoding)))
task = threading.Event()
acked = threading.Semaphore(0)
state = {}
def on_message(client, userdata, message):
    if message.payload and not task.is_set():
        state["round"] = decode_task(message.payload).round
        task.set()
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-publisher")
client.on_message = on_message
client.on_publish = lambda *a: acked.release()
client.max_inflight_messages_set(20)
client.connect(host, port)
client.loop_start()
client.subscribe(task_topic("bench"), qos=1)
print("ready", flush=True)
task.wait(120)
assert state["round"] == 0, state
started = time.perf_counter()
for device, payload in encoded:
    client.publish(update_topic("bench", device), payload, qos=1)
for _ in encoded:
    acked.acquire()
print("published", time.perf_counter() - started, flush=True)
client.loop_stop()
client.disconnect()
"""


def make_payloads(manifest: Manifest, count: int, encoding: str, seed: int) -> list[tuple[str, bytes]]:
    """`count` (device id, encoded update) pairs of random deltas of the model's real shapes."""
    from device_runtime.protocol import ModelUpdate, encode_update

    rng = np.random.default_rng(seed)
    shapes = [w.shape for w in manifest.weights]
    variables = manifest.metrics.variables
    payloads = []
    for i in range(count):
        device = f"dev-{i:04d}"
        delta = [(rng.standard_normal(shape, dtype=np.float32) * np.float32(1e-3)) for shape in shapes]
        update = ModelUpdate("bench", 0, device, uuid.uuid4().hex, manifest.content_hash,
                             int(rng.integers(10, 600)), {name: float(rng.random()) for name in variables}, delta,
                             INGEST_RUN)
        payloads.append((device, encode_update(update, encoding)))
    return payloads


def aggregate(manifest: Manifest, payloads: list[tuple[str, bytes]], trace: bool) -> dict:
    """One round's reports through the server's path: ReportGate.check (decode_update + checks), then aggregate_round.

    With `trace`, each payload is first copied (as the MQTT client's receive buffer would hold
    it) and the tracemalloc peak is returned; without, the time of each part."""
    from device_runtime.protocol import update_topic
    from fedge.learning import optimizers
    from fedge.learning.aggregation import ClientWeighting
    from fedge.learning.executors import ClientUpdate
    from fedge.learning.process import aggregate_round
    from fedge.learning.state import LearningProcessState, ModelWeights
    from fedge.server.reports import ReportGate, RoundWindow

    weights = ModelWeights.from_list(manifest, [np.zeros(w.shape, np.float32) for w in manifest.weights])
    optimizer = optimizers.SGD(1.0)
    state = LearningProcessState(weights, optimizer.initialize(weights.trainable), 0)
    gate = ReportGate("bench", is_known=lambda device: True)
    gate.open(RoundWindow(INGEST_RUN, 0, frozenset(d for d, _ in payloads), time.time() + 3600, len(payloads),
                          manifest))
    check_s = 0.0

    def updates():
        nonlocal check_s
        for device, stored in payloads:
            payload = bytes(memoryview(stored)) if trace else stored
            started = time.perf_counter()
            update = gate.check(update_topic("bench", device), payload, time.time())
            check_s += time.perf_counter() - started
            yield ClientUpdate(update.tensors, update.num_examples, update.metrics, 0, len(payload))
            del update, payload

    if trace:
        tracemalloc.start()
    started = time.perf_counter()
    try:
        _, metrics = aggregate_round(state, weights, updates(), manifest, ClientWeighting.NUM_EXAMPLES, optimizer)
        total_s = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1] if trace else None
    finally:
        if trace:
            tracemalloc.stop()
    assert metrics["aggregator"]["num_clients"] == len(payloads), metrics
    return {"total_s": total_s, "check_s": check_s, "peak_bytes": peak}



def measure_mqtt_ingest(artifact, count: int, seed: int, workdir: Path) -> list[dict]:
    """One MqttExecutor round per encoding whose `count` updates come from a publisher process through Mosquitto."""
    import json
    import subprocess

    from fedge.broker import EmbeddedBroker
    from fedge.learning import optimizers
    from fedge.learning.aggregation import ClientWeighting
    from device_runtime.protocol import ClientWork, RoundConfig
    from fedge.learning.process import aggregate_round
    from fedge.learning.state import LearningProcessState, ModelWeights
    from fedge.server.mqtt_executor import MqttExecutor

    manifest = artifact.manifest
    spec = workdir / "spec.json"
    spec.write_text(json.dumps({"shapes": [w.shape for w in manifest.weights], "hash": manifest.content_hash,
                                "variables": manifest.metrics.variables}))
    weights = ModelWeights.from_list(manifest, [np.zeros(w.shape, np.float32) for w in manifest.weights])
    optimizer = optimizers.SGD(1.0)
    devices = [f"dev-{i:04d}" for i in range(count)]
    rows = []
    for encoding in ENCODINGS:
        with EmbeddedBroker("mosquitto") as broker:
            publisher = subprocess.Popen([sys.executable, "-c", _PUBLISHER, broker.host, str(broker.port), str(spec),
                                          str(count), encoding, str(seed), INGEST_RUN], stdout=subprocess.PIPE, text=True,
                                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
            try:
                if publisher.stdout.readline().strip() != "ready":
                    raise SystemExit("the publisher did not start")
                executor = MqttExecutor(broker.url, "bench", clients_per_round=count, min_reports=count,
                                        deadline_s=600.0, run_id=INGEST_RUN)
                with executor:
                    state = LearningProcessState(weights, optimizer.initialize(weights.trainable), 0)
                    cpu, broker_cpu = sum(os.times()[:2]), proc_cpu_s(broker.pid)
                    started = time.perf_counter()
                    config = RoundConfig(0, seed, ClientWork(encoding=encoding))
                    _, metrics = aggregate_round(state, weights, executor.train(artifact, weights.to_list(), devices,
                                                                                config), manifest,
                                                 ClientWeighting.NUM_EXAMPLES, optimizer)
                    round_s = time.perf_counter() - started
                    cpu, broker_cpu = sum(os.times()[:2]) - cpu, proc_cpu_s(broker.pid) - broker_cpu
                published = publisher.communicate(timeout=120)[0].split()
                publish_s = float(published[published.index("published") + 1])
            finally:
                if publisher.poll() is None:
                    publisher.kill()
                    publisher.wait()
        distributor = metrics["distributor"]
        assert distributor["accepted"] == count, distributor
        rows.append({"encoding": encoding, "updates": count, "bytes_up": metrics["aggregator"]["bytes_up"],
                     "reporting_s": distributor["reporting_seconds"], "configure_s": distributor["configure_seconds"],
                     "round_s": round_s, "publish_s": publish_s, "cpu_s": cpu, "broker_cpu_s": broker_cpu,
                     "updates_per_s": count / distributor["reporting_seconds"],
                     "mb_per_s": metrics["aggregator"]["bytes_up"] / MB / distributor["reporting_seconds"]})
    return rows


def measure_aggregation(args: argparse.Namespace, workdir: Path) -> dict:
    """Updates/s and MB/s through decoding and streaming aggregation of the McMahan CNN, per encoding."""
    import keras

    from device_runtime.protocol import ClientWork, RoundConfig, Task, encode_task, encode_weights
    from fedge.simulation.models import mnist_cnn

    keras.utils.set_random_seed(args.seed)
    artifact = convert(mnist_cnn(), 0.01, 0.0, 10)
    manifest = artifact.manifest
    model_bytes = 4 * manifest.num_parameters
    result: dict = {"num_parameters": manifest.num_parameters, "model_bytes": model_bytes,
                    "artifact_bytes": len(artifact.tflite_bytes), "rows": []}
    weights = [np.zeros(w.shape, np.float32) for w in manifest.weights]
    result["weights_bytes"] = len(encode_weights("bench", 0, manifest.content_hash, weights,
                                                 manifest.metrics.variables, run_id=INGEST_RUN))
    selected = math.ceil(round(1.3 * args.per_round, 9))
    task = Task("0123456789abcdef", RoundConfig(0, 2**62, ClientWork(learning_rate=0.01)), manifest.content_hash,
                "sha256:" + "0" * 64, time.time() + 60, tuple(f"phone-{i:03d}" for i in range(selected)))
    result["task_bytes"] = len(encode_task(task))
    for encoding in ENCODINGS:
        started = time.perf_counter()
        payloads = make_payloads(manifest, args.updates, encoding, args.seed)
        encode_s = time.perf_counter() - started
        runs = [aggregate(manifest, payloads, trace=False) for _ in range(args.repeats)]
        run = sorted(runs, key=lambda r: r["total_s"])[len(runs) // 2]  # the median run
        peak = aggregate(manifest, payloads, trace=True)["peak_bytes"]
        total_bytes = sum(len(p) for _, p in payloads)
        result["rows"].append({
            "encoding": encoding, "updates": len(payloads), "payload_bytes": len(payloads[0][1]),
            "updates_per_s": len(payloads) / run["total_s"], "mb_per_s": total_bytes / MB / run["total_s"],
            "check_ms": 1e3 * run["check_s"] / len(payloads),
            "add_ms": 1e3 * (run["total_s"] - run["check_s"]) / len(payloads),
            "all_s": [r["total_s"] for r in runs], "peak_bytes": peak, "peak_models": peak / model_bytes,
            "make_s": encode_s})
        del payloads
    if args.mqtt_updates:
        result["mqtt"] = measure_mqtt_ingest(artifact, args.mqtt_updates, args.seed, workdir)
    return result


def print_aggregation(agg: dict, args: argparse.Namespace) -> None:
    print(f"\n# 2. server decode + streaming aggregation, McMahan CNN ({agg['num_parameters']:,} parameters, "
          f"{agg['model_bytes'] / MIB:.2f} MiB as float32): {args.updates} random deltas per encoding, "
          f"ReportGate.check + aggregate_round in one process, median of {args.repeats} runs")
    print(f"{'encoding':8s} {'payload bytes':>13s} {'updates/s':>9s} {'MB/s':>7s} {'check+decode ms':>15s} "
          f"{'aggregate ms':>12s} {'runs s':>22s} {'tracemalloc peak MiB':>20s} {'/ model':>7s}")
    for row in agg["rows"]:
        runs = "/".join(f"{s:.2f}" for s in row["all_s"])
        print(f"{row['encoding']:8s} {row['payload_bytes']:>13,d} {row['updates_per_s']:>9.1f} {row['mb_per_s']:>7.1f} "
              f"{row['check_ms']:>15.2f} {row['add_ms']:>12.2f} {runs:>22s} {row['peak_bytes'] / MIB:>20.1f} "
              f"{row['peak_models']:>7.2f}")
    print("(aggregate ms: WeightedMean.add and the metric sums per update, plus the round's one server step spread "
          "over the updates; the tracemalloc run copies each payload first, as the MQTT receive buffer holds it)")
    if agg.get("mqtt"):
        print(f"the same over MQTT: a publisher process sends {args.mqtt_updates} updates (QoS 1) through Mosquitto as "
              f"soon as the task is retained; one MqttExecutor round takes them in (paho, queue, gate, aggregation)")
        print(f"{'encoding':8s} {'updates':>7s} {'reporting s':>11s} {'updates/s':>9s} {'MB/s':>7s} "
              f"{'publisher s':>11s} {'server CPU s':>12s} {'broker CPU s':>12s}")
        for row in agg["mqtt"]:
            print(f"{row['encoding']:8s} {row['updates']:>7d} {row['reporting_s']:>11.2f} {row['updates_per_s']:>9.1f} "
                  f"{row['mb_per_s']:>7.1f} {row['publish_s']:>11.2f} {row['cpu_s']:>12.2f} {row['broker_cpu_s']:>12.2f}")
        print("(reporting s: task retained -> last update aggregated; publisher s: its first publish -> last PUBACK; "
              "CPU: this process's (server) and Mosquitto's during the round, on the same 2 cores as the publisher)")


# ------------------------------------------------------------------------------ 3. bytes per round


def print_bytes(fleet: dict | None, agg: dict, args: argparse.Namespace) -> None:
    selected = math.ceil(round(1.3 * args.per_round, 9))
    print("\n# 3. bytes per round, float32 and int8 updates (global weights always go down as float32)")
    if fleet is not None:
        print(f"digits CNN ({fleet['num_parameters']:,} parameters, artifact {fleet['artifact_bytes']:,} bytes), "
              f"measured in 1, mean per round (devices download the model the first time they are selected; the "
              f"server publishes it once, in round 1):")
        print(f"{'encoding':8s} {'up: accepted':>12s} {'up: all sent':>12s} {'server published':>16s} "
              f"{'weights x accepted':>18s} {'devices received':>16s}")
        for encoding, records in fleet["rounds"].items():
            def mean(key: str, records: list = records) -> float:
                return statistics.mean(r[key] for r in records)
            print(f"{encoding:8s} {mean('bytes_up'):>12,.0f} {mean('device_bytes_up'):>12,.0f} "
                  f"{mean('bytes_published'):>16,.0f} {mean('bytes_down'):>18,.0f} {mean('device_bytes_down'):>16,.0f}")
    print(f"McMahan CNN ({agg['num_parameters']:,} parameters, artifact {agg['artifact_bytes']:,} bytes), "
          f"{args.per_round} reports of {selected} selected, from the payload sizes of 2; MB:")
    print(f"{'encoding':8s} {'update':>8s} {'up: accepted':>12s} {'up: all selected':>16s} "
          f"{'server published':>16s} {'devices received':>16s} {'model, first time':>17s}")
    down = agg["weights_bytes"] + agg["task_bytes"]
    for row in agg["rows"]:
        print(f"{row['encoding']:8s} {row['payload_bytes'] / MB:>8.3f} {args.per_round * row['payload_bytes'] / MB:>12.1f} "
              f"{selected * row['payload_bytes'] / MB:>16.1f} {down / MB:>16.2f} "
              f"{selected * agg['weights_bytes'] / MB:>16.1f} {selected * agg['artifact_bytes'] / MB:>17.1f}")
    print(f"(server published: weights {agg['weights_bytes']:,} + task {agg['task_bytes']:,} bytes per round, the "
          f"model once per server run; devices received: the broker's fan-out of the retained weights to the "
          f"{selected} selected, plus the model to each of them the first time it is selected; the task also goes "
          f"to every connected device: {agg['task_bytes'] * args.devices / MB:.1f} MB per round for {args.devices})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000, help="fleet size (fleet_1000.toml's groups scaled)")
    parser.add_argument("--per-round", type=int, default=100, help="reports that close a round (goal)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per encoding (float32, then int8)")
    parser.add_argument("--min-reports", type=int, help="fewer by the deadline fail the round (default per-round/2)")
    parser.add_argument("--deadline", type=float, default=60.0, help="reporting deadline, seconds")
    parser.add_argument("--connect-timeout", type=float, default=120.0)
    parser.add_argument("--updates", type=int, default=200, help="updates per encoding for the aggregation figures")
    parser.add_argument("--repeats", type=int, default=3, help="timed aggregation runs per encoding (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mqtt-updates", type=int, default=100,
                        help="updates per encoding sent through Mosquitto to an MqttExecutor (0: skip)")
    parser.add_argument("--skip-fleet", action="store_true", help="only the aggregation and bytes figures")
    args = parser.parse_args()
    started = time.perf_counter()
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"# {os.cpu_count()} cores, load average {load} at start; Python {sys.version.split()[0]}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedge-bench-fleet-") as directory:
        workdir = Path(directory)
        log = workdir / "bench.log"  # devices that drop out log broken sockets; kept off the tables
        logging.basicConfig(level=logging.WARNING, filename=log, format="%(levelname)s %(name)s: %(message)s")
        fleet = None
        if not args.skip_fleet:
            fleet = run_fleet(args, workdir)
            first = next(iter(fleet["rounds"].values()))
            fleet.update(rounds_goal=first[0]["goal"], rounds_selected=first[0]["selected"], deadline=args.deadline)
            summarize_fleet(fleet)
        agg = measure_aggregation(args, workdir)
        print_aggregation(agg, args)
        print_bytes(fleet, agg, args)
        lines = collections.Counter(" ".join(line.split()[:2]) for line in log.read_text().splitlines()
                                    if line.startswith(("WARNING", "ERROR", "CRITICAL")))
    print(f"\nlog lines at WARNING and above: {dict(lines) or 'none'}")
    print(f"{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
