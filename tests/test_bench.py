"""The benchmark suite runs, for real, as a user would start it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_runs_in_its_shortest_mode(tmp_path):
    """Every part of the suite, cut to its smallest: it runs, and writes a full report."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--rounds=1",
            "--seconds=0.3",
            "--modes=sock",
            "--sizes=1024",
            "--conns=4",
            "--http-servers=aiohttp",
            "--http-paths=/",
            "--http-conns=8",
            "--bulk-sizes=65536",
            "--udp-sizes=16384",
            "--bulk-mib=16",
            "--udp-mib=16",
            "--internals=async_generators",
            f"--out={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("results-*.json")
    data = json.loads(result.read_text())
    assert "call_soon_per_s" in data["micro"]
    echo = data["echo"][0]
    assert set(echo["rps"]) >= {"asyncio", "uvloop", "uringloop", "c-liburing"}
    assert all(v["median"] > 0 for v in echo["rps"].values()), echo["rps"]
    (http,) = data["http"]
    assert http["rps"]["uringloop"]["median"] > 0
    bulk = {b["proto"]: b for b in data["bulk"]}
    assert set(bulk["tcp"]["cpu_ms_per_gib"]) >= {"uringloop", "uringloop-copy", "uringloop-fixed"}
    # UDP needs a network namespace (root and iproute2); without one the report says why
    if "udp" in bulk:
        assert bulk["udp"]["mbytes_per_s"]["uringloop"]["median"] > 0
    else:
        assert any("UDP bulk skipped" in n for n in data["notes"])
    assert set(data["internals"]["async_generators"]) == {"asyncio", "uvloop", "rloop", "uringloop"}
    # the report: a Markdown page with its plots beside it
    assert data["plots"] and all((tmp_path / name).stat().st_size > 0 for name in data["plots"])
    (page,) = tmp_path.glob("results-*.md")
    text = page.read_text()
    assert "uringloop / uvloop" in text and all(name in text for name in data["plots"])
