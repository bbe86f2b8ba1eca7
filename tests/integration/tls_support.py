"""TLS for the integration tests without touching the shared servers: certificates and proxies.

The shared RabbitMQ and PostgreSQL listen in plain text and may not be reconfigured, so a test
puts a TLS listener of its own in front of them, on 127.0.0.1 and an ephemeral port:

- :class:`TlsProxy` with ``postgres=False`` terminates TLS at once (AMQP over TLS, ``amqps``);
- with ``postgres=True`` it speaks PostgreSQL's in-protocol negotiation: it answers the client's
  8-byte ``SSLRequest`` with ``S``, runs the TLS handshake, then forwards the decrypted stream
  (the startup message untouched) to the real server, which sees an ordinary plain client.

Either way the proxy counts what it saw, so a test can assert that every connection was TLS
(a client that spoke plain text is counted and turned away, never forwarded).

Certificates come from the ``openssl`` command (the ``cryptography`` package is not a
dependency): :func:`make_pki` makes a CA, a server certificate for ``localhost`` only (so
``127.0.0.1`` is a host name mismatch), a client certificate, and an unrelated second CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import ssl
import struct
import subprocess
from pathlib import Path
from typing import Self

__all__ = ["Pki", "TlsProxy", "make_pki", "openssl_available"]

_SSL_REQUEST = struct.pack("!ii", 8, 80877103)
_GSSENC_REQUEST = struct.pack("!ii", 8, 80877104)
_HANDSHAKE_TIMEOUT = 10.0
_CHUNK = 65536


def openssl_available() -> bool:
    """Whether the ``openssl`` command is on PATH."""
    return shutil.which("openssl") is not None


@dataclasses.dataclass(frozen=True)
class Pki:
    """The files :func:`make_pki` made (PEM).

    Attributes:
        ca: The CA certificate that signed the server and client certificates.
        server_cert: The server's certificate, valid for ``localhost`` only.
        server_key: Its key.
        client_cert: A client certificate (CN ``sagas-client``) signed by ``ca``.
        client_key: Its key (mode 0600, as libpq requires).
        other_ca: A CA that signed nothing here: trusting it alone must fail.
    """

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path

    def server_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        """The proxy's side: this server certificate; optionally clients must present one."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.server_cert, self.server_key)
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=self.ca)
        return context


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(
        ["openssl", *map(str, args)],  # noqa: S607 - openssl from PATH, like the CI image
        cwd=cwd,
        check=True,
        capture_output=True,
        timeout=30,
    )


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN=sagas test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return cert, key


def _make_leaf(
    directory: Path, name: str, *, ca: tuple[Path, Path], common_name: str, extensions: str
) -> tuple[Path, Path]:
    cert, key, csr = (directory / f"{name}{ext}" for ext in (".pem", ".key", ".csr"))
    config = directory / f"{name}.ext"
    config.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
        f"{extensions}\n"
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", csr, "-subj", f"/CN={common_name}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", config,
        cwd=directory,
    )  # fmt: skip
    key.chmod(0o600)
    return cert, key


def make_pki(directory: Path) -> Pki:
    """Make a CA, a ``localhost`` server certificate, a client certificate and a second CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(directory, "ca")
    server = _make_leaf(
        directory,
        "server",
        ca=ca,
        common_name="localhost",
        extensions="subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth",
    )
    client = _make_leaf(
        directory,
        "client",
        ca=ca,
        common_name="sagas-client",
        extensions="extendedKeyUsage=clientAuth",
    )
    other_ca, _ = _make_ca(directory, "other-ca")
    return Pki(
        ca=ca[0],
        server_cert=server[0],
        server_key=server[1],
        client_cert=client[0],
        client_key=client[1],
        other_ca=other_ca,
    )


class TlsProxy:
    """A TLS-terminating forwarder on 127.0.0.1 to a plain-text server.

    Use it as ``async with TlsProxy(...) as proxy`` (or :meth:`start` and :meth:`close`):
    closing stops listening and cuts every forwarded connection.

    Attributes:
        tls_sessions: Connections that completed the TLS handshake and sent data through it
            (each was forwarded).
        failed_handshakes: Connections whose TLS handshake failed on either side, or that
            closed without sending anything through TLS (never forwarded).
        plain_attempts: PostgreSQL clients that skipped the ``SSLRequest`` (turned away).
        client_subjects: The common name of each client certificate presented ("" if none).
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        context: ssl.SSLContext,
        *,
        postgres: bool,
    ) -> None:
        """Forward to ``upstream`` (host, port) what arrives through TLS with ``context``.

        Args:
            upstream: The plain-text server.
            context: The server-side TLS context (certificate, client verification).
            postgres: Negotiate TLS the PostgreSQL way (``SSLRequest``, ``S``) first.
        """
        self._upstream = upstream
        self._context = context
        self._postgres = postgres
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.tls_sessions = 0
        self.failed_handshakes = 0
        self.plain_attempts = 0
        self.client_subjects: list[str] = []

    @property
    def port(self) -> int:
        """The port it listens on."""
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> Self:
        """Listen on an ephemeral port of 127.0.0.1."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        """Stop listening, cut every connection and wait for its handler to end."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            if self._postgres and not await self._negotiate(reader, writer):
                return
            try:
                await writer.start_tls(self._context, ssl_handshake_timeout=_HANDSHAKE_TIMEOUT)
                # With TLS 1.3 the server's side of the handshake ends before the client has
                # checked the certificate: a client that rejects it sends an alert, not data.
                first = await reader.read(_CHUNK)
            except (ssl.SSLError, OSError, TimeoutError):
                first = b""
            if not first:
                self.failed_handshakes += 1
                return
            self.tls_sessions += 1
            peer = writer.get_extra_info("peercert") or {}
            names = [value for rdn in peer.get("subject", ()) for key, value in rdn]
            self.client_subjects.append(names[0] if names else "")
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
            self._writers.add(up_writer)
            try:
                up_writer.write(first)
                await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
            finally:
                self._writers.discard(up_writer)
                up_writer.close()
        except (OSError, asyncio.IncompleteReadError):
            pass  # the client went away before anything was forwarded
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _negotiate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer the PostgreSQL client's requests until it asks for TLS; False: it did not."""
        for _ in range(3):  # at most a GSSENCRequest, then an SSLRequest
            request = await reader.readexactly(8)
            if request == _GSSENC_REQUEST:
                writer.write(b"N")
                continue
            if request == _SSL_REQUEST:
                writer.write(b"S")
                await writer.drain()
                return True
            break
        self.plain_attempts += 1
        return False


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy ``reader`` to ``writer`` until either end closes, then close ``writer``."""
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass  # one side broke: closing the other is all there is to do
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            writer.close()
