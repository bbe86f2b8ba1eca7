"""``python -m samples.order_api`` as a new user runs it: embedded SQLite, real HTTP, Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_the_module_serves_orders_with_state_in_the_embedded_sqlite_file(tmp_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGAS_", "ORDER_API_"))}
    env.update(
        PYTHONPATH=str(ROOT),
        SAGAS_SQLITE_PATH=str(tmp_path / "sagas.sqlite3"),
        SAGAS_LOG_LEVEL="WARNING",
        ORDER_API_PORT=str(port),
    )
    log = tmp_path / "api.log"
    with log.open("w") as output:  # a file, not a pipe: a chatty server must never block on it
        process = subprocess.Popen(
            [sys.executable, "-m", "samples.order_api"],
            cwd=tmp_path,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            deadline = time.monotonic() + 30
            while True:
                if process.poll() is not None:
                    pytest.fail(f"the API exited with {process.returncode}:\n{log.read_text()}")
                try:
                    if client.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"the API was not ready within 30 s:\n{log.read_text()}")
                time.sleep(0.1)

            accepted = client.post(
                "/orders",
                json={
                    "customer_id": "C-1",
                    "lines": [{"sku": "PEN-4", "quantity": 3, "unit_price": "1.20"}],
                    "card_token": "tok_visa",
                    "region": "eu",
                    "address": "1 Main Street",
                },
            )
            assert accepted.status_code == 202, accepted.text
            deadline = time.monotonic() + 20
            while (saga := client.get(accepted.headers["Location"]).json())["status"] == "running":
                assert time.monotonic() < deadline, saga
                time.sleep(0.05)
            assert saga["status"] == "completed"
        assert (tmp_path / "sagas.sqlite3").exists()
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    assert process.returncode == 0, log.read_text()


def test_a_bad_setting_exits_2_naming_the_variable(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAS_")}
    env.update(PYTHONPATH=str(ROOT), SAGAS_DATABASE_URL="mysql://user:secret@db/app")

    result = subprocess.run(
        [sys.executable, "-m", "samples.order_api", "--port", str(_free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 2
    assert "SAGAS_DATABASE_URL" in result.stderr
    assert "secret" not in result.stderr + result.stdout
