"""Coverage-guided fuzzing of the update decoder (atheris, i.e. libFuzzer): no crash, bounded allocation.

    python tests/fuzz_update.py CORPUS_DIR -runs=100000 -max_len=4096

An empty CORPUS_DIR is first filled with `seed_payloads()`, valid payloads to mutate. Every input must either
decode to an update that keeps the decoder's promises or raise ProtocolError; any other
exception, or a decode whose tracemalloc peak exceeds the manifest's payload limit
(`max_update_bytes`), is a crash. With FEDGE_FUZZ_STATS=path the harness writes its counts
there (JSON) every 1,000 inputs, for tests/test_fuzz.py.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tracemalloc
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from manifests import manifest_for

if TYPE_CHECKING:  # imported for real only inside atheris' instrumentation (main)
    from device_runtime.protocol import ModelUpdate

MANIFEST = manifest_for([[2, 4], [3], [], [16, 16]])
STATS_EVERY = 1000


def seed_payloads() -> list[bytes]:
    """Valid payloads for MANIFEST in every encoding, dense and top-k sparse: the corpus to mutate."""
    from device_runtime.protocol import ModelUpdate, encode_update

    rng = np.random.default_rng(0)
    update = ModelUpdate(fleet="fleet", round=3, device_id="dev-1", update_id="u-1",
                         model_hash=MANIFEST.content_hash, num_examples=12,
                         metrics={"loss_sum": 3.5, "num_examples": 12.0},
                         tensors=[rng.normal(size=w.shape).astype(np.float32) for w in MANIFEST.weights],
                         run_id="run-1")
    return [encode_update(update, encoding, topk)
            for encoding in ("float32", "float16", "int8") for topk in (None, 0.1)]


class Harness:
    """One decode per input: refused with ProtocolError or valid, and never allocating past the payload limit."""

    def __init__(self, stats_path: str | None) -> None:
        from device_runtime.protocol import max_update_bytes

        self.limit = max_update_bytes(MANIFEST)
        self.stats_path = stats_path
        self.stats = {"inputs": 0, "decoded": 0, "refused": 0, "peak_bytes": 0, "limit_bytes": self.limit}
        tracemalloc.start()

    def __call__(self, data: bytes) -> None:
        """Decode `data` once, checking the outcome and the allocation peak."""
        from device_runtime.protocol import ProtocolError, decode_update

        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        try:
            update = decode_update(data, MANIFEST)
        except ProtocolError:
            self.stats["refused"] += 1
        else:
            self.stats["decoded"] += 1
            check_promises(update)
        peak = tracemalloc.get_traced_memory()[1] - before
        if peak > self.limit:
            raise AssertionError(f"decoding {len(data)} bytes allocated {peak} bytes, more than the {self.limit} "
                                 f"the manifest allows a payload")
        self.stats["peak_bytes"] = max(self.stats["peak_bytes"], peak)
        self.stats["inputs"] += 1
        if self.stats_path and self.stats["inputs"] % STATS_EVERY == 0:
            Path(self.stats_path).write_text(json.dumps(self.stats))


def check_promises(update: ModelUpdate) -> None:
    """What decode_update promises about an update it returns: the manifest's shapes, float32, finite values."""
    assert update.model_hash == MANIFEST.content_hash
    assert sorted(update.metrics) == sorted(MANIFEST.metrics.variables)
    assert all(math.isfinite(value) for value in update.metrics.values())
    assert len(update.tensors) == len(MANIFEST.weights)
    for tensor, weight in zip(update.tensors, MANIFEST.weights):
        assert tensor.dtype == np.float32 and tensor.shape == tuple(weight.shape) and np.isfinite(tensor).all()


def main() -> None:
    """Run libFuzzer on the decoder with the command line's options (corpus directories, -runs, -max_len, ...)."""
    import atheris

    for argument in sys.argv[1:]:
        corpus = Path(argument)
        if not argument.startswith("-") and corpus.is_dir() and not any(corpus.iterdir()):
            for index, payload in enumerate(seed_payloads()):
                (corpus / f"seed-{index}").write_bytes(payload)
    with atheris.instrument_imports(include=["device_runtime.protocol"]):
        import device_runtime.protocol.codec  # noqa: F401 (instrumented for coverage feedback)
    atheris.Setup(sys.argv, Harness(os.environ.get("FEDGE_FUZZ_STATS")))
    atheris.Fuzz()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
