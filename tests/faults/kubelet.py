"""A kubelet's readiness probe, as a process of its own: `python -m tests.faults.kubelet URL`
asks URL every PERIOD_SECONDS on a new connection (as the kubelet does, with its 2 s timeout)
until it is terminated, and prints one JSON line per probe: [started, elapsed, status or null].

A process, not a thread of the test: a test flooding the service from its own event loop holds
the GIL, which would add the test's own delays to the probe's.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
from urllib.parse import urlsplit

PERIOD_SECONDS = 0.2
TIMEOUT_SECONDS = 2.0


def probe(host: str, port: int, path: str) -> int | None:
    """One GET on a new connection; its status, or None if no answer came in time."""
    connection = http.client.HTTPConnection(host, port, timeout=TIMEOUT_SECONDS)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        connection.close()


def main(url: str) -> None:
    """Probe `url` every PERIOD_SECONDS until terminated."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    while True:
        started = time.monotonic()  # the system's clock: the test compares it with its own
        status = probe(parts.hostname, parts.port, parts.path)
        print(json.dumps([started, time.monotonic() - started, status]), flush=True)
        time.sleep(max(0.0, started + PERIOD_SECONDS - time.monotonic()))


if __name__ == "__main__":
    main(sys.argv[1])
