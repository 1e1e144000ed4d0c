"""Headless Chromium for the docs page test, driven over its DevTools pipe: no driver, no
dependency, and no network beyond loopback.

`--remote-debugging-pipe` makes Chromium read DevTools commands from its fd 3 and write answers
and events to its fd 4, as JSON messages each ended by a NUL byte.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Everything but loopback goes to a proxy at a port nothing listens on, so it fails at once
# (Chromium never sends loopback through a proxy), and no host name resolves: a page that
# needs anything from the internet cannot have it, as in a cluster without egress.
OFFLINE_FLAGS = (
    "--proxy-server=http://127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)
QUIET_FLAGS = (
    "--headless",
    "--no-sandbox",  # the tests run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--mute-audio",
)


class DevTools:
    """One page of a headless Chromium, and every event it reported so far."""

    def __init__(self, commands: int, answers: int, timeout: float) -> None:
        self.commands = commands
        self.answers = answers
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._buffer = b""
        self._next_id = 0
        self.session: str | None = None

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send a command to the page (or to the browser before `open_page`); its result."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._read()
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                result: dict[str, Any] = answer["result"]
                return result
            self.events.append(answer)

    def open_page(self) -> None:
        """A new tab, to which every later command goes."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float) -> Any:
        """Evaluate `expression` every 0.1 s until it is truthy; its value, or None at timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        return None

    def click(self, element: str, timeout: float = 5.0) -> None:
        """Click the element a JavaScript expression names, once it is there."""
        if not self.wait_for(f"!!{element}", timeout):
            raise AssertionError(f"never appeared: {element}")
        self.evaluate(f"{element}.click()")

    def type_into(self, element: str, text: str) -> None:
        """Type `text` into an input once it is there, as a person would (React sees the input
        events)."""
        if not self.wait_for(f"!!{element}", 5.0):
            raise AssertionError(f"never appeared: {element}")
        self.evaluate(f"{element}.focus()")
        self.call("Input.insertText", text=text)

    def screenshot(self, path: Path) -> None:
        """The whole page, not only the window, as a PNG."""
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(data["data"]))

    def named(self, method: str) -> list[dict[str, Any]]:
        """The parameters of every event of one kind received so far."""
        return [e["params"] for e in self.events if e.get("method") == method]

    def _read(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.answers], [], [], left)[0]:
                raise TimeoutError(f"Chromium sent nothing for {self.timeout} s")
            chunk = os.read(self.answers, 1 << 16)
            if not chunk:
                raise ConnectionError("Chromium closed its DevTools pipe")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        parsed: dict[str, Any] = json.loads(message)
        return parsed


def _high_fd(fd: int) -> int:
    """`fd` moved to 10 or above, so placing the pipes at 3 and 4 cannot overwrite either."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


@contextlib.contextmanager
def headless_chromium(profile: Path, timeout: float = 30.0) -> Iterator[DevTools]:
    """A headless Chromium with a fresh profile and no network beyond loopback; stopped (by its
    own PID) afterwards."""
    if CHROMIUM is None:
        raise RuntimeError("chromium is not installed")
    commands_read, commands_write = map(_high_fd, os.pipe())
    answers_read, answers_write = map(_high_fd, os.pipe())
    # bash (dash takes one-digit fds only) puts the pipes at Chromium's fds 3 and 4, then
    # becomes Chromium.
    launcher = f'exec "$0" "$@" 3<&{commands_read} 4>&{answers_write}'
    process = subprocess.Popen(
        [
            "bash",
            "-c",
            launcher,
            CHROMIUM,
            *QUIET_FLAGS,
            *OFFLINE_FLAGS,
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ],
        pass_fds=(commands_read, answers_write),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(commands_read)
    os.close(answers_write)
    try:
        yield DevTools(commands_write, answers_read, timeout)
    finally:
        os.close(commands_write)  # Chromium exits when its command pipe closes
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        os.close(answers_read)
