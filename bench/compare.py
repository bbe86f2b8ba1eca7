"""Ours and the raw baseline side by side, in the same run: both tables and ours/raw ratios.

Each side runs in its own processes (so CPU and peak RSS are its own), interleaved level by
level (raw, then ours, at each concurrency), with the same saga count. ``python -m bench`` runs
this.

Usage: ``python -m bench.compare [--levels 1,8,64] [--sagas 300] [--per-flight 16]
[--repeat 1] [--json out.json] [--markdown out.md] [--inmemory]``

``--markdown`` writes the same numbers as Markdown tables (every run, the ratios and their
medians, CPU per step of every process), for docs/performance.md to quote without retyping.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.support.measure import machine, percentile
from bench.support.processes import ROOT

if TYPE_CHECKING:
    from collections.abc import Sequence

Row = dict[str, Any]


def run_side(module: str, levels: str, sagas: int, out: Path, *extra: str) -> list[Row]:
    command = [sys.executable, "-m", module, "--levels", levels, "--sagas", str(sagas)]
    subprocess.run([*command, "--json", str(out), *extra], cwd=ROOT, check=True, timeout=900)  # noqa: S603
    rows: list[Row] = json.loads(out.read_text(encoding="utf-8"))["results"]
    return rows


def inmemory() -> str:
    """The in-memory bench with the worker's GC tuning, then with Python's own settings, then
    the floor under it (the bare mechanics, hand-written: ``bench/inmemory_floor.py``)."""
    commands = [
        [sys.executable, "bench/inmemory_overhead.py", "--gc", "worker"],
        [sys.executable, "bench/inmemory_overhead.py", "--gc", "default"],
        [sys.executable, "-m", "bench.inmemory_floor"],
    ]
    outputs = []
    for command in commands:
        out = subprocess.run(  # noqa: S603 - our own scripts
            command, cwd=ROOT, check=True, timeout=600, capture_output=True, text=True
        )
        outputs.append(out.stdout.strip())
    return "\n".join(outputs)


def ratio(ours: float, raw: float) -> str:
    if math.isnan(ours) or math.isnan(raw) or raw == 0:
        return "-"
    return f"{ours / raw:.2f}"


def _load1(row: Row) -> str:
    """The one-minute load average when the row was measured."""
    return str(row.get("load", "?")).split(" ")[0]


def ratios(pairs: list[tuple[Row, Row]]) -> str:
    """One line per (ours, raw) pair measured back to back, then the median ratio per level."""
    head = (
        f"{'in-flight':>9} {'sagas':>6} {'ours/s':>8} {'raw/s':>8} {'ours/raw':>8} "
        f"{'step p99 ours':>13} {'raw':>6} {'ratio':>6} {'cpu us/step ours':>16} {'raw':>6} "
        f"{'all cpu us/step ours':>20} {'raw':>6} {'load ours':>9} {'raw':>5}"
    )
    lines = [head, "-" * len(head)]
    by_level: dict[int, list[float]] = {}
    for row, base in pairs:
        ours_cpu = row["cpu"]["orch"] / row["steps"] * 1e6
        raw_cpu = base["cpu"]["orch"] / base["steps"] * 1e6
        # Every process of the run: orchestrator, participants, broker and database.
        ours_all = sum(row["cpu"].values()) / row["steps"] * 1e6
        raw_all = sum(base["cpu"].values()) / base["steps"] * 1e6
        by_level.setdefault(row["level"], []).append(row["sagas_per_s"] / base["sagas_per_s"])
        lines.append(
            f"{row['level']:>9} {row['sagas']:>6} {row['sagas_per_s']:>8.1f} "
            f"{base['sagas_per_s']:>8.1f} {ratio(row['sagas_per_s'], base['sagas_per_s']):>8} "
            f"{row['step_p99_ms']:>13.1f} {base['step_p99_ms']:>6.1f} "
            f"{ratio(row['step_p99_ms'], base['step_p99_ms']):>6} "
            f"{ours_cpu:>16.0f} {raw_cpu:>6.0f} {ours_all:>20.0f} {raw_all:>6.0f} "
            f"{_load1(row):>9} {_load1(base):>5}"
        )
    if any(len(values) > 1 for values in by_level.values()):
        lines.append("")
        for level, values in by_level.items():
            shown = ", ".join(f"{value:.2f}" for value in values)
            lines.append(
                f"{level:>9} in flight: ours/raw median {statistics.median(values):.2f} "
                f"(runs: {shown})"
            )
        lines.append("")
        for level, level_pairs in _pairs_by_level(pairs).items():
            (ours_p99, ours_n), (raw_p99, raw_n) = _pooled_sides(level_pairs)
            lines.append(
                f"{level:>9} in flight: step p99 pooled over the runs: ours {_cell(ours_p99)} ms "
                f"({ours_n:,} steps), raw {_cell(raw_p99)} ms ({raw_n:,}), "
                f"ratio {ratio(ours_p99, raw_p99)}"
            )
    return "\n".join(lines)


def _pairs_by_level(pairs: list[tuple[Row, Row]]) -> dict[int, list[tuple[Row, Row]]]:
    by_level: dict[int, list[tuple[Row, Row]]] = {}
    for row, base in pairs:
        by_level.setdefault(int(row["level"]), []).append((row, base))
    return by_level


def _pooled_sides(
    level_pairs: list[tuple[Row, Row]],
) -> tuple[tuple[float, int], tuple[float, int]]:
    """:func:`pooled_p99` of ours' runs and of raw's."""
    return pooled_p99([row for row, _ in level_pairs]), pooled_p99([b for _, b in level_pairs])


def pooled_p99(rows: list[Row]) -> tuple[float, int]:
    """The p99 of every run's samples together, and how many there were.

    A run of 300 sagas has 900 step samples, so its p99 is its 9th-largest sample; at 8 in
    flight one stall of the machine delays 8 steps at once, so one run's p99 turns on one or two
    stalls. Pooled over repeated runs it turns on several times as many.
    """
    samples = [value for row in rows for value in row.get("step_ms_samples", [])]
    return percentile(samples, 99), len(samples)


def _per_step(row: Row, process: str) -> float:
    return float(row["cpu"].get(process, math.nan)) / max(int(row["steps"]), 1) * 1e6


def _cell(value: float, digits: int = 1) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def markdown(pairs: list[tuple[Row, Row]], inmemory_text: str | None) -> str:
    """The run as Markdown: every measured row, the ratios, and CPU per step by process."""
    lines = [
        (
            "| impl | in flight | sagas | sagas/s | steps/s | step p50 | p95 | p99 | saga p50 | "
            "saga p99 | CPU orch / part | CPU broker / db | load |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, base in pairs:
        for impl, r in (("raw", base), ("ours", row)):
            lines.append(
                f"| {impl} | {r['level']} | {r['sagas']} | {_cell(r['sagas_per_s'])} | "
                f"{_cell(r['steps_per_s'])} | {_cell(r['step_p50_ms'])} | "
                f"{_cell(r['step_p95_ms'])} | {_cell(r['step_p99_ms'])} | "
                f"{_cell(r['saga_p50_ms'])} | {_cell(r['saga_p99_ms'])} | "
                f"{_cell(_per_step(r, 'orch'), 0)} / {_cell(_per_step(r, 'part'), 0)} | "
                f"{_cell(_per_step(r, 'broker'), 0)} / {_cell(_per_step(r, 'db'), 0)} | "
                f"{_load1(r)} |"
            )
    by_level = _pairs_by_level(pairs)
    lines += [
        "",
        (
            "| in flight | ours/raw, each pair | median | step p99 ours / raw (ms) "
            "| p99 pooled ours / raw (ms) |"
        ),
        "|---|---|---|---|---|",
    ]
    for level, level_pairs in by_level.items():
        values = [row["sagas_per_s"] / base["sagas_per_s"] for row, base in level_pairs]
        p99 = ", ".join(
            f"{_cell(row['step_p99_ms'])} / {_cell(base['step_p99_ms'])}"
            for row, base in level_pairs
        )
        (ours_p99, ours_n), (raw_p99, raw_n) = _pooled_sides(level_pairs)
        lines.append(
            f"| {level} | {', '.join(f'{value:.2f}' for value in values)} | "
            f"**{statistics.median(values):.2f}** | {p99} | "
            f"**{_cell(ours_p99)}** / {_cell(raw_p99)} ({ours_n:,} / {raw_n:,} steps) |"
        )
    lines += [
        "",
        "Median CPU per remote step (µs) over the pairs of a level:",
        "",
        "| in flight | | orchestrator | participants | broker | database | **all** |",
        "|---|---|---|---|---|---|---|",
    ]
    processes = ("orch", "part", "broker", "db")
    for level, level_pairs in by_level.items():
        for impl, index in (("ours", 0), ("raw", 1)):
            rows = [pair[index] for pair in level_pairs]
            cells = [statistics.median(_per_step(r, p) for r in rows) for p in processes]
            total = statistics.median(
                sum(_per_step(r, p) for p in processes if p in r["cpu"]) for r in rows
            )
            shown = " | ".join(_cell(value, 0) for value in cells)
            label = level if impl == "ours" else ""
            lines.append(f"| {label} | {impl} | {shown} | **{_cell(total, 0)}** |")
    if inmemory_text:
        lines += ["", "```", inmemory_text, "```"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,8,64")
    parser.add_argument(
        "--sagas", type=int, default=300, help="measured sagas per level (at least)"
    )
    parser.add_argument(
        "--per-flight",
        type=int,
        default=16,
        help="measure at least this many sagas per saga in flight (so 64 in flight runs "
        "1,024), so every level runs long enough to be read; 0: --sagas everywhere",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure each level this many times, raw and ours back to back each time",
    )
    parser.add_argument("--json", default=str(Path(tempfile.gettempdir()) / "sagas-bench.json"))
    parser.add_argument("--markdown", help="also write the run as Markdown tables to this file")
    parser.add_argument(
        "--inmemory",
        action="store_true",
        help="also run inmemory_overhead (and inmemory_floor, the bare mechanics under it)",
    )
    parser.add_argument(
        "--loop",
        choices=("auto", "asyncio"),
        default="auto",
        help="ours' event loop (auto: uvloop when installed); raw always runs plain asyncio",
    )
    parser.add_argument(
        "--gc",
        choices=("worker", "default"),
        default="worker",
        help="ours' processes: the garbage collector tuned as `sagas worker` tunes it, or not",
    )
    parser.add_argument(
        "--status-events",
        choices=("all", "lifecycle", "none"),
        default="all",
        help="ours' status events (default all, as SagaRuntime; lifecycle: no per-step events)",
    )
    args = parser.parse_args(argv)
    raw: list[Row] = []
    ours: list[Row] = []
    pairs: list[tuple[Row, Row]] = []
    with tempfile.TemporaryDirectory() as directory:
        # Interleaved level by level (and run by run), so a change in the machine's load hits
        # both sides alike.
        for level in args.levels.split(","):
            sagas = max(args.sagas, int(level) * args.per_flight)
            for _ in range(max(1, args.repeat)):
                out = Path(directory) / f"{level}.json"
                base = run_side("bench.raw_baseline", level, sagas, out)
                mine = run_side(
                    "bench.throughput",
                    level,
                    sagas,
                    out,
                    "--loop",
                    args.loop,
                    "--status-events",
                    args.status_events,
                    "--gc",
                    args.gc,
                )
                raw += base
                ours += mine
                pairs += zip(mine, base, strict=True)
    print("\n== ours / raw, measured side by side")
    print(ratios(pairs))
    payload: dict[str, Any] = {"machine": machine(), "raw": raw, "ours": ours}
    if args.inmemory:
        payload["inmemory"] = inmemory()
        print("\n== in-memory overhead\n" + payload["inmemory"])
    Path(args.json).write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    print(f"\nJSON: {args.json}")
    if args.markdown:
        text = markdown(pairs, payload.get("inmemory"))
        Path(args.markdown).write_text(text, encoding="utf-8")
        print(f"Markdown: {args.markdown}")


if __name__ == "__main__":
    main()
