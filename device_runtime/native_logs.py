"""Keep the native libraries' start-up chatter off a user's terminal without changing what they compute.

TensorFlow's C++ start-up lines (absl's "All log messages before absl::InitializeLog()" and
"oneDNN custom operations are on", printed twice per import; TF_CPP_MIN_LOG_LEVEL no longer
reaches them) and LiteRT's "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." are written
by C++ straight to file descriptor 2, out of Python's reach. `filtered_native_stderr` points fd 2
at a pipe read by a small filter process, which forwards every line except those: warnings,
errors, Python's own output and a crash's last words still reach the terminal. A process, not a
thread: it needs no GIL (C++ may write while holding it), outlives an abort of the command, and
serves the command's children for as long as they write. `FEDGE_DEBUG=1` (the commands'
`--debug`) turns the filter off.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import subprocess
import sys
from collections.abc import Iterator

DEBUG_ENV = "FEDGE_DEBUG"

# absl INFO lines ("I0000 00:00:1796685641.001573   13389 port.cc:153] ..."), absl's preamble, LiteRT's INFO lines.
NOISE = re.compile(rb"^(I\d{4} \d\d:\d\d:[\d.]+ +\d+ [\w.]+:\d+\] |"
                   rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$|"
                   rb"INFO: (Created TensorFlow Lite XNNPACK delegate for CPU|Initialized TensorFlow Lite runtime)\.$)")
IDLE_FLUSH_S = 0.1  # a partial line (a prompt, a progress dot) is shown after this long without more output


def debugging() -> bool:
    """Whether the user asked for everything: native logs and the tracebacks behind one-line errors."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


@contextlib.contextmanager
def filtered_native_stderr() -> Iterator[None]:
    """While inside, lines written to fd 2 (by C++ libraries, Python, child processes) reach the terminal unless
    they are NOISE; nothing is filtered when debugging() or when the filter cannot start."""
    if debugging():
        yield
        return
    try:
        sys.stderr.flush()
        # Its own session: Ctrl-C, which signals the terminal's foreground group, must not stop the filter first.
        # -S skips site: the filter needs nothing but this module.
        filter_process = subprocess.Popen([sys.executable, "-S", "-c", _FILTER_MAIN, __file__],
                                          stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
        terminal = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no fd 2, no interpreter to start: nothing to filter
        yield
        return
    os.dup2(filter_process.stdin.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)
        os.close(terminal)
        filter_process.stdin.close()  # the filter ends once every writer (children too) has closed the pipe
        with contextlib.suppress(subprocess.TimeoutExpired):
            filter_process.wait(timeout=0.5)  # its last lines before ours, unless a child still writes


def forward(read_fd: int, write_fd: int) -> None:
    """Copy lines from `read_fd` to `write_fd` until end of file, leaving out NOISE; a partial line goes out after
    IDLE_FLUSH_S without more input. Once `write_fd` is gone the input is still drained, so writers never block."""
    pending, open_output = b"", True
    while True:
        ready, _, _ = select.select([read_fd], [], [], IDLE_FLUSH_S if pending else None)
        if not ready:  # idle with a partial line: show it
            if open_output and not NOISE.match(pending):
                open_output = _write(write_fd, pending)
            pending = b""
            continue
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        if open_output:
            open_output = _write(write_fd, b"".join(line + b"\n" for line in lines if not NOISE.match(line)))
    if pending and open_output and not NOISE.match(pending):
        _write(write_fd, pending)


def _write(fd: int, data: bytes) -> bool:
    """Write all of `data` to `fd`; False when it cannot take more."""
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        return False
    return True


# The filter process: this file loaded alone (not the package, which imports numpy), signals ignored (the command
# it serves decides when it ends, by closing the pipe), stdin -> stderr.
_FILTER_MAIN = """
import importlib.util, signal, sys
for number in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
    signal.signal(number, signal.SIG_IGN)
spec = importlib.util.spec_from_file_location("fedge_native_logs", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.forward(0, 2)
"""
