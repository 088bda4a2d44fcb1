"""Device runtime and wire protocol: install size, agent memory, update sizes, accuracy cost of quantized updates.

Prints four tables:

1. the installed size of the `device` extra (a fresh venv) next to the desktop install
   (.venv) and TensorFlow's package directory alone;
2. the peak RSS (VmHWM) of the device agent (`python -m device_runtime`, run by the device
   venv's Python, which has no TensorFlow) during one MQTT training round of the McMahan CNN,
   next to a TensorFlow process that trains the same model on the same 500 examples with
   `model.fit`, and the agent's round time (task published -> update received);
3. the encoded size of a real one-round delta of the McMahan CNN per encoding, relative to
   float32, with encode and decode times;
4. the final test accuracy of short FedAvg runs on scikit-learn digits (10 non-IID clients,
   15 rounds, 1 and 5 local epochs, 3 seeds) whose updates travel as float32, float16 or int8.

    python bench/device.py [--rounds 15] [--local-epochs 1 5] [--seeds 3]
                           [--device-venv PATH [--skip-install]]

The device venv is built with `python3 -m venv` and `pip install -q '<copy>[device]'`, where
<copy> is a copy of the working tree without .git, virtual environments and build outputs
(a non-editable install from the repository path would write build/ and *.egg-info into it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402

from train_step import _PEAK_RSS  # noqa: E402  (bench/ is sys.path[0])

from fedge.simulation.models import mnist_cnn  # noqa: E402

MIB = 1024 * 1024
FLEET = "bench"
TIMEOUT_S = 120.0
# Every venv has these (python3 -m venv installs them): left out of both sums.
_VENV_BASE = {"pip", "setuptools", "_distutils_hack", "pkg_resources", "distutils-precedence.pth"}

_KERAS_FIT = """
import os, sys, time
{peak}os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras, numpy as np
model = keras.models.load_model(sys.argv[1])
with np.load(sys.argv[2]) as data:
    x, y = data["x"], data["y"]
started = time.perf_counter()
model.fit(x, y, batch_size=10, epochs=1, verbose=0)
print(time.perf_counter() - started, _peak_rss_kb())
"""

# One round's work done step by step in a device-venv process, with the peak RSS after each step.
_STAGES = """
import json, sys, uuid
{peak}
stages = [["Python started", _peak_rss_kb()]]
import numpy as np
from device_runtime.agent import DeviceAgent  # noqa: F401  (everything the agent imports: paho, flatbuffers)
from device_runtime import TrainableModel
from device_runtime.protocol import ModelUpdate, encode_update
from device_runtime.training import train_locally
stages.append(["imports (numpy, paho, flatbuffers, device_runtime)", _peak_rss_kb()])
with open(sys.argv[1], "rb") as file:
    model = TrainableModel(file.read(), num_threads=1)
stages.append(["LiteRT imported, model loaded", _peak_rss_kb()])
with np.load(sys.argv[2]) as data:
    x, y = data["x"], data["y"]
result = train_locally(model, (x, y), epochs=1, shuffle_seed=1)
stages.append(["train_locally (1 epoch) returned the delta", _peak_rss_kb()])
payload = encode_update(ModelUpdate("bench", 1, "d1", uuid.uuid4().hex, model.content_hash, result.num_examples,
                                    result.metrics, result.delta, "bench"), "float32")
stages.append(["encode_update (float32)", _peak_rss_kb()])
print(json.dumps(stages))
"""


# ------------------------------------------------------------------------------ 1. installed size


def _project(entry: str) -> str:
    """The project a top-level site-packages entry belongs to ('pip-26.3.dist-info' -> 'pip')."""
    return entry.split("-")[0].lower() if entry.endswith((".dist-info", ".egg-info")) else entry


def site_packages(venv: Path) -> Path:
    """The site-packages folder of a venv, as its own Python reports it."""
    script = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    out = subprocess.run([str(venv / "bin" / "python"), "-c", script], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def tree_bytes(path: Path) -> int:
    """Sum of the sizes of the regular files under `path` (links not followed, __pycache__ left out)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for folder, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            file = Path(folder, name)
            if not file.is_symlink():
                total += file.stat().st_size
    return total


def installed_bytes(venv: Path) -> tuple[int, dict[str, int]]:
    """Bytes under the venv's site-packages, without what every venv has; and per top-level entry."""
    sizes: dict[str, int] = {}
    for entry in site_packages(venv).iterdir():
        if _project(entry.name) not in _VENV_BASE:
            sizes[entry.name] = tree_bytes(entry)
    return sum(sizes.values()), sizes


def install_device_venv(venv: Path, workdir: Path) -> float:
    """python3 -m venv + pip install '<copy of the working tree>[device]'; returns the seconds taken."""
    copy = workdir / "fedge-src"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "reports", "__pycache__", ".pytest_cache", ".hypothesis"))
    started = time.perf_counter()
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"{copy}[device]"],
                             capture_output=True, text=True)
    if install.returncode:
        raise RuntimeError(f"pip install of the device extra failed:\n{install.stderr}")
    shutil.rmtree(copy)
    return time.perf_counter() - started


def measure_install(device_venv: Path, desktop_venv: Path) -> dict:
    """Sizes (MiB) of the device venv, the desktop venv and TensorFlow's package folder."""
    device, device_parts = installed_bytes(device_venv)
    desktop, _ = installed_bytes(desktop_venv)
    tensorflow = tree_bytes(site_packages(desktop_venv) / "tensorflow")
    largest = sorted(device_parts.items(), key=lambda item: -item[1])[:5]
    return {"device_mib": device / MIB, "desktop_mib": desktop / MIB, "tensorflow_mib": tensorflow / MIB,
            "device_largest_mib": {name: size / MIB for name, size in largest}}


# ------------------------------------------------------------------------------ 2. agent memory


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def mosquitto(workdir: Path):
    """A private mosquitto on 127.0.0.1:<free port>; yields the port."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = _free_port()
    config = workdir / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    process = subprocess.Popen([binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto did not start on port {port}") from None
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class BenchServer:
    """The server's side of one round: retained model and task out, statuses and updates in."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        from device_runtime.protocol import decode_status, status_wildcard, update_wildcard

        self.updates: queue.Queue[tuple[float, bytes]] = queue.Queue()
        self.online = threading.Event()
        subscribed = threading.Event()

        def on_message(client, userdata, message) -> None:
            if "/update/" in message.topic:
                self.updates.put((time.monotonic(), bytes(message.payload)))
            elif message.payload and decode_status(bytes(message.payload))["state"] == "online":
                self.online.set()

        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"server-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = lambda client, *args: client.subscribe(
            [(update_wildcard(FLEET), 1), (status_wildcard(FLEET), 1)])
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if not subscribed.wait(TIMEOUT_S):
            raise RuntimeError("the broker did not acknowledge the server's subscription")

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(TIMEOUT_S)
        if not info.is_published():
            raise RuntimeError(f"no PUBACK for {topic}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _proc_status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def measure_agent_round(device_python: Path, cnn_bytes: bytes, data_path: Path, workdir: Path) -> dict:
    """Run the agent as a process for one round; its VmHWM after the update, and the round time."""
    from device_runtime.artifact import read_manifest
    from device_runtime.protocol import (ClientWork, RoundConfig, Task, decode_update, encode_task, model_topic,
                                         task_topic)

    manifest = read_manifest(cnn_bytes)
    log_path = workdir / "agent.log"
    with mosquitto(workdir) as port:
        server = BenchServer(port)
        agent = None
        try:
            server.publish(model_topic(FLEET, manifest.content_hash), cnn_bytes)
            with open(log_path, "wb") as log:
                # cwd = the repository: `-m` runs the working tree's device_runtime with the device venv's packages.
                agent = subprocess.Popen(
                    [str(device_python), "-m", "device_runtime", "--broker", f"mqtt://127.0.0.1:{port}",
                     "--fleet", FLEET, "--device-id", "d1", "--data", str(data_path),
                     "--cache-dir", str(workdir / "cache"), "--num-threads", "1"],
                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            if not server.online.wait(TIMEOUT_S):
                raise RuntimeError(f"the agent did not come online:\n{log_path.read_text()}")
            idle_kb = _proc_status_kb(agent.pid, "VmHWM")
            task = Task("bench", RoundConfig(1, 1, ClientWork()), manifest.content_hash, None, time.time() + 600)
            published = time.monotonic()
            server.publish(task_topic(FLEET), encode_task(task))
            try:
                received, payload = server.updates.get(timeout=TIMEOUT_S)
            except queue.Empty:
                raise RuntimeError(f"no update from the agent:\n{log_path.read_text()}") from None
            peak_kb = _proc_status_kb(agent.pid, "VmHWM")
            rss_kb = _proc_status_kb(agent.pid, "VmRSS")
            update = decode_update(payload, manifest, fleet=FLEET, device_id="d1")
            agent.send_signal(signal.SIGTERM)
            exit_code = agent.wait(30)
        finally:
            if agent is not None and agent.poll() is None:
                agent.kill()
                agent.wait()
            server.close()
    log = log_path.read_text()
    trained = re.search(r"trained (\d+) steps on (\d+) examples in ([0-9.]+) s", log)
    return {"peak_mib": peak_kb / 1024, "idle_peak_mib": idle_kb / 1024, "rss_after_mib": rss_kb / 1024,
            "round_s": received - published, "train_s": float(trained.group(3)) if trained else math.nan,
            "steps": int(trained.group(1)) if trained else 0, "num_examples": update.num_examples,
            "update_bytes": len(payload), "exit_code": exit_code}


def measure_round_stages(device_python: Path, artifact: Path, data_path: Path) -> list[tuple[str, float]]:
    """Peak RSS (MiB) after each step of one round's work, in a fresh device-venv process."""
    run = subprocess.run([str(device_python), "-c", _STAGES.format(peak=_PEAK_RSS), str(artifact), str(data_path)],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return [(name, kilobytes / 1024) for name, kilobytes in json.loads(run.stdout.splitlines()[-1])]


def measure_keras_fit(keras_file: Path, data_path: Path) -> dict:
    """Peak RSS (VmHWM) and fit time of a TensorFlow process training the same model on the same data."""
    run = subprocess.run([sys.executable, "-c", _KERAS_FIT.format(peak=_PEAK_RSS), str(keras_file), str(data_path)],
                         capture_output=True, text=True, check=True)
    seconds, kilobytes = run.stdout.split()[-2:]
    return {"peak_mib": int(kilobytes) / 1024, "fit_s": float(seconds)}


# ------------------------------------------------------------------------------ 3. update sizes


def measure_update_sizes(cnn_bytes: bytes, x: np.ndarray, y: np.ndarray, repeats: int) -> tuple[list[dict], int]:
    """Encoded size, relative error and median encode/decode time of one real delta per encoding."""
    from device_runtime import TrainableModel
    from device_runtime.protocol import ModelUpdate, decode_update, encode_update
    from device_runtime.training import train_locally

    model = TrainableModel(cnn_bytes, num_threads=1)
    result = train_locally(model, (x, y), epochs=1, shuffle_seed=0)
    manifest = model.manifest
    update = ModelUpdate(fleet=FLEET, round=1, device_id="d1", update_id=uuid.uuid4().hex,
                         model_hash=manifest.content_hash, num_examples=result.num_examples,
                         metrics=result.metrics, tensors=result.delta, run_id="bench")
    flat = np.concatenate([t.ravel() for t in result.delta])
    rows = []
    for encoding, topk in (("float32", None), ("float16", None), ("int8", None), ("float32", 0.1), ("int8", 0.1)):
        encode_s, decode_s = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            payload = encode_update(update, encoding, topk)
            encode_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            decoded = decode_update(payload, manifest)
            decode_s.append(time.perf_counter() - started)
        error = np.concatenate([t.ravel() for t in decoded.tensors]) - flat
        rows.append({"encoding": encoding, "topk": topk, "bytes": len(payload),
                     "rel_l2_error": float(np.linalg.norm(error) / np.linalg.norm(flat)),
                     "encode_ms": 1e3 * statistics.median(encode_s), "decode_ms": 1e3 * statistics.median(decode_s)})
    for row in rows:
        row["ratio"] = row["bytes"] / rows[0]["bytes"]
    return rows, flat.size


# ------------------------------------------------------------------------------ 4. accuracy cost


def dirichlet_split(y: np.ndarray, clients: int, alpha: float, seed: int, minimum: int) -> list[np.ndarray]:
    """Client index sets: each label's examples shared out in Dirichlet(alpha) proportions (redrawn until
    every client holds at least `minimum` examples)."""
    rng = np.random.default_rng(seed)
    while True:
        parts: list[list[int]] = [[] for _ in range(clients)]
        for label in np.unique(y):
            members = rng.permutation(np.flatnonzero(y == label))
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients))[:-1] * len(members)).astype(int)
            for part, chunk in zip(parts, np.split(members, cuts)):
                part.extend(chunk.tolist())
        if min(map(len, parts)) >= minimum:
            return [np.array(sorted(part)) for part in parts]


def federated_accuracy(rounds: int, clients: int, alpha: float, seed: int, local_epochs: list[int]) -> dict:
    """FedAvg on digits with each update encoded and decoded; test accuracy per round, per local-epoch
    count and encoding, all from the same initial weights, client split and shuffling seeds."""
    import keras
    from fedge.simulation.datasets.digits import train_test_arrays
    from fedge.simulation.models import digits_cnn

    from converters import convert_keras_model
    from device_runtime import TrainableModel, finalize_metrics
    from device_runtime.protocol import ModelUpdate, decode_update, encode_update
    from device_runtime.training import evaluate_locally, train_locally

    batch_size = 16
    keras.utils.set_random_seed(seed)
    x_train, y_train, x_test, y_test = train_test_arrays(seed=seed)
    converted = convert_keras_model(digits_cnn(), loss="sparse_categorical_crossentropy",
                                    optimizer=keras.optimizers.SGD(learning_rate=0.1, momentum=0.9),
                                    batch_size=batch_size, metrics=["accuracy"])
    model = TrainableModel(converted.tflite_bytes, num_threads=1)
    manifest = model.manifest
    initial = model.get_weights()
    split = dirichlet_split(y_train, clients, alpha, seed, batch_size)
    client_data = [(x_train[index], y_train[index]) for index in split]

    def accuracy(weights: list[np.ndarray]) -> float:
        model.set_weights(weights)
        metrics = evaluate_locally(model, (x_test, y_test))
        return finalize_metrics(manifest.metrics.finalizers, metrics)["accuracy"]

    results: dict = {}
    for epochs in local_epochs:
        for encoding in ("float32", "float16", "int8"):
            started = time.perf_counter()
            weights = [w.copy() for w in initial]
            curve, round_bytes = [], []
            for round_id in range(rounds):
                summed = [np.zeros_like(w) for w in weights]
                total = sent = 0
                for client, data in enumerate(client_data):
                    local = train_locally(model, data, epochs=epochs, initial_weights=weights,
                                          shuffle_seed=seed * 10**6 + round_id * 1000 + client * 10)
                    payload = encode_update(ModelUpdate(
                        fleet=FLEET, round=round_id, device_id=f"c{client}", update_id=uuid.uuid4().hex,
                        model_hash=manifest.content_hash, num_examples=local.num_examples,
                        metrics=local.metrics, tensors=local.delta, run_id="bench"), encoding)
                    update = decode_update(payload, manifest, fleet=FLEET, device_id=f"c{client}")
                    sent += len(payload)
                    total += update.num_examples
                    for acc, delta in zip(summed, update.tensors):
                        acc += update.num_examples * delta
                weights = [w + acc / np.float32(total) for w, acc in zip(weights, summed)]
                round_bytes.append(sent)
                curve.append(accuracy(weights))
            results[(epochs, encoding)] = {"accuracy": curve[-1], "curve": curve,
                                           "bytes_per_round": statistics.mean(round_bytes),
                                           "seconds": time.perf_counter() - started}
    return {"results": results, "num_parameters": manifest.num_parameters, "test_examples": len(y_test),
            "client_sizes": [len(index) for index in split],
            "labels_per_client": [int((np.bincount(y_train[index], minlength=10) >= 0.05 * len(index)).sum())
                                  for index in split]}


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="FedAvg rounds on digits (default %(default)s)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the label split")
    parser.add_argument("--local-epochs", type=int, nargs="+", default=[1, 5],
                        help="local epochs per round to run FedAvg with (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=3, help="FedAvg runs per setting, seeds seed.. (default 3)")
    parser.add_argument("--examples", type=int, default=500, help="local examples of the agent (McMahan CNN)")
    parser.add_argument("--repeats", type=int, default=5, help="encode/decode timing repeats (median)")
    parser.add_argument("--device-venv", type=Path, help="where to build the device venv (default: a temp folder)")
    parser.add_argument("--skip-install", action="store_true", help="reuse the venv at --device-venv")
    parser.add_argument("--desktop-venv", type=Path, default=ROOT / ".venv")
    args = parser.parse_args()
    if args.skip_install and args.device_venv is None:
        parser.error("--skip-install needs --device-venv")
    started = time.perf_counter()
    report: dict = {}

    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as directory:
        workdir = Path(directory)
        device_venv = args.device_venv or workdir / "device-venv"
        # 1. installed size
        if args.skip_install:
            if not (device_venv / "bin" / "python").exists():
                parser.error(f"{device_venv} is not a venv")
            install_s = None
        else:
            install_s = install_device_venv(device_venv, workdir)
        sizes = report["install"] = measure_install(device_venv, args.desktop_venv)
        print("# 1. installed size (site-packages, without pip/setuptools; bytecode caches left out)"
              + (f"; device install took {install_s:.1f} s" if install_s is not None else ""))
        print(f"{'install':44s} {'MiB':>9s} {'device / this':>14s}")
        for label, key in ((f"device extra ({device_venv.name})", "device_mib"),
                           (f"desktop + dev ({args.desktop_venv.name})", "desktop_mib"),
                           ("tensorflow package folder alone", "tensorflow_mib")):
            print(f"{label:44s} {sizes[key]:>9.1f} {sizes['device_mib'] / sizes[key]:>14.3f}")
        print("largest in the device venv: " + ", ".join(f"{name} {mb:.1f}" for name, mb in
                                                         sizes["device_largest_mib"].items()))

        # 2. agent memory and round time
        import keras

        from converters import convert_keras_model

        keras.utils.set_random_seed(args.seed)
        cnn = mnist_cnn()
        converted = convert_keras_model(cnn, loss="sparse_categorical_crossentropy",
                                        optimizer=keras.optimizers.SGD(0.01), batch_size=10)
        cnn.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
        keras_file = workdir / "mcmahan_cnn.keras"
        cnn.save(keras_file)
        rng = np.random.default_rng(args.seed)
        x = rng.random((args.examples, 28, 28, 1), dtype=np.float32)
        y = rng.integers(0, 10, args.examples).astype(np.int32)
        data_path = workdir / "local.npz"
        np.savez(data_path, x=x, y=y)
        agent = report["agent"] = measure_agent_round(device_venv / "bin" / "python", converted.tflite_bytes,
                                                      data_path, workdir)
        fit = report["keras_fit"] = measure_keras_fit(keras_file, data_path)
        artifact = converted.save(workdir / "mcmahan_cnn.tflite")
        stages = report["round_stages"] = measure_round_stages(device_venv / "bin" / "python", artifact, data_path)
        print(f"\n# 2. one training round of the McMahan CNN ({converted.manifest.num_parameters:,} parameters, "
              f"batch 10, {args.examples} examples, 1 epoch)")
        print(f"{'process':52s} {'peak RSS MiB':>12s} {'train s':>8s}")
        print(f"{'device agent (device venv, no TensorFlow, 1 thread)':52s} {agent['peak_mib']:>12.1f} "
              f"{agent['train_s']:>8.2f}")
        print(f"{'TensorFlow model.fit (all cores; time incl. tracing)':52s} {fit['peak_mib']:>12.1f} "
              f"{fit['fit_s']:>8.2f}")
        print(f"{'device agent before the task (connected, idle)':52s} {agent['idle_peak_mib']:>12.1f}")
        print(f"agent / TF peak RSS = {agent['peak_mib'] / fit['peak_mib']:.2f}; agent round time (task published -> "
              f"update received, first round: model download {len(converted.tflite_bytes) / MIB:.1f} MiB + load + "
              f"{agent['steps']} steps + {agent['update_bytes'] / MIB:.1f} MiB update) = {agent['round_s']:.2f} s; "
              f"agent exit code after SIGTERM {agent['exit_code']}")

        print("the same round's work step by step in one device-venv process (peak RSS MiB after each step):")
        for name, mb in stages:
            print(f"  {name:52s} {mb:>7.1f}")

        # 3. update sizes
        rows, num_parameters = measure_update_sizes(converted.tflite_bytes, x, y, args.repeats)
        report["updates"] = rows
        print(f"\n# 3. encoded update of one real McMahan CNN delta ({num_parameters:,} parameters; "
              f"median of {args.repeats})")
        print(f"{'encoding':18s} {'bytes':>11s} {'/ float32':>9s} {'rel. L2 err':>11s} {'encode ms':>9s} "
              f"{'decode ms':>9s}")
        for row in rows:
            name = row["encoding"] + (f" top-{row['topk']:g}" if row["topk"] else "")
            print(f"{name:18s} {row['bytes']:>11,d} {row['ratio']:>9.3f} {row['rel_l2_error']:>11.2e} "
                  f"{row['encode_ms']:>9.1f} {row['decode_ms']:>9.1f}")

        # 4. accuracy cost
        runs = [federated_accuracy(args.rounds, args.clients, args.alpha, seed, args.local_epochs)
                for seed in range(args.seed, args.seed + args.seeds)]
        print(f"\n# 4. FedAvg on digits: {args.clients} clients, Dirichlet alpha {args.alpha} over labels, "
              f"{args.rounds} rounds, SGD 0.1 momentum 0.9, batch 16, {runs[0]['num_parameters']:,} parameters, "
              f"{runs[0]['test_examples']} test examples; seeds {args.seed}..{args.seed + args.seeds - 1} "
              f"(each seed: its own split, initial weights and shuffling, shared by the three encodings)")
        for seed, run in zip(range(args.seed, args.seed + args.seeds), runs):
            print(f"  seed {seed}: client sizes {run['client_sizes']}, labels with >= 5% of a client's examples "
                  f"{run['labels_per_client']}")
        print(f"{'local epochs':>12s} {'encoding':9s} {'accuracy per seed':>24s} {'mean':>6s} {'mean diff':>9s} "
              f"{'max |diff|':>10s} {'bytes/round':>11s} {'/ float32':>9s}")
        table = []
        for epochs in args.local_epochs:
            for encoding in ("float32", "float16", "int8"):
                accuracies = [run["results"][(epochs, encoding)]["accuracy"] for run in runs]
                diffs = [a - run["results"][(epochs, "float32")]["accuracy"] for a, run in zip(accuracies, runs)]
                sent = statistics.mean(run["results"][(epochs, encoding)]["bytes_per_round"] for run in runs)
                base = statistics.mean(run["results"][(epochs, "float32")]["bytes_per_round"] for run in runs)
                table.append({"local_epochs": epochs, "encoding": encoding, "accuracy": accuracies,
                              "diff": diffs, "bytes_per_round": sent, "ratio": sent / base,
                              "curves": [run["results"][(epochs, encoding)]["curve"] for run in runs]})
                print(f"{epochs:>12d} {encoding:9s} {' '.join(f'{a:.3f}' for a in accuracies):>24s} "
                      f"{statistics.mean(accuracies):>6.3f} {statistics.mean(diffs):>+9.4f} "
                      f"{max(map(abs, diffs)):>10.4f} {sent:>11,.0f} {sent / base:>9.3f}")
        report["federated"] = table
        for row in table:
            if row["encoding"] == "float32":
                print(f"  float32, {row['local_epochs']} local epoch(s), seed {args.seed}, accuracy by round: "
                      + " ".join(f"{a:.2f}" for a in row["curves"][0]))
    report["total_s"] = time.perf_counter() - started
    print(f"\ntotal {report['total_s']:.0f} s")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
