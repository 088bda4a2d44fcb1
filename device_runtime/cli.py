"""`fedge-device` (also `python -m device_runtime`): run one device of a fleet until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from device_runtime.model_cache import default_cache_dir
from device_runtime.native_logs import DEBUG_ENV, debugging, filtered_native_stderr

PASSWORD_ENV = "FEDGE_MQTT_PASSWORD"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

logger = logging.getLogger("device_runtime.cli")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a usage mistake said in one line, `<prog>: error: ... (<prog> --help)`, exit 2: the whole usage
    text above it buried the one line that says what is wrong."""

    def error(self, message: str) -> NoReturn:
        """Print the mistake and exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive(kind: type) -> Callable[[str], Any]:
    """argparse type: a number of `kind` (int or float) > 0; shared by the fedge command lines."""
    expected = "a positive integer" if kind is int else "a positive number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not 0 < value < math.inf:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    return parse


def stop_on_signals() -> threading.Event:
    """An event that SIGTERM and SIGINT (Ctrl-C) set, for a clean stop of a long-running command."""
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop


def print_errors(prog: str, error: BaseException) -> None:
    """A user's mistake on stderr: one `<prog>: error: ...` line per line of the error (a job file reports every
    problem at once, one per line); with --debug, the traceback behind it first."""
    if debugging():
        traceback.print_exception(error)
    print("\n".join(f"{prog}: error: {line}" for line in str(error).splitlines()), file=sys.stderr)


@contextlib.contextmanager
def stopping_on_signals(stop: Callable[[], None]) -> Iterator[list[int]]:
    """While inside, SIGINT (Ctrl-C) and SIGTERM call `stop()` (a server abandons its round, a simulation ends);
    yields the list the signals received are appended to; the previous handlers come back afterwards."""
    received: list[int] = []

    def request_stop(signum: int, frame: object) -> None:
        logger.info("received %s: stopping after abandoning the round in progress", signal.Signals(signum).name)
        received.append(signum)
        stop()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """--debug: show the native libraries' start-up logs and the traceback behind every one-line error."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,  # also after a sub-command
                        help=f"show native libraries' logs and tracebacks behind errors (also {DEBUG_ENV}=1)")


def run_command(args: argparse.Namespace, command: Callable[[argparse.Namespace], int]) -> int:
    """Run a parsed command with --debug applied (to this process and its children) and, without it, the native
    libraries' start-up chatter filtered out of stderr (device_runtime.native_logs)."""
    if getattr(args, "debug", False):
        os.environ[DEBUG_ENV] = "1"
    with filtered_native_stderr():
        return command(args)


def add_broker_credentials(parser: argparse.ArgumentParser, username_help: str = "MQTT user name") -> None:
    """--username, --password, --tls-ca, --tls-cert, --tls-key: how every fedge command authenticates to a broker."""
    parser.add_argument("--username", help=username_help)
    parser.add_argument("--password", help=f"MQTT password (prefer the {PASSWORD_ENV} environment variable)")
    parser.add_argument("--tls-ca", metavar="PEM", help="CA bundle to verify the broker (default: system CAs)")
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS")
    parser.add_argument("--tls-key", metavar="PEM", help="client private key for mutual TLS")


def broker_password(args: argparse.Namespace) -> str | None:
    """--password, else the FEDGE_MQTT_PASSWORD environment variable; ValueError when it comes without --username."""
    password = args.password if args.password is not None else os.environ.get(PASSWORD_ENV)
    if password is not None and args.username is None:
        raise ValueError(f"a password (--password or {PASSWORD_ENV}) needs --username")
    return password


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of the device agent."""
    parser = ArgumentParser(
        prog="fedge-device",
        description="Run a fedge device: receive round tasks over MQTT, train on local data, publish updates.")
    parser.add_argument("--broker", required=True, metavar="URL",
                        help="mqtt://host[:port] (default port 1883) or mqtts://host[:port] for TLS (8883)")
    parser.add_argument("--fleet", required=True, help="fleet id: topics live under fedge/<fleet>/")
    parser.add_argument("--device-id", required=True, help="this device's id (unique in the fleet)")
    parser.add_argument("--data", required=True, metavar="PATH",
                        help="local examples: an .npz file with arrays x and y, or a folder of them")
    add_broker_credentials(parser)
    parser.add_argument("--server-public-key", metavar="PEM",
                        help="the server's Ed25519 public key: run only tasks it signed (without it, tasks are "
                             "not authenticated)")
    parser.add_argument("--cache-dir", default=str(default_cache_dir()),
                        help="where downloaded models are cached (default: %(default)s)")
    parser.add_argument("--num-threads", type=positive(int), metavar="N",
                        help="TFLite interpreter threads (default: every available core)")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="logging verbosity (default: %(default)s)")
    add_debug_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent until SIGTERM/SIGINT; 0 after a clean stop, 2 for bad arguments or data."""
    parser = build_parser()
    return run_command(parser.parse_args(argv), lambda args: _run_agent(parser, args))


def _run_agent(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The agent's life: connect, run tasks until a signal, stop."""
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        password = broker_password(args)
    except ValueError as error:
        parser.error(str(error))

    from device_runtime.agent import DeviceAgent  # after parsing: --help stays fast
    from device_runtime.signing import key_id, load_public_key

    try:
        public_key = None if args.server_public_key is None else load_public_key(args.server_public_key)
        agent = DeviceAgent(args.broker, args.fleet, args.device_id, args.data, cache_dir=args.cache_dir,
                            username=args.username, password=password, tls_ca=args.tls_ca,
                            tls_cert=args.tls_cert, tls_key=args.tls_key, server_public_key=public_key,
                            num_threads=args.num_threads)
    except (ValueError, TypeError, OSError) as error:
        print_errors("fedge-device", error)
        return 2
    if public_key is None:
        logger.warning("no --server-public-key: tasks and models are not authenticated (unsigned operation)")
    else:
        logger.info("running only tasks signed by server key %s", key_id(public_key))

    stop = stop_on_signals()
    agent.start()
    logger.info("device %s of fleet %s running; SIGTERM or Ctrl-C stops it", args.device_id, args.fleet)
    while not stop.wait(0.5):
        pass
    agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
