"""Keep the native libraries' start-up chatter off a user's terminal without changing what they compute.

TensorFlow's C++ start-up lines (absl's "All log messages before absl::InitializeLog()" and
"oneDNN custom operations are on", printed twice per import; TF_CPP_MIN_LOG_LEVEL no longer
reaches them) and LiteRT's "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." are written
by C++ straight to file descriptor 2, out of Python's reach. `filtered_native_stderr` routes fd 2
through a pipe for the length of a command and forwards every line except those: warnings,
errors and Python's own output still reach the terminal as they come. `FEDGE_DEBUG=1` (the
commands' `--debug`) turns the filter off.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator

DEBUG_ENV = "FEDGE_DEBUG"

# absl INFO lines ("I0000 00:00:1796685641.001573   13389 port.cc:153] ..."), absl's preamble, LiteRT's INFO lines.
NOISE = re.compile(rb"^(I\d{4} \d\d:\d\d:[\d.]+ +\d+ [\w.]+:\d+\] |"
                   rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$|"
                   rb"INFO: (Created TensorFlow Lite XNNPACK delegate for CPU|Initialized TensorFlow Lite runtime)\.$)")


def debugging() -> bool:
    """Whether the user asked for everything: native logs and the tracebacks behind one-line errors."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


@contextlib.contextmanager
def filtered_native_stderr() -> Iterator[None]:
    """While inside, lines written to fd 2 (by C++ libraries, Python, child processes) reach the terminal unless
    they are NOISE; nothing is filtered when debugging() or when fd 2 cannot be redirected."""
    if debugging():
        yield
        return
    try:
        sys.stderr.flush()
        terminal = os.dup(2)
        read_end, write_end = os.pipe()
    except (OSError, ValueError, AttributeError):  # no fd 2 (an embedding host): nothing to filter
        yield
        return
    forwarder = threading.Thread(target=_forward, args=(read_end, terminal), name="fedge-stderr-filter",
                                 daemon=True)
    forwarder.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)  # our last writer of the pipe is gone: the forwarder sees its end (children aside)
        forwarder.join(timeout=2.0)
        if not forwarder.is_alive():  # else a child process still writes through it: leave the copy open
            os.close(terminal)


def _forward(read_end: int, terminal: int) -> None:
    """Copy lines from the pipe to the terminal, leaving out NOISE; a partial last line is forwarded at the end.
    Once the terminal is gone (a closed pipe) the pipe is still drained, so writers never block."""
    pending, open_terminal = b"", True
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            if open_terminal:
                open_terminal = _write(terminal, b"".join(line + b"\n" for line in lines if not NOISE.match(line)))
    if pending and open_terminal and not NOISE.match(pending):
        _write(terminal, pending)


def _write(fd: int, data: bytes) -> bool:
    """Write all of `data` to `fd`; False when it cannot take more."""
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        return False
    return True
