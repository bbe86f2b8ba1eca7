"""Run the whole suite several times in a row with every core kept busy, and report what failed.

``make flaky-check`` runs it. A test that passes on a quiet machine and fails on a loaded one
waits on the wrong thing (a neighbour's state, a sleep, an order the product does not promise);
this finds it before a submission does. Bounded in time: the load stops by itself at the deadline
(the busy processes check it), no run starts past it, and the last one is killed at it.

    python -m tests.flaky_check --runs 10 --load 2 --max-minutes 120 [-- pytest args]

Exit status 0 only when every run passed.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)
# pytest's last line: "1 failed, 1264 passed in 541.28s (0:09:01)", between "=" rules unless -q.
_SUMMARY = re.compile(r"^=* ?(\d+ (?:passed|failed)\b.*? in [\d.]+s.*?) ?=*$", re.MULTILINE)


def _burn(until: float) -> None:
    """Keep one core busy until the monotonic deadline."""
    while time.monotonic() < until:
        sum(range(10_000))


@contextlib.contextmanager
def _cpu_load(workers: int, until: float) -> Iterator[None]:
    """``workers`` processes spinning on a core each; stopped on exit or at ``until``."""
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_burn, args=(until,), daemon=True) for _ in range(workers)]
    for proc in procs:
        proc.start()
    try:
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join(timeout=5)


def _run_once(index: int, pytest_args: list[str], deadline: float, log_dir: Path) -> list[str]:
    """One pytest run; returns the ids of the tests that failed (a marker if it was killed)."""
    log = log_dir / f"run-{index:02d}.log"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args]
    started = time.monotonic()
    with log.open("w") as out:
        # A session of its own: stopping the run also stops what its tests started (worker and
        # participant processes), which a killed pytest never gets to clean up.
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode = process.wait(timeout=max(1.0, deadline - started))
        except subprocess.TimeoutExpired:
            print(f"run {index}: killed at the time limit ({log})", flush=True)
            return ["<run killed at the time limit>"]
        finally:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    text = log.read_text(errors="replace")
    failed = _FAILED.findall(text)
    summary = _SUMMARY.findall(text)
    if returncode != 0 and not failed:
        failed = [f"<pytest exit {returncode}>"]
    elapsed = time.monotonic() - started
    line = summary[-1] if summary else f"exit {returncode}"
    print(f"run {index}: {line} in {elapsed:.0f} s ({log})", flush=True)
    for test in failed:
        print(f"    {test}", flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the suite under load, print a summary; 0 if every run passed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="runs in a row (default 10)")
    parser.add_argument(
        "--load",
        type=int,
        default=os.cpu_count() or 2,
        help="busy processes beside the suite (default: one per core)",
    )
    parser.add_argument(
        "--max-minutes", type=float, default=150.0, help="stop everything after this long"
    )
    parser.add_argument("--logs", type=Path, default=Path(".flaky-check"), help="per-run logs")
    parser.add_argument(
        "--keep-going", action="store_true", help="run them all even after a failed run"
    )
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.load < 0 or args.max_minutes <= 0:
        parser.error("--runs must be >= 1, --load >= 0 and --max-minutes > 0")

    # A SIGTERM ends the run like Ctrl-C: the busy processes are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.logs.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.max_minutes * 60
    failures: Counter[str] = Counter()
    failed_runs = done = 0
    print(f"flaky-check: {args.runs} runs, {args.load} busy processes, logs in {args.logs}/")
    longest = 0.0
    with _cpu_load(args.load, deadline):
        for index in range(1, args.runs + 1):
            # A run unlikely to finish in time is not started: killed, it would read as a failure.
            if time.monotonic() + 1.25 * longest >= deadline:
                print(f"time limit reached after {done} runs", flush=True)
                break
            began = time.monotonic()
            failed = _run_once(index, args.pytest_args, deadline, args.logs)
            longest = max(longest, time.monotonic() - began)
            done += 1
            failures.update(failed)
            if failed:
                failed_runs += 1
                if not args.keep_going:
                    break
    print(f"flaky-check: {done - failed_runs}/{done} runs passed")
    for test, count in failures.most_common():
        print(f"  {count}x {test}")
    return 0 if failed_runs == 0 and done == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
