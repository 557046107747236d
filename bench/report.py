"""The report: Markdown tables of medians with ratios, and PNG plots of the same numbers."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

LOOP_COLORS = {
    "asyncio": "#9e9e9e",
    "uvloop": "#1f77b4",
    "rloop": "#ff7f0e",
    "uringloop": "#d62728",
    "c-liburing": "#2ca02c",
    "uringloop-copy": "#ff9896",
    "uringloop-fixed": "#8c564b",
    "uringloop-fixed-copy": "#e377c2",
}


def summarize(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def _version(distribution: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, str]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    try:
        liburing = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "liburing-dev"],
            capture_output=True,
            text=True,
        ).stdout
    except OSError:
        liburing = ""
    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
        "liburing": liburing or "unknown",
    }
    env["uringloop"] = _version("uringloop-zc")
    for name in (
        "uvloop",
        "rloop",
        "aiohttp",
        "uvicorn",
        "starlette",
        "hypercorn",
        "pyperformance",
    ):
        env[name] = _version(name)
    return env


class Report:
    """Markdown rows of medians (min-max), with ratios between medians of this invocation."""

    def __init__(self, echo: Callable[[str], None] = print) -> None:
        self.lines: list[str] = []
        self.echo = echo

    def header(self, title: str, columns: list[str], ratios: list[tuple[str, str]]) -> None:
        self.columns, self.ratios = columns, ratios
        labels = [f"{a} / {b}" for a, b in ratios]
        self.lines += [
            "",
            f"| {title} | " + " | ".join(columns) + " | " + " | ".join(labels) + " |",
            "|---|" + "---|" * (len(columns) + len(ratios)),
        ]
        self.echo("\n".join(self.lines[-3:]))

    def table(self, title: str, columns: list[str]) -> None:
        """A table of plain cells (no medians, no ratios): rows come from cells()."""
        self.lines += [
            "",
            f"| {title} | " + " | ".join(columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        self.echo("\n".join(self.lines[-3:]))

    def cells(self, name: str, cells: list[str]) -> None:
        self.lines.append(f"| {name} | " + " | ".join(cells) + " |")
        self.echo(self.lines[-1])

    def row(self, name: str, per: dict[str, list[float]], unit: str, higher_is_better=True):
        stats = {k: summarize(v) for k, v in per.items() if v}
        med = {k: s["median"] for k, s in stats.items()}
        cells = [
            f"{med[c]:,.{0 if med[c] >= 100 else 3}f} {unit} "
            f"({stats[c]['min']:,.{0 if med[c] >= 100 else 3}f}-"
            f"{stats[c]['max']:,.{0 if med[c] >= 100 else 3}f})"
            if c in med
            else "n/a"
            for c in self.columns
        ]
        for a, b in self.ratios:
            if a in med and b in med and med[b]:
                r = med[a] / med[b]
                cells.append(f"{r:.2f}x" + ("" if higher_is_better else " (lower is better)"))
            else:
                cells.append("n/a")
        self.lines.append(f"| {name} | " + " | ".join(cells) + " |")
        self.echo(self.lines[-1])
        return stats


def _median(cell: dict, loop: str) -> float | None:
    return cell[loop]["median"] if loop in cell else None


def plot(results: dict, out_dir: Path, stamp: str) -> list[Path]:
    """PNG plots of the results; returns the files written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        results["notes"].append("plots skipped: matplotlib is not installed")
        return []
    files: list[Path] = []

    def save(fig, name: str) -> None:
        path = out_dir / f"{name}-{stamp}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)

    def bars(ax, groups: list[str], per_loop: dict[str, list[float | None]], ylabel: str):
        loops = list(per_loop)
        width = 0.8 / max(len(loops), 1)
        for i, lp in enumerate(loops):
            xs = [g + (i - (len(loops) - 1) / 2) * width for g in range(len(groups))]
            ys = [v or 0 for v in per_loop[lp]]
            ax.bar(xs, ys, width, label=lp, color=LOOP_COLORS.get(lp))
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)

    echo = results.get("echo", [])
    if echo:
        modes = sorted({c["mode"] for c in echo})
        conns = sorted({c["conns"] for c in echo})
        fig, axes = plt.subplots(
            len(modes), len(conns), figsize=(4.5 * len(conns), 3.2 * len(modes)), squeeze=False
        )
        for i, mode in enumerate(modes):
            for j, c in enumerate(conns):
                cells = sorted(
                    (x for x in echo if x["mode"] == mode and x["conns"] == c),
                    key=lambda x: x["size"],
                )
                loops = list(cells[0]["rps"]) if cells else []
                per = {lp: [_median(x["rps"], lp) for x in cells] for lp in loops}
                bars(axes[i][j], [f"{x['size'] // 1024} KiB" for x in cells], per, "req/s")
                axes[i][j].set_title(f"echo {mode}, {c} connection{'s' * (c > 1)}")
        axes[0][0].legend(fontsize=8)
        save(fig, "echo-rps")

        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 3.4), squeeze=False)
        for i, mode in enumerate(modes):
            cells = [x for x in echo if x["mode"] == mode]
            labels = [f"{x['size'] // 1024}K x{x['conns']}" for x in cells]
            loops = list(cells[0]["p99_us"]) if cells else []
            ax = axes[0][i]
            for k, lp in enumerate(loops):
                p50 = [_median(x["p50_us"], lp) for x in cells]
                p99 = [_median(x["p99_us"], lp) for x in cells]
                xs = [g + (k - (len(loops) - 1) / 2) * 0.8 / len(loops) for g in range(len(cells))]
                ax.scatter(xs, p50, marker="o", color=LOOP_COLORS.get(lp), label=f"{lp} p50")
                ax.scatter(xs, p99, marker="^", color=LOOP_COLORS.get(lp), label=f"{lp} p99")
            ax.set_yscale("log")
            ax.set_xticks(range(len(cells)), labels, rotation=45, fontsize=7)
            ax.set_ylabel("latency (us)")
            ax.set_title(f"echo {mode}: p50 (o) and p99 (^)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=6, ncol=2)
        save(fig, "echo-latency")

    udp = results.get("udp", [])
    if udp:
        clients = sorted({c["clients"] for c in udp})
        fig, axes = plt.subplots(1, len(clients), figsize=(4.5 * len(clients), 3.2), squeeze=False)
        for j, c in enumerate(clients):
            cells = sorted((x for x in udp if x["clients"] == c), key=lambda x: x["size"])
            loops = list(dict.fromkeys(lp for x in cells for lp in x["dgram_per_s"]))
            per = {lp: [_median(x["dgram_per_s"], lp) for x in cells] for lp in loops}
            bars(axes[0][j], [f"{x['size']} B" for x in cells], per, "datagrams/s")
            axes[0][j].set_title(f"UDP echo, {c} client{'s' * (c > 1)}")
        axes[0][0].legend(fontsize=8)
        save(fig, "udp-echo")

    http = results.get("http", [])
    if http:
        labels = [f"{x['server']} {x['path']} x{x['conns']}" for x in http]
        loops = list(http[0]["rps"])
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
        bars(axes[0], labels, {lp: [_median(x["rps"], lp) for x in http] for lp in loops}, "req/s")
        axes[0].tick_params(axis="x", rotation=45, labelsize=7)
        axes[0].set_title("HTTP (wrk) requests/s")
        axes[0].legend(fontsize=8)
        bars(
            axes[1],
            labels,
            {lp: [_median(x["p99_us"], lp) for x in http] for lp in loops},
            "p99 latency (us)",
        )
        axes[1].tick_params(axis="x", rotation=45, labelsize=7)
        axes[1].set_title("HTTP p99 latency")
        save(fig, "http")

    clients = results.get("clients", [])
    if clients:
        labels = [f"{x['work']} x{x['conns']}" for x in clients]
        loops = list(clients[0]["ops_per_s"])
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
        for ax, key, ylabel, title in (
            (axes[0], "ops_per_s", "operations/s", "database and cache clients"),
            (axes[1], "client_cpu_us_per_op", "client CPU (us/op)", "client CPU per operation"),
        ):
            bars(ax, labels, {lp: [_median(x[key], lp) for x in clients] for lp in loops}, ylabel)
            ax.set_yscale("log")
            ax.tick_params(axis="x", rotation=45, labelsize=7)
            ax.set_title(title)
        axes[0].legend(fontsize=8)
        save(fig, "clients")

    bulk = results.get("bulk", [])
    if bulk:
        protos = sorted({x["proto"] for x in bulk})
        fig, axes = plt.subplots(1, len(protos), figsize=(6 * len(protos), 3.8), squeeze=False)
        for i, proto in enumerate(protos):
            cells = sorted((x for x in bulk if x["proto"] == proto), key=lambda x: x["size"])
            ax = axes[0][i]
            for lp in cells[0]["cpu_ms_per_gib"]:
                sizes = [x["size"] for x in cells]
                total = [_median(x["cpu_ms_per_gib"], lp) for x in cells]
                kernel = [_median(x["kernel_cpu_ms_per_gib"], lp) for x in cells]
                color = LOOP_COLORS.get(lp)
                ax.plot(sizes, total, marker="o", color=color, label=f"{lp}")
                ax.plot(sizes, kernel, marker=".", linestyle=":", color=color)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("write size (bytes)")
            ax.set_ylabel("sender CPU ms per GiB (dotted: kernel)")
            where = "loopback TCP" if proto == "tcp" else "UDP into a dead-end veth"
            ax.set_title(f"bulk send, {where}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        save(fig, "bulk-cpu")

    internals = results.get("internals", {})
    if internals:
        names = list(internals)
        loops = list(next(iter(internals.values())))
        per = {
            lp: [
                (_median(internals[n], lp) or 0) / (_median(internals[n], "asyncio") or 1)
                for n in names
            ]
            for lp in loops
        }
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 3.6))
        bars(ax, names, per, "time / asyncio's (lower is better)")
        ax.tick_params(axis="x", rotation=45, labelsize=7)
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_title("pyperformance asyncio benchmarks")
        ax.legend(fontsize=8)
        save(fig, "internals")

    churn = results.get("churn", [])
    if churn:
        counters = [
            name
            for name in (
                "fds",
                "rss_kib",
                "recv_buffers_out",
                "datagram_buffers_out",
                "zerocopy_buffer_bytes",
                "pinned_bytes",
                "inflight",
                "records",
                "tasks",
                "transports",
            )
            if any(name in series["samples"][-1] for series in churn)
        ]
        ncols = 5
        nrows = -(-len(counters) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows), squeeze=False)
        for i, name in enumerate(counters):
            ax = axes[i // ncols][i % ncols]
            for series in churn:
                samples = [s for s in series["samples"] if name in s]
                scale = 1024 if name == "rss_kib" else 1
                ax.plot(
                    [s["cycle"] for s in samples],
                    [s[name] / scale for s in samples],
                    color=LOOP_COLORS[
                        "uringloop" if series["client"] == "uringloop" else "c-liburing"
                    ],
                    linestyle="-" if series["kind"] == "echo" else "--",
                    marker=".",
                    markersize=3,
                    label=f"{series['kind']}, {series['client']} client",
                )
                ax.axvline(series["baseline_cycle"], color="black", linewidth=0.5, linestyle=":")
            ax.set_title("RSS (MiB)" if name == "rss_kib" else name, fontsize=9)
            ax.set_xlabel("cycles", fontsize=8)
            ax.ticklabel_format(axis="y", useOffset=False, style="plain")
            ax.grid(alpha=0.3)
        for j in range(len(counters), nrows * ncols):
            axes[j // ncols][j % ncols].set_visible(False)
        axes[0][0].legend(fontsize=7)
        fig.suptitle("connection churn: server counters (dotted line: baseline after warm-up)")
        save(fig, "churn")
    return files


def write(results: dict, report: Report, out_dir: Path, argv: list[str]) -> tuple[Path, Path]:
    """Write results-<time>.json and .md (with the plots) into out_dir."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%H%M%S")
    pngs = plot(results, out_dir, stamp)
    results["plots"] = [p.name for p in pngs]
    json_path = out_dir / f"results-{stamp}.json"
    json_path.write_text(json.dumps(results, indent=2))
    cmd = "python -m bench " + " ".join(argv)
    env = results["environment"]
    md = [
        "# Benchmark results",
        "",
        f"`{cmd}`",
        "",
        ", ".join(f"{k}: {v}" for k, v in env.items()),
        "",
        f"Medians of {results['rounds']} alternating rounds (min-max); servers and senders on "
        "CPU 0, load generators and sinks on CPU 1; ratios are between medians of this run.",
        *report.lines,
        "",
        *(f"![{p.stem}]({p.name})" for p in pngs),
        *(f"\n{n}" for n in results["notes"]),
    ]
    md_path = out_dir / f"results-{stamp}.md"
    md_path.write_text("\n".join(md) + "\n")
    return json_path, md_path


def progress(total: int):
    """A progress bar on stderr (tqdm), or a stand-in when tqdm is missing."""
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True)
    except ImportError:

        class Plain:
            def update(self, n: int = 1) -> None:
                pass

            def set_description(self, text: str) -> None:
                print(text, file=sys.stderr, flush=True)

            def write(self, text: str) -> None:
                print(text, flush=True)

            def close(self) -> None:
                pass

        return Plain()
