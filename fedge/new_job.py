"""`fedge new DIR`: a job folder to start from, which `fedge simulate DIR/job.toml` runs at once.

It holds a commented `job.toml`, `model.py` (the factory the job names) and `data/train.npz`
and `data/test.npz` (scikit-learn's 8x8 digits, as a stand-in for the user's own arrays).
It never writes into a folder that holds anything.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from device_runtime.cli import print_errors

TEMPLATE_FILES = ("job.toml", "model.py")
TEST_FRACTION = 0.2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`fedge new`'s options."""
    parser.add_argument("directory", help="the folder to create (it must not exist, or be empty)")


def new_command(args: argparse.Namespace) -> int:
    """Write the job folder; 2 when the folder holds files already."""
    try:
        written = write_job_folder(Path(args.directory))
    except (FileExistsError, OSError) as error:
        print_errors("fedge new", error)
        return 2
    print(f"wrote {', '.join(str(path) for path in written)}\n"
          f"  simulate: fedge simulate {args.directory}/job.toml\n"
          f"  serve:    fedge serve {args.directory}/job.toml --broker mqtt://HOST:1883")
    return 0


def write_job_folder(directory: Path) -> list[Path]:
    """The template job, its model and its data in `directory` (FileExistsError if it holds anything)."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"{directory} exists and is not an empty folder; fedge new never writes over files")
    (directory / "data").mkdir(parents=True, exist_ok=True)
    template = resources.files("fedge.job") / "template"
    written = []
    for name in TEMPLATE_FILES:
        path = directory / name
        path.write_text((template / name).read_text())
        written.append(path)
    return written + _write_data(directory / "data")


def _write_data(folder: Path) -> list[Path]:
    """data/train.npz and data/test.npz: the digits (x float32 [N, 8, 8, 1] in [0, 1], y int32), a seeded split."""
    import numpy as np

    from fedge.simulation.datasets import digits

    x_train, y_train, x_test, y_test = digits.train_test_arrays(TEST_FRACTION, seed=0)
    np.savez(folder / "train.npz", x=x_train, y=y_train)
    np.savez(folder / "test.npz", x=x_test, y=y_test)
    return [folder / "train.npz", folder / "test.npz"]
