"""bench/delay.py, the benchmark's delaying proxy: every byte arrives, in order, a round trip on."""

import socket
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from delay import DelayProxy


@pytest.fixture
def echo_port() -> int:
    """A TCP echo server on 127.0.0.1, in a thread, for the proxy to forward to."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                while data := connection.recv(65536):
                    connection.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


def test_each_exchange_takes_the_round_trip_and_bytes_keep_their_order(
    echo_port: int, tmp_path: Path
) -> None:
    one_way_ms = 2.0
    with DelayProxy(f"tcp:127.0.0.1:{echo_port}", one_way_ms, tmp_path / "delay.log") as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            waits = []
            for number in range(50):
                message = f"<{number:04d}>".encode()
                sent = time.monotonic()
                client.sendall(message)
                received = b""
                while len(received) < len(message):
                    received += client.recv(65536)
                waits.append(time.monotonic() - sent)
                assert received == message
            # Many chunks in flight at once come back whole and in the order they were sent.
            burst = b"".join(f"[{n:05d}]".encode() for n in range(2000))
            for start in range(0, len(burst), 700):
                client.sendall(burst[start : start + 700])
            echoed = b""
            while len(echoed) < len(burst):
                echoed += client.recv(65536)
            assert echoed == burst
        stats = proxy.stats()
    assert min(waits) >= 2 * one_way_ms / 1000  # never early
    # Late by the scheduler's noise at most, on a shared machine: a tenth of the waits may be.
    assert sorted(waits)[len(waits) // 2] < 2 * one_way_ms / 1000 + 0.002
    assert stats["connections"] == 1
    assert stats["answers"] >= 50  # each exchange answered, and timed, by the far side
