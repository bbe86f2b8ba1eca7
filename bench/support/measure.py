"""Measuring helpers shared by the benches: percentiles, /proc readings, the result table."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")

_TICKS = os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one by default), from /proc."""
    text = Path(f"/proc/{pid or 'self'}/stat").read_text(encoding="ascii")
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


SERVICES = {"broker": ("beam.smp",), "db": ("postgres",)}
"""Process names (``comm``) whose CPU counts as the broker's and the database's."""


def services_cpu_seconds() -> dict[str, float]:
    """CPU seconds of every local RabbitMQ and PostgreSQL process, summed per service.

    Read from /proc for all processes with those names (the broker's Erlang VM, every
    PostgreSQL backend and background process); readable for other users' processes too. Only
    meaningful when both run on this machine and nothing else uses them during a measurement.
    """
    totals = dict.fromkeys(SERVICES, 0.0)
    names = {name: service for service, comms in SERVICES.items() for name in comms}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text(encoding="ascii", errors="replace")
        except OSError:
            continue  # exited meanwhile
        comm = text[text.find("(") + 1 : text.rfind(")")]
        service = names.get(comm)
        if service is not None:
            fields = text.rsplit(")", 1)[1].split()
            totals[service] += (int(fields[11]) + int(fields[12])) / _TICKS
    return totals


def rss_mib(pid: int | None = None) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB, from /proc/<pid>/status."""
    values = {"VmRSS": 0.0, "VmHWM": 0.0}
    for line in Path(f"/proc/{pid or 'self'}/status").read_text(encoding="ascii").splitlines():
        key, _, rest = line.partition(":")
        if key in values:
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def load_average() -> str:
    """The 1, 5 and 15 minute load averages."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    memory = Path("/proc/meminfo").read_text(encoding="ascii").splitlines()[0].split()[1]

    def run(*command: str) -> str:
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)  # noqa: S603
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "?"

    return {
        "nproc": str(os.cpu_count()),
        "memory": f"{int(memory) / 1024 / 1024:.1f} GiB",
        "python": platform.python_version(),
        "postgresql": run(
            "psql", "-h", "127.0.0.1", "-U", "postgres", "-Atc", "show server_version"
        ),
        "rabbitmq": run("rabbitmqctl", "-q", "version"),
        "uvloop": _version("uvloop"),
        "load": load_average(),
    }


@dataclass
class Result:
    """One measured run: an implementation at one concurrency."""

    impl: str
    level: int
    sagas: int
    seconds: float
    steps: int
    step_ms: list[float] = field(default_factory=list, repr=False)
    saga_ms: list[float] = field(default_factory=list, repr=False)
    compensation_ms: list[float] = field(default_factory=list, repr=False)
    cpu: dict[str, float] = field(default_factory=dict)
    rss_mib: dict[str, float] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)
    load: str = ""

    @property
    def sagas_per_s(self) -> float:
        return self.sagas / self.seconds

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds

    def summary(self) -> dict[str, object]:
        """The numbers, and the step latencies (µs precision) so runs can be pooled."""
        data = asdict(self)
        for raw in ("step_ms", "saga_ms", "compensation_ms"):
            del data[raw]
        # For the p99 pooled over repeated runs (bench/compare.py, pooled_p99).
        data["step_ms_samples"] = [round(value, 3) for value in self.step_ms]
        data.update(
            sagas_per_s=round(self.sagas_per_s, 1),
            steps_per_s=round(self.steps_per_s, 1),
            step_p50_ms=percentile(self.step_ms, 50),
            step_p95_ms=percentile(self.step_ms, 95),
            step_p99_ms=percentile(self.step_ms, 99),
            saga_p50_ms=percentile(self.saga_ms, 50),
            saga_p99_ms=percentile(self.saga_ms, 99),
            compensation_p50_ms=percentile(self.compensation_ms, 50),
            compensation_p99_ms=percentile(self.compensation_ms, 99),
        )
        return data


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def table(results: list[Result]) -> str:
    """The results as a fixed-width table."""
    head = (
        f"{'impl':<10} {'in-flight':>9} {'sagas':>6} {'sagas/s':>8} {'steps/s':>8} "
        f"{'step p50':>8} {'p95':>6} {'p99':>6} {'saga p50':>8} {'p99':>6} {'comp p50':>8} "
        f"{'p99':>6} {'cpu us/step':>22} {'rss MiB':>12} {'load':>15}"
        f"  {'broker/db us/step':>17}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        steps = max(r.steps, 1)
        cpu = "/".join(
            f"{seconds / steps * 1e6:.0f}"
            for name, seconds in r.cpu.items()
            if name not in SERVICES
        )
        services = "/".join(
            f"{r.cpu[name] / steps * 1e6:.0f}" for name in SERVICES if name in r.cpu
        )
        rss = "/".join(f"{value:.0f}" for value in r.rss_mib.values())
        lines.append(
            f"{r.impl:<10} {r.level:>9} {r.sagas:>6} {r.sagas_per_s:>8.1f} {r.steps_per_s:>8.1f} "
            f"{_ms(percentile(r.step_ms, 50)):>8} {_ms(percentile(r.step_ms, 95)):>6} "
            f"{_ms(percentile(r.step_ms, 99)):>6} {_ms(percentile(r.saga_ms, 50)):>8} "
            f"{_ms(percentile(r.saga_ms, 99)):>6} {_ms(percentile(r.compensation_ms, 50)):>8} "
            f"{_ms(percentile(r.compensation_ms, 99)):>6} {cpu:>22} {rss:>12} {r.load:>15}"
            f"  {services or '-':>17}"
        )
    return "\n".join(lines)


def write_json(path: str, results: list[Result], **meta: object) -> None:
    """Write the results (and ``meta``) as JSON."""
    payload = {"machine": machine(), **meta, "results": [r.summary() for r in results]}
    Path(path).write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
