"""Child processes of the benches: start one, wait for its ``ready`` line, stop it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class Child:
    """A child process started with ``python -m <args>`` from the repository root."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.process = process
        self.log = log

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def start(
        cls, name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60.0
    ) -> Child:
        """Start ``python -m args...`` and wait until it prints ``ready``.

        Raises:
            RuntimeError: it exited or did not get ready in time (with its log's tail).
        """
        handle, path = tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")
        log = Path(path)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                *args,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                stdout=asyncio.subprocess.PIPE,
                stderr=handle,
            )
        finally:
            os.close(handle)
        child = cls(name, process, log)
        assert process.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                line = b"?"
                while line and line.strip() != b"ready":
                    line = await process.stdout.readline()
        except BaseException:
            await child.stop()
            raise
        if not line:
            await child.stop(keep_log=True)
            raise RuntimeError(f"{name} exited before it was ready:\n{child.tail()}")
        return child

    def tail(self, lines: int = 30) -> str:
        """The last lines of the child's stderr."""
        text = self.log.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self, grace: float = 20.0, *, keep_log: bool = False) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; returns the exit status."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        if not keep_log:
            with contextlib.suppress(OSError):
                self.log.unlink()
        return self.process.returncode
