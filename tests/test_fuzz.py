"""Fuzzing the update decoder: 100,000 atheris (libFuzzer) inputs plus hypothesis, no crash, bounded allocation.

The decoder is the server's security boundary (device_runtime.protocol.codec.decode_update):
whatever bytes arrive, it raises ProtocolError or returns an update that keeps its promises,
and it never allocates more than the manifest's payload limit (`max_update_bytes`) to decide.
Each test prints a `FIGURES <test> {...}` line (run with -s) for docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_runtime.protocol import ProtocolError, decode_update, max_update_bytes
from fuzz_update import MANIFEST, Harness, seed_payloads

ATHERIS_RUNS = 100_000
HYPOTHESIS_EXAMPLES = 2_000
HARNESS = Path(__file__).resolve().parent / "fuzz_update.py"
LIMIT = max_update_bytes(MANIFEST)


def report_figures(test: str, figures: dict) -> None:
    """Print the figures a test measured, for docs/reliability.md."""
    print(f"FIGURES {test} {json.dumps(figures, sort_keys=True)}")


@pytest.mark.skipif(sys.version_info[:2] != (3, 11),
                    reason="atheris 3.0.0 ships a wheel for CPython 3.11 only (the dev extra installs it there)")
def test_atheris_decodes_100k_inputs_without_a_crash_or_an_allocation_past_the_limit(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    seeds = seed_payloads()
    for index, payload in enumerate(seeds):
        (corpus / f"seed-{index}").write_bytes(payload)
    stats_path = tmp_path / "stats.json"
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(HARNESS), str(corpus), f"-runs={ATHERIS_RUNS}", "-max_len=4096",
                             "-seed=1", "-timeout=10", "-rss_limit_mb=2048"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "FEDGE_FUZZ_STATS": str(stats_path)})
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]  # an uncaught exception or a failed check exits non-zero
    assert re.search(rf"Done {ATHERIS_RUNS} runs in \d+ second", output), output[-2000:]
    stats = json.loads(stats_path.read_text())
    assert stats["inputs"] == ATHERIS_RUNS and stats["decoded"] + stats["refused"] == ATHERIS_RUNS
    assert stats["decoded"] >= len(seeds) and stats["refused"] > ATHERIS_RUNS // 2  # it explored both outcomes
    assert 0 < stats["peak_bytes"] <= stats["limit_bytes"] == LIMIT
    report_figures("test_atheris_decodes_100k_inputs_without_a_crash_or_an_allocation_past_the_limit",
                   {**stats, "seconds": round(seconds, 1), "corpus_files": len(list(corpus.iterdir()))})


def _inputs() -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, valid payloads with a spliced-in run, and valid payloads padded up to twice the limit."""
    seed = st.sampled_from(seed_payloads())
    splice = st.tuples(seed, st.integers(0, 2000), st.integers(0, 16), st.binary(min_size=1, max_size=16)).map(
        lambda t: t[0][:t[1]] + t[3] + t[0][t[1] + t[2]:])
    padded = st.tuples(seed, st.integers(1, 2 * LIMIT)).map(lambda t: t[0] + bytes(t[1]))
    return st.one_of(st.binary(max_size=2000), splice, padded)


def test_hypothesis_inputs_are_refused_or_valid_within_the_allocation_limit():
    harness = Harness(None)  # starts tracemalloc

    @settings(max_examples=HYPOTHESIS_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow],
              database=None)
    @given(_inputs())
    def decode_one(payload: bytes) -> None:
        refused = harness.stats["refused"]
        harness(payload)  # raises on anything but ProtocolError or a valid update, or on too much allocation
        if len(payload) > LIMIT:
            assert harness.stats["refused"] == refused + 1, "an oversized payload was decoded"

    started = time.monotonic()
    try:
        decode_one()
    finally:
        tracemalloc.stop()
    stats = harness.stats
    assert stats["inputs"] >= HYPOTHESIS_EXAMPLES and stats["decoded"] > 0 and stats["refused"] > 0
    assert 0 < stats["peak_bytes"] <= LIMIT
    report_figures("test_hypothesis_inputs_are_refused_or_valid_within_the_allocation_limit",
                   {**stats, "seconds": round(time.monotonic() - started, 1)})


def test_an_oversized_payload_is_refused_before_anything_is_allocated():
    payload = bytes(64 << 20)  # 64 MiB, about a thousand times the limit
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match=f"more than the {LIMIT} allowed"):
            decode_update(payload, MANIFEST)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 10, f"{peak} bytes allocated to refuse it"
    report_figures("test_an_oversized_payload_is_refused_before_anything_is_allocated",
                   {"payload_bytes": len(payload), "limit_bytes": LIMIT, "peak_bytes": peak})
