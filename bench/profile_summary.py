"""Sort py-spy's raw samples (`py-spy record --threads --format raw`) into a request's components.

Only the event loop's thread (MainThread) is counted: the other threads (the service's log writer,
a thread pool) spend most of their time waiting, and py-spy counts such waits as busy, which would
swamp the profile. Their samples are reported apart.

Each sample is one stack, outermost frame first. It is charged to the innermost frame that
belongs to a known component, so standard-library helpers count for whoever called them: the
`json.dumps` inside the access log's formatter is logging, `weakref` inside SQLAlchemy is
SQLAlchemy. A sample whose innermost Python frame is the loop's entry point was in uvloop's C
code (polling, reading sockets, running callbacks); stacks made only of the standard library
count as the event loop when asyncio is in them, else as "other".
"""

from __future__ import annotations

import collections
import re
from typing import Any

# (component, what a frame's file path starts with or contains), innermost match wins.
COMPONENTS = (
    ("service session pool (service/db.py)", ("service/db.py",)),
    ("access log (logging + JSON formatter)", ("logging/", "service/logs.py")),
    ("metrics (prometheus_client)", ("prometheus_client/", "service/metrics.py")),
    ("asyncpg (driver)", ("asyncpg/",)),
    ("SQLAlchemy (session, engine, result, greenlet)", ("sqlalchemy/", "greenlet/")),
    ("JSON and msgspec (encode, decode, validate)", ("msgspec/", "litestar/serialization/")),
    ("Litestar DI and parameter parsing", ("litestar/_kwargs/", "litestar/di.py")),
    ("Litestar (routing, request, response, hooks)", ("litestar/",)),
    ("service middleware (request id, headers)", ("service/middleware.py",)),
    ("service handlers and guards", ("service/",)),
    ("baseline app", ("bench/baseline.py", "baseline.py")),
    ("uvicorn + httptools (HTTP)", ("uvicorn/", "httptools/")),
)
EVENT_LOOP = "event loop (uvloop: polling, socket reads, callbacks, tasks)"
# A sample whose innermost Python frame is the loop's entry point is in uvloop's C code.
LOOP_ENTRY_POINTS = ("Runner.run", "run_until_complete", "run_forever", "asyncio_run")
OTHER = "other (standard library)"
FRAME = re.compile(r"^(?P<function>.*) \((?P<path>[^():]+)(?::\d+)?\)$")


def component_of(path: str) -> str | None:
    for name, markers in COMPONENTS:
        if any(path.startswith(m) or f"/{m}" in path for m in markers):
            return name
    return None


def summarise_profile(raw: str, rate: int = 100, seconds: float = 0.0) -> dict[str, Any]:
    """Shares of on-CPU samples per component, the hottest functions, and the idle share."""
    components: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    total = other_threads = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        if stack.startswith("thread ("):
            thread, _, stack = stack.partition(";")
            if not thread.endswith(": MainThread"):
                other_threads += count
                continue
        if not stack:
            continue
        frames = [FRAME.match(frame) for frame in stack.split(";")]
        paths = [m["path"] if m else "" for m in frames]
        total += count
        leaf = frames[-1]
        functions[f"{leaf['function']} ({leaf['path']})" if leaf else stack.split(";")[-1]] += count
        owner = next((c for p in reversed(paths) if (c := component_of(p)) is not None), None)
        if leaf is not None and leaf["function"] in LOOP_ENTRY_POINTS:
            owner = EVENT_LOOP
        elif owner is None:
            owner = EVENT_LOOP if any(p.startswith("asyncio/") for p in paths) else OTHER
        components[owner] += count
    total = max(total, 1)
    possible = rate * seconds
    return {
        "samples": total,
        "other_thread_samples": other_threads,
        "idle_share": max(0.0, 1 - total / possible) if possible else 0.0,
        "components": [(name, n / total) for name, n in components.most_common()],
        "top_functions": [(name, n / total) for name, n in functions.most_common(12)],
    }


if __name__ == "__main__":
    import sys

    result = summarise_profile(open(sys.argv[1]).read())  # noqa: SIM115
    for name, share in result["components"]:
        print(f"{share:6.1%}  {name}")
    print()
    for name, share in result["top_functions"]:
        print(f"{share:6.1%}  {name}")
