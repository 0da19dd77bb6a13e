"""The load benchmark tool itself works: `scripts/bench.py --quick` against our server.

Not a performance test (no timing is asserted): it checks that the tool drives a real
`securecollab serve` subprocess with separate load processes, that every receipted
message is reported delivered (no losses), that its crash check (SIGKILL mid-phase) finds
every receipted message in the database, and that it writes its JSON results.
RabbitMQ is deliberately not involved (`--only ours`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_bench_delivers_every_receipted_message(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench.py"),
            "--quick",
            "--only",
            "ours",
            "--workloads",
            "1",
            "--ramp",
            "200",
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "plot.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    for row in [results["fixed"]["ours"], *results["ramp"]["ours"]]:
        assert row["sent"] == row["offered_msgs"] > 0
        assert row["receipts"] == row["sent"]  # every SEND was acknowledged as durable
        assert row["delivered"] == row["receipts"]  # and reached its recipient exactly once
        assert row["lost"] == 0 and not row["errors"]
        assert row["lat"]["p50"] > 0  # latencies were measured from payload stamps
    assert "delivered" in proc.stdout and "LOSS" not in proc.stdout
    assert "FAILED" not in proc.stdout and "INVALID" not in proc.stdout
    # the one ramp step passed: the maximum is a lower bound, and said to be one
    assert results["max_capped"]["ours"] is True
    assert "at least" in proc.stdout
    # the crash check ran: a fresh server SIGKILLed mid-phase, every receipted message stored
    crash = results["crash"]
    assert crash["exit_code"] == -9
    assert crash["receipted"] > 0 and crash["missing"] == 0
    assert crash["stored"] >= crash["receipted"]
