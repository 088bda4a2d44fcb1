"""The `fedge` command: `fedge new` starts a job, `fedge simulate` runs it on an emulated fleet, `fedge serve`
runs it with real devices over MQTT, `fedge export` takes the trained model out of a checkpoint, `fedge convert`
lowers a saved Keras model, `fedge inspect` reads an artifact, `fedge broker-config` and `fedge signing-key`
secure a fleet.

TensorFlow is imported only where a model is converted (`convert`, and `simulate` or `serve` of a job whose
model is not a `.tflite`); `serve` of a `.tflite` and `inspect` need the device-side dependencies alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before any command imports TensorFlow

from device_runtime.artifact import ArtifactError, list_operators, list_signatures, read_manifest, verify_content_hash
from device_runtime.cli import ArgumentParser, add_debug_flag, print_errors, run_command
from fedge import __version__, new_job
from fedge.job import JobError, parse_job
from fedge.job.spec import CLIENT_OPTIMIZERS, LOSSES
from fedge.server import serve
from fedge import simulate
from fedge import export

# What `pip install 'fedge[desktop]'` adds to a device-only install: conversion, datasets, reports, the embedded broker.
DESKTOP_MODULES = frozenset({"tensorflow", "keras", "sklearn", "rich", "matplotlib", "amqtt", "dp_accounting",
                             "tensorboardX"})


def convert_command(args: argparse.Namespace) -> int:
    """Convert a saved Keras model to a trainable artifact: the flags are a job's [model] keys, checked and
    converted as a job's model is (fedge.job), every problem reported at once."""
    from fedge.job.build import build_model

    optimizer = {"name": args.optimizer, "learning_rate": args.learning_rate}
    optimizer.update({key: getattr(args, key) for key in ("momentum", "nesterov", "beta_1", "beta_2", "epsilon")
                      if getattr(args, key) is not None})
    model = {"keras": str(Path(args.model).absolute()), "loss": args.loss, "from_logits": args.from_logits,
             "batch_size": args.batch_size, "optimizer": optimizer}
    model.update({key: getattr(args, key) for key in ("metrics", "name") if getattr(args, key) is not None})
    try:
        job = parse_job({"model": model, "fleet": {"id": "convert"}}, Path(args.model), Path.cwd())
        artifact = build_model(job).artifact
        output = Path(args.output or Path(args.model).with_suffix(".tflite"))
        artifact.save(output)
    except (JobError, OSError) as error:
        print_errors("fedge convert", error)
        return 2
    print(f"wrote {output} ({len(artifact.tflite_bytes):,} bytes, {artifact.manifest.num_parameters:,} parameters, "
          f"batch {artifact.manifest.batch_size}, {artifact.content_hash})")
    return 0


def inspect_report(model_bytes: bytes) -> dict[str, Any]:
    """Everything `fedge inspect` shows, as a JSON-ready dict."""
    operators = list_operators(model_bytes)
    manifest = read_manifest(model_bytes)
    try:
        hash_status, hash_ok = f"ok ({verify_content_hash(model_bytes)})", True
    except ArtifactError as error:
        hash_status, hash_ok = f"MISMATCH: {error}", False
    return {
        "size_bytes": len(model_bytes),
        "num_parameters": manifest.num_parameters,
        "builtin_only": all(op.builtin for op in operators),
        "content_hash": hash_status,
        "content_hash_ok": hash_ok,
        "signatures": {s.key: {"inputs": {t.name: [list(t.shape), t.dtype] for t in s.inputs},
                               "outputs": {t.name: [list(t.shape), t.dtype] for t in s.outputs}}
                       for s in list_signatures(model_bytes)},
        "operators": {op.name: op.count for op in operators},
        "non_builtin_operators": [op.name for op in operators if not op.builtin],
        "manifest": dict(manifest.json),
    }


def _print_report(path: str, report: dict[str, Any]) -> None:
    verdict = "yes" if report["builtin_only"] else f"NO ({', '.join(report['non_builtin_operators'])})"
    manifest = report["manifest"]
    print(f"{path}: {report['size_bytes']:,} bytes, {report['num_parameters']:,} parameters")
    print(f"builtin ops only: {verdict}")
    print(f"content hash: {report['content_hash']}")
    print(f"batch size {manifest['batch_size']}, loss {manifest['loss']}, optimizer {manifest['optimizer']}")
    print("signatures:")
    for key, io in report["signatures"].items():
        inputs = ", ".join(f"{name}{shape} {dtype}" for name, (shape, dtype) in io["inputs"].items())
        outputs = ", ".join(f"{name}{shape} {dtype}" for name, (shape, dtype) in io["outputs"].items())
        print(f"  {key}({inputs}) -> {outputs}")
    print("operators:")
    for name, count in report["operators"].items():
        print(f"  {count:6d}  {name}")
    print("manifest:")
    print(json.dumps(manifest, indent=2))


def inspect_command(args: argparse.Namespace) -> int:
    """Print an artifact's signatures, operators, builtin-only verdict, size and manifest."""
    try:
        report = inspect_report(Path(args.file).read_bytes())
    except (OSError, ArtifactError) as error:
        print_errors("fedge inspect", ValueError(f"{args.file}: {error}"))
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(args.file, report)
    return 0 if report["builtin_only"] and report["content_hash_ok"] else 1


def signing_key_command(args: argparse.Namespace) -> int:
    """Write a new Ed25519 task-signing key pair (the private key never overwrites an existing file)."""
    from device_runtime.signing import write_signing_key

    public = args.public or str(Path(args.private).with_suffix("")) + ".pub.pem"
    try:
        kid = write_signing_key(args.private, public)
    except FileExistsError:
        print(f"fedge signing-key: error: {args.private} exists; a signing key is never overwritten", file=sys.stderr)
        return 2
    except OSError as error:
        print_errors("fedge signing-key", error)
        return 2
    print(f"wrote {args.private} (private: fedge serve --signing-key) and {public} (public: fedge-device "
          f"--server-public-key); key id {kid}")
    return 0


def broker_config_command(args: argparse.Namespace) -> int:
    """Write a fleet's Mosquitto configuration: CA, server certificate, passwords, ACLs (fedge.broker_config)."""
    from fedge.broker_config import write_broker_config

    devices = list(args.devices or [])
    try:
        if args.devices_file:
            devices += [line.strip() for line in Path(args.devices_file).read_text().splitlines() if line.strip()]
        files = write_broker_config(args.directory, args.fleet, devices, hostnames=args.hostname or
                                    ("localhost", "127.0.0.1"), port=args.port, bind=args.bind,
                                    server_user=args.server_user, client_certs=args.client_certs)
    except (OSError, ValueError) as error:
        print_errors("fedge broker-config", error)
        return 2
    print(f"wrote the broker configuration of fleet {args.fleet!r} ({len(devices)} devices) to {files.directory}\n"
          f"  start:       mosquitto -c {files.config}\n"
          f"  CA for TLS:  {files.ca_cert} (--tls-ca on the server and every device)\n"
          f"  passwords:   {files.credentials} (user name -> password; keep it secret)")
    return 0


def _add_security_parsers(commands: Any) -> None:
    """`fedge broker-config` and `fedge signing-key`."""
    broker = commands.add_parser("broker-config", help="write a Mosquitto configuration for a fleet: TLS (a new CA), "
                                 "per-device passwords, topic ACLs, no anonymous clients")
    broker.add_argument("directory", help="where the files go (re-running keeps the CA and existing passwords)")
    broker.add_argument("--fleet", required=True, help="fleet id: topics live under fedge/<fleet>/")
    broker.add_argument("--devices", nargs="*", metavar="ID", help="device ids (each is its MQTT user name)")
    broker.add_argument("--devices-file", metavar="FILE", help="more device ids, one per line")
    broker.add_argument("--hostname", action="append", metavar="NAME",
                        help="a host name or IP address the server certificate names (repeatable; "
                             "default: localhost and 127.0.0.1)")
    broker.add_argument("--port", type=int, default=8883, help="TLS listener port (default: %(default)s)")
    broker.add_argument("--bind", metavar="ADDRESS", help="listen on this address only (default: every interface)")
    broker.add_argument("--server-user", default="fedge-server", help="the server's user name (default: %(default)s)")
    broker.add_argument("--client-certs", action="store_true",
                        help="also issue a client certificate per account and require one (mutual TLS)")
    broker.set_defaults(run=broker_config_command)

    signing = commands.add_parser("signing-key", help="write a new Ed25519 key pair that signs tasks")
    signing.add_argument("private", help="the private key's PEM file (created with mode 0600; never overwritten)")
    signing.add_argument("--public", help="the public key's PEM file (default: <private without .pem>.pub.pem)")
    signing.set_defaults(run=signing_key_command)


def _installed(module: str) -> bool:
    """Whether the top-level `module` can be found (a module blocked with None in sys.modules cannot)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="fedge", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fedge {__version__}")
    add_debug_flag(parser)
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="lower a saved Keras model (.keras) to a trainable .tflite")
    convert.add_argument("model", help="a model saved with model.save('model.keras')")
    convert.add_argument("-o", "--output", help="output .tflite path (default: the model's path with .tflite)")
    convert.add_argument("--loss", required=True, choices=LOSSES)
    convert.add_argument("--from-logits", action="store_true", help="the model outputs logits (cross-entropy losses)")
    convert.add_argument("--optimizer", choices=CLIENT_OPTIMIZERS, default="sgd")
    convert.add_argument("--learning-rate", type=float, default=0.01)
    convert.add_argument("--momentum", type=float, help="SGD momentum (default 0)")
    convert.add_argument("--nesterov", action="store_true", default=None, help="SGD with Nesterov momentum")
    convert.add_argument("--beta-1", type=float, help="Adam beta_1 (default 0.9)")
    convert.add_argument("--beta-2", type=float, help="Adam beta_2 (default 0.999)")
    convert.add_argument("--epsilon", type=float, help="Adam epsilon (default 1e-7)")
    convert.add_argument("--batch-size", type=int, required=True)
    convert.add_argument("--metrics", nargs="*", help="'accuracy' or nothing (default: accuracy for cross-entropy)")
    convert.add_argument("--name", help="model name recorded in the manifest")
    convert.set_defaults(run=convert_command)

    new = commands.add_parser("new", help="write a job folder to start from: a commented job.toml, a tiny model "
                              "and data, so `fedge simulate DIR/job.toml` runs at once")
    new_job.add_arguments(new)
    new.set_defaults(run=new_job.new_command)

    simulated = commands.add_parser("simulate", help="run a job on an emulated device fleet (embedded broker, "
                                    "server, simulated devices) and write a report folder; without a job file, "
                                    "the bundled digits job")
    simulate.add_arguments(simulated)
    simulated.set_defaults(run=simulate.simulate_command)

    inspect = commands.add_parser("inspect", help="show an artifact's signatures, operators and manifest")
    inspect.add_argument("file")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(run=inspect_command)

    served = commands.add_parser("serve", help="run a job's rounds with real devices over MQTT (resumes from its "
                                 "checkpoint)")
    serve.add_arguments(served)
    served.set_defaults(run=serve.serve_command)

    exported = commands.add_parser("export", help="write the trained model of a fedge serve or fedge simulate "
                                   "checkpoint folder as a .keras model or an inference .tflite")
    export.add_arguments(exported)
    exported.set_defaults(run=export.export_command)
    _add_security_parsers(commands)
    for command in commands.choices.values():  # `fedge --debug simulate` and `fedge simulate --debug` alike
        add_debug_flag(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_command(args, args.run)
    except ModuleNotFoundError as error:
        missing = (error.name or "").split(".")[0]
        if missing not in DESKTOP_MODULES or _installed(missing):  # installed but broken: its own traceback
            raise
        print_errors(f"fedge {args.command}", RuntimeError(
            f"this command needs the desktop extra, which this install lacks (No module named {missing!r}): "
            f"pip install 'fedge[desktop]'"))
        return 2


if __name__ == "__main__":
    sys.exit(main())
