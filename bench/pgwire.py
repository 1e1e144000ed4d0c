"""A counting PostgreSQL wire-protocol proxy: how many round trips and statements a request costs.

A server under test connects to this proxy instead of to PostgreSQL. The proxy forwards every
byte unchanged and counts, per direction, the protocol messages that matter:

- round trips: ReadyForQuery messages from the server. A client that sends a statement (or a
  pipeline of them, as asyncpg's executemany does) waits for one ReadyForQuery before it goes
  on, so each one is a wait of one network round trip;
- statements: simple queries (`Q`, by first word: BEGIN, COMMIT, ROLLBACK, ...) and extended
  protocol executions (`E`, by the first word of the statement they run);
- parses (`P`), which should stay near zero once the statement caches are warm.

It answers any SSL or GSSAPI encryption request with "no", so traffic through it is plain text
on 127.0.0.1 (only used for the short counting phase, never for the timed rounds).
"""

from __future__ import annotations

import asyncio
import collections
import struct
import threading
from pathlib import Path

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104


def first_word(sql: bytes) -> str:
    """`SELECT` for b"SELECT id ...", `BEGIN` for b"BEGIN ISOLATION LEVEL ...;"."""
    words = sql.decode("utf-8", "replace").strip().split(None, 1)
    return words[0].rstrip(";").upper() if words else "(empty)"


class WireCounter:
    """A proxy on 127.0.0.1:<ephemeral port> in a thread of its own; `snapshot()` reads counts."""

    def __init__(self, host: str | None, port: int | None, socket_dir: str | None) -> None:
        # PostgreSQL's address: a unix socket directory (as pgserver uses) or host and port.
        self.host, self.port, self.socket_dir = host, port, socket_dir
        self.counts: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.listen_port = 0
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> int:
        """Start listening; returns the port to connect to."""
        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self.loop)
        self.listen_port = future.result(timeout=10)
        return self.listen_port

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)

    def snapshot(self) -> collections.Counter[str]:
        with self.lock:
            return collections.Counter(self.counts)

    def _count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    async def _listen(self) -> int:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self._server = server  # kept so it is not collected
        return int(server.sockets[0].getsockname()[1])

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.socket_dir is not None:
            path = Path(self.socket_dir) / f".s.PGSQL.{self.port or 5432}"
            return await asyncio.open_unix_connection(str(path))
        return await asyncio.open_connection(self.host or "127.0.0.1", self.port or 5432)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            startup = await self._read_startup(client_r, client_w)
            server_r, server_w = await self._connect_upstream()
            server_w.write(startup)
            await asyncio.gather(
                self._frontend(client_r, server_w), self._backend(server_r, client_w)
            )
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            client_w.close()

    async def _read_startup(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bytes:
        """The startup packet, after declining any encryption request."""
        while True:
            header = await reader.readexactly(8)
            length, code = struct.unpack("!ii", header)
            rest = await reader.readexactly(length - 8)
            if code in (SSL_REQUEST, GSSENC_REQUEST):
                writer.write(b"N")
                await writer.drain()
                continue
            return header + rest

    async def _frontend(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        statements: dict[bytes, str] = {}  # prepared statement name -> first word
        bound = "(unknown)"
        try:
            while True:
                header = await reader.readexactly(5)
                kind, length = header[:1], struct.unpack("!i", header[1:])[0]
                body = await reader.readexactly(length - 4)
                if kind == b"Q":
                    self._count("query " + first_word(body.split(b"\0", 1)[0]))
                elif kind == b"P":
                    name, sql = body.split(b"\0", 2)[:2]
                    statements[name] = first_word(sql)
                    self._count("parse")
                elif kind == b"B":
                    bound = statements.get(body.split(b"\0", 2)[1], "(unknown)")
                elif kind == b"E":
                    self._count("execute " + bound)
                elif kind == b"S":
                    self._count("sync")
                writer.write(header + body)
                await writer.drain()
                if kind == b"X":  # Terminate
                    break
        finally:
            writer.close()

    async def _backend(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(5)
                length = struct.unpack("!i", header[1:])[0]
                body = await reader.readexactly(length - 4)
                # Counted before forwarding, so a count is never read before its message arrives.
                if header[:1] == b"Z":
                    self._count("round trip")
                elif header[:1] == b"E":
                    self._count("error")
                writer.write(header + body)
                await writer.drain()
        finally:
            writer.close()
