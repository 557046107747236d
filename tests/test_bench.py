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
            "--clients=pg-select:2,redis-pipeline:1",
            "--proxy-sizes=65536",
            "--proxy-conns=1",
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
    # the clients against real PostgreSQL and redis-server (CI installs both)
    assert [(c["work"], c["conns"]) for c in data["clients"]] == [
        ("pg-select", 2),
        ("redis-pipeline", 1),
    ], data["notes"]
    for cell in data["clients"]:
        assert set(cell["ops_per_s"]) == {"asyncio", "uvloop", "rloop", "uringloop"}, cell
        assert all(v["median"] > 0 for v in cell["client_cpu_us_per_op"].values()), cell
    # the proxy: forwarding inside the kernel and three copying proxies
    (proxy,) = data["proxy"]
    assert (proxy["size"], proxy["conns"]) == (65536, 1)
    assert set(proxy["mib_per_s"]) == {
        "uringloop-splice",
        "uringloop-copy",
        "uvloop-copy",
        "asyncio-copy",
    }
    assert all(v["median"] > 0 for v in proxy["proxy_cpu_ms_per_gib"].values()), proxy
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


def test_bench_udp_echo_part(tmp_path):
    """The UDP echo part, cut to one small cell: each loop that can serve datagrams echoes them."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--only=udp",
            "--rounds=1",
            "--seconds=1",
            "--udp-echo-sizes=1024",
            "--udp-echo-clients=4",
            f"--out={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("results-*.json")
    data = json.loads(result.read_text())
    assert not data["echo"] and not data["http"] and not data["bulk"]
    (cell,) = data["udp"]
    assert (cell["size"], cell["clients"]) == (1024, 4)
    served = set(cell["dgram_per_s"])
    # our loop, the stdlib's, uvloop and the C ceiling must serve; rloop may be left out,
    # and then the notes say why
    assert served >= {"asyncio", "uvloop", "uringloop", "c-liburing"}, data["notes"]
    if "rloop" not in served:
        assert any(n.startswith("UDP echo: rloop left out") for n in data["notes"])
    for loop in served:
        assert cell["dgram_per_s"][loop]["median"] > 0, loop
        assert cell["server_cpu_us_per_dgram"][loop]["median"] > 0, loop
        assert 0 < cell["p50_us"][loop]["median"] <= cell["p99_us"][loop]["median"], loop
        assert cell["losses"][loop] == [0] or "lost" in " ".join(data["notes"]), loop
    (page,) = tmp_path.glob("results-*.md")
    text = page.read_text()
    assert "| UDP echo |" in text and "uringloop / uvloop" in text
    assert "uringloop / c-liburing" in text and "udp echo 1024 B x4 datagrams/s" in text


def test_bench_churn_part(tmp_path):
    """The churn soak, cut to 600 cycles a series: four series (a uringloop client and
    the C client, echo and abort), every counter flat, a table and a plot of them."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--only=churn", "--churn-cycles=600", f"--out={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAIL" not in proc.stdout
    (result,) = tmp_path.glob("results-*.json")
    data = json.loads(result.read_text())
    series = {(s["client"], s["kind"]): s for s in data["churn"]}
    assert set(series) == {(c, k) for c in ("uringloop", "C") for k in ("echo", "abort")}
    for (client, kind), s in series.items():
        # a sample every 100 cycles, taken once every connection had ended on the server
        assert [x["cycle"] for x in s["samples"]] == list(range(0, 601, 100))
        assert all(x["settled"] for x in s["samples"]), (client, kind)
        ends = s["server_ends"]
        if kind == "echo":
            assert ends["echo"] == 600, (client, ends)
        else:  # a third each: reset by the client, aborted by the server, plain close
            assert ends["client_reset"] == ends["server_abort"] == ends["eof"] == 200, ends
        rows = {r["counter"]: r for r in s["flatness"]}
        assert {"fds", "rss_kib", "recv_buffers_out", "inflight", "records"} <= set(rows)
        assert all(r["ok"] for r in rows.values()), (client, kind, rows)
    assert data["plots"] == [p for p in data["plots"] if p.startswith("churn-")] != []
    assert (tmp_path / data["plots"][0]).stat().st_size > 0
    text = next(tmp_path.glob("results-*.md")).read_text()
    assert "| connection churn, 600 cycles per series" in text and "![churn-" in text
