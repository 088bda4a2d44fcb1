"""What reaches a user's terminal: native start-up chatter filtered out, everything else through, --debug for all."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from device_artifacts import artifact_path

pytestmark = pytest.mark.device

NOISE = ["WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
         "I0000 00:00:1796685641.001573   13389 port.cc:153] oneDNN custom operations are on. You may see ...",
         "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."]
KEPT = ["W0000 00:00:1796685641.001573   13389 cpu.cc:1] a native warning", "E0000 an error", "a Python line"]


def _run(script: str, *environment: str) -> subprocess.CompletedProcess[str]:
    command = ["env", *environment, sys.executable, "-c", textwrap.dedent(script)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_native_noise_is_filtered_and_other_lines_and_children_pass(tmp_path: Path) -> None:
    model = artifact_path("mlp", tmp_path)
    script = f"""
        import os, subprocess, sys
        from device_runtime.native_logs import filtered_native_stderr
        from device_runtime.model import TrainableModel
        with filtered_native_stderr():
            for line in {NOISE + KEPT[:2]!r}:
                os.write(2, line.encode() + b"\\n")
            print({KEPT[2]!r}, file=sys.stderr)
            subprocess.run([sys.executable, "-c", "import sys; print('a child line', file=sys.stderr)"])
            TrainableModel.from_file({str(model)!r})  # LiteRT says it created the XNNPACK delegate
            os.write(2, b"no newline")
        print(" then the terminal again", file=sys.stderr)
    """
    quiet = _run(script)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr.splitlines() == KEPT + ["a child line", "no newline then the terminal again"]

    loud = _run(script, "FEDGE_DEBUG=1")  # what --debug sets
    assert loud.returncode == 0 and all(line in loud.stderr for line in NOISE), loud.stderr
    assert "XNNPACK" in loud.stderr.replace(NOISE[2], "", 1)  # the interpreter's own line too


def test_debug_shows_the_traceback_behind_a_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.npz"
    command = [sys.executable, "-m", "device_runtime", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f",
               "--device-id", "d", "--data", str(missing)]
    plain = subprocess.run(command, capture_output=True, text=True, timeout=120)
    debug = subprocess.run(command + ["--debug"], capture_output=True, text=True, timeout=120)
    assert plain.returncode == debug.returncode == 2
    assert plain.stderr.count("\n") == 1 and plain.stderr.startswith("fedge-device: error:") and \
        str(missing) in plain.stderr, plain.stderr
    assert "Traceback (most recent call last)" in debug.stderr and debug.stderr.endswith(plain.stderr), debug.stderr


def test_fedge_version() -> None:
    from fedge import __version__

    run = subprocess.run([sys.executable, "-m", "fedge.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout == f"fedge {__version__}\n"


def test_a_usage_mistake_is_one_line_pointing_at_help() -> None:
    run = subprocess.run([sys.executable, "-m", "device_runtime", "--broker", "mqtt://127.0.0.1:1"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr == "fedge-device: error: the following arguments are required: --fleet, --device-id, --data " \
                         "(see fedge-device --help)\n"


def test_a_desktop_command_in_a_device_only_install_says_what_to_install() -> None:
    script = "import sys; sys.modules['sklearn'] = None; from fedge.cli import main; sys.exit(main(['simulate']))"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr == "fedge simulate: error: this command needs the desktop extra, which this install lacks (No " \
                         "module named 'sklearn'): pip install 'fedge[desktop]'\n"
