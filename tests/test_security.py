"""Intruders: writes without a valid token, secrets in answers and logs, headers, CORS.

tests/test_auth.py has the plain cases (no header, a wrong token, a token without a scheme);
here are the near misses and malformed headers, the constant-time comparison, and a full run of
real processes, failures included, whose every answer and log line is searched for secrets.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import hashlib
import hmac
import inspect
import secrets
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from service import auth
from service.errors import ProblemException
from tests.conftest import (
    AUTH,
    TOKEN,
    run_cli,
    run_service,
    service_environment,
    table_snapshot,
)
from tests.faults.report import record
from tests.faults.support import ControlledPostgres, seed_rows

Client = AsyncTestClient[Any]
PROBLEM_JSON = "application/problem+json"


def one_off(token: str, index: int) -> str:
    """`token` with the character at `index` replaced by a different one."""
    replacement = "A" if token[index] != "A" else "B"
    return token[:index] + replacement + token[index + 1 :]


# Authorization headers that must not open a write (values are bytes where they are not ASCII).
REFUSED: list[tuple[str, list[tuple[str, str | bytes]]]] = [
    ("scheme only", [("Authorization", "Bearer")]),
    ("scheme and space", [("Authorization", "Bearer ")]),
    ("empty", [("Authorization", "")]),
    (
        "basic with the token",
        [("Authorization", "Basic " + base64.b64encode(TOKEN.encode()).decode())],
    ),
    (
        "basic user:token",
        [("Authorization", "Basic " + base64.b64encode(f"u:{TOKEN}".encode()).decode())],
    ),
    ("other scheme", [("Authorization", f"Token {TOKEN}")]),
    ("scheme glued", [("Authorization", f"Bearer{TOKEN}")]),
    ("tab separated", [("Authorization", f"Bearer\t{TOKEN}")]),
    ("double space, wrong token", [("Authorization", "bearer  wrong-token-0123456789")]),
    ("first character off", [("Authorization", f"Bearer {one_off(TOKEN, 0)}")]),
    ("middle character off", [("Authorization", f"Bearer {one_off(TOKEN, len(TOKEN) // 2)}")]),
    ("last character off", [("Authorization", f"Bearer {one_off(TOKEN, -1)}")]),
    ("prefix", [("Authorization", f"Bearer {TOKEN[:-1]}")]),
    ("extended", [("Authorization", f"Bearer {TOKEN}x")]),
    ("upper case", [("Authorization", f"Bearer {TOKEN.upper()}")]),
    ("token and more", [("Authorization", f"Bearer {TOKEN} {TOKEN}")]),
    ("two tokens, comma", [("Authorization", f"Bearer {TOKEN}, Bearer {TOKEN}")]),
    ("non-ASCII token", [("Authorization", f"Bearer {TOKEN[:-1]}ö".encode())]),
    ("non-ASCII scheme", [("Authorization", f"Bëarer {TOKEN}".encode())]),
    ("raw UTF-8 bytes", [("Authorization", b"Bearer \xe2\x80\x8b" + TOKEN.encode())]),
    ("very long", [("Authorization", "Bearer " + "x" * 8000)]),
    ("token elsewhere", [("X-API-Key", TOKEN), ("Cookie", f"token={TOKEN}")]),
    (
        "wrong first of two",
        [("Authorization", "Bearer wrong-token-0123456789"), ("Authorization", f"Bearer {TOKEN}")],
    ),
]
WRITES = [
    ("POST", "/items", b'[{"name": "intruder", "value": 1}]'),
    ("PATCH", "/items", b'[{"id": 5, "value": -1}]'),
    ("DELETE", "/items/5", None),
]


@pytest.mark.parametrize(("method", "path", "content"), WRITES, ids=[w[0] for w in WRITES])
@pytest.mark.parametrize(("case", "headers"), REFUSED, ids=[r[0] for r in REFUSED])
async def test_malformed_or_near_miss_credentials_are_401_and_change_nothing(
    client: Client,
    engine: AsyncEngine,
    method: str,
    path: str,
    content: bytes | None,
    case: str,
    headers: list[tuple[str, str | bytes]],
) -> None:
    before = await table_snapshot(engine)
    sent = [(k.encode(), v if isinstance(v, bytes) else v.encode()) for k, v in headers]
    sent.append((b"Content-Type", b"application/json"))
    query = {"access_token": TOKEN, "token": TOKEN} if case == "token elsewhere" else None
    response = await client.request(method, path, content=content, headers=sent, params=query)
    record(
        "Intrusion",
        "Writes (POST, PATCH, DELETE) with malformed, near-miss or misplaced credentials",
        1,
        {response.status_code: 1},
        "401 problem+json with WWW-Authenticate; table unchanged",
    )
    assert response.status_code == 401, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert TOKEN not in response.text
    assert await table_snapshot(engine) == before


async def test_token_comparison_hashes_first_and_compares_every_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Equal-length digests through hmac.compare_digest, every accepted token, every time.

    A timing measurement would be flaky; the code path is what makes the time independent of
    the token: the offered token is hashed (so its length and content reach no comparison) and
    compared with all accepted digests, without stopping at a match.
    """
    accepted = ("first-token-0123456789", "second-token-abcdefghij", TOKEN)
    state = SimpleNamespace(
        settings=SimpleNamespace(auth_disabled=False), token_digests=auth.token_digests(accepted)
    )
    real = hmac.compare_digest
    calls: list[tuple[Any, Any]] = []

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    offers = [*accepted, "x", "x" * 5000, one_off(TOKEN, -1), TOKEN[:-1]]
    for offered in offers:
        calls.clear()
        connection = SimpleNamespace(
            app=SimpleNamespace(state=state), headers={"authorization": f"Bearer {offered}"}
        )
        try:
            auth.require_token(connection)  # type: ignore[arg-type]
            allowed = True
        except ProblemException as exc:
            assert exc.status_code == 401
            allowed = False
        assert allowed == (offered in accepted)
        assert len(calls) == len(accepted), "stopped comparing at a match"
        digest = hashlib.sha256(offered.encode()).digest()
        assert [a for a, _ in calls] == [digest] * len(accepted)
        assert [b for _, b in calls] == [hashlib.sha256(t.encode()).digest() for t in accepted]
    # And no token, offered or accepted, meets an `==`, `!=` or `in` on the way.
    source = textwrap.dedent(inspect.getsource(auth.require_token))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            assert names <= {"scheme"}, ast.unparse(node)
    record(
        "Intrusion",
        "Token comparison: code path checked (SHA-256, then hmac.compare_digest on all tokens)",
        len(offers),
        {},
        "constant time in the offered token's length, content and closeness",
    )


REQUIRED_HEADERS = {"x-content-type-options": "nosniff"}


async def test_every_kind_of_answer_carries_the_security_headers(client: Client) -> None:
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/items", {}),
        ("GET", "/items/5", {}),
        ("GET", "/items/7", {}),
        ("GET", "/items?limit=0", {}),
        ("GET", "/healthz", {}),
        ("GET", "/readyz", {}),
        ("GET", "/metrics", {}),
        ("GET", "/schema/openapi.json", {}),
        ("GET", "/nothing-here", {}),
        ("PUT", "/items", {}),
        ("POST", "/items", {"json": [{"name": "h", "value": 1}], "headers": AUTH}),
        ("POST", "/items", {"json": [{"name": "h", "value": 1}]}),
        (
            "POST",
            "/items",
            {"content": b"{", "headers": {**AUTH, "Content-Type": "application/json"}},
        ),
        ("POST", "/items", {"content": b"[]", "headers": {**AUTH, "Content-Type": "text/plain"}}),
        ("POST", "/items", {"json": [], "headers": AUTH}),
        ("POST", "/items", {"json": [{"name": "n" * 900, "value": 1}] * 80, "headers": AUTH}),
        ("PATCH", "/items", {"json": [{"id": 7, "value": 1}], "headers": AUTH}),
        ("DELETE", "/items/6", {"headers": AUTH}),
        ("OPTIONS", "/items", {}),
    ]
    statuses: Counter[int] = Counter()
    for method, path, kwargs in requests:
        response = await client.request(method, path, **kwargs)
        statuses[response.status_code] += 1
        for name, value in REQUIRED_HEADERS.items():
            assert response.headers.get(name) == value, (method, path, response.status_code)
    assert {200, 201, 204, 400, 401, 404, 405, 413, 415, 422} <= set(statuses)
    record(
        "Intrusion",
        "Security headers on every kind of answer (in-process)",
        len(requests),
        statuses,
        "X-Content-Type-Options: nosniff on all",
    )


async def test_cors_is_off(client: Client) -> None:
    origin = {"Origin": "https://attacker.example"}
    answers = [
        await client.get("/items", headers=origin),
        await client.post("/items", json=[{"name": "c", "value": 1}], headers={**origin, **AUTH}),
        await client.options(
            "/items",
            headers={
                **origin,
                "Access-Control-Request-Method": "PATCH",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        ),
    ]
    for response in answers:
        assert not [h for h in response.headers if h.lower().startswith("access-control-")]
    record(
        "Intrusion",
        "Cross-origin requests and a CORS preflight from a foreign Origin",
        len(answers),
        Counter(r.status_code for r in answers),
        "no Access-Control-* header: browsers refuse cross-origin use",
    )


# ----- a full run of real processes, failures included, searched for secrets -----------------


@pytest.fixture(scope="module")
def secret_postgres() -> Iterator[ControlledPostgres]:
    """A PostgreSQL whose superuser has a random password, for this module only."""
    server = ControlledPostgres.create()
    try:
        yield server
    finally:
        server.destroy()


def _search(haystack: str, secrets_: dict[str, str]) -> list[str]:
    return [name for name, secret in secrets_.items() if secret in haystack]


@pytest.mark.slow
async def test_no_secret_in_any_answer_or_log_line(
    secret_postgres: ControlledPostgres, tmp_path: Path
) -> None:
    from tests.conftest import fresh_database

    token_a, token_b = f"tok-a-{secrets.token_hex(16)}", f"tok-b-{secrets.token_hex(16)}"
    wrong_password = f"wrong-pw-{secrets.token_hex(12)}"
    near_miss = one_off(token_a, -1)
    hidden = {
        "database password": secret_postgres.password,
        "wrong database password": wrong_password,
        "API token A": token_a,
        "API token B": token_b,
        "offered wrong token": near_miss,
    }
    answers: list[httpx.Response] = []
    logs: dict[str, str] = {}
    async with fresh_database(secret_postgres.url(), prefix="secrets") as url:
        await asyncio.to_thread(_migrate, url)
        await seed_rows(url, 20)
        env = service_environment(
            url, API_TOKENS=f"{token_a},{token_b}", LOG_LEVEL="DEBUG", SHUTDOWN_DELAY_SECONDS="0"
        )
        with run_service(env, tmp_path) as service:
            async with httpx.AsyncClient(base_url=service.base_url, timeout=15) as http:
                answers += await _traffic(http, token_a, token_b, near_miss)
                await asyncio.to_thread(secret_postgres.stop, "fast")
                try:
                    answers += await _traffic(http, token_a, token_b, near_miss)
                finally:
                    await asyncio.to_thread(secret_postgres.start)
                answers.append(await http.get("/metrics"))
        logs["service, database up then down"] = service.log()

        wrong = url.set(password=wrong_password)
        env = service_environment(
            wrong, API_TOKENS=f"{token_a},{token_b}", LOG_LEVEL="DEBUG", SHUTDOWN_DELAY_SECONDS="0"
        )
        # A refusal for good: serving stops at start with one line.
        logs["serve, wrong database password"] = _run_command(env, [], tmp_path)
        logs["migrate, wrong database password"] = _run_command(env, ["migrate"], tmp_path)
        bad_url = wrong.render_as_string(hide_password=False) + "?sslmode=bogus"
        logs["configuration error"] = _run_command({**env, "DATABASE_URL": bad_url}, [], tmp_path)

    statuses = Counter(r.status_code for r in answers)
    leaks = []
    for response in answers:
        shown = response.text + "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        leaks += [
            f"{response.request.method} {response.request.url.path}: {name}"
            for name in _search(shown, hidden)
        ]
    for source, text in logs.items():
        leaks += [f"{source} log: {name}" for name in _search(text, hidden)]
    unsafe = [
        f"{r.request.method} {r.request.url.path} {r.status_code}"
        for r in answers
        if r.headers.get("x-content-type-options") != "nosniff"
        or any(ch.isdigit() for ch in r.headers.get("server", ""))
    ]
    record(
        "Intrusion",
        "Secrets (DB password, a wrong DB password, API tokens, an offered near-miss token) "
        "searched in every answer, /metrics and every log line of real runs at DEBUG: "
        "database up, down, wrong password, migrate and configuration failures",
        len(answers) + len(logs),
        statuses,
        "no secret found; nosniff and no server version on every answer"
        if not leaks and not unsafe
        else f"FOUND: {leaks + unsafe}",
    )
    assert not leaks, leaks
    assert not unsafe, unsafe
    # The run did include failures: a 401, 4xx for bad bodies, 503s while the database was down.
    assert {401, 503} <= set(statuses), statuses
    assert 200 in statuses and 201 in statuses, statuses
    # A refused password is the operator's problem: never a 500, and serving stops in one line.
    assert 500 not in statuses, statuses
    assert "password authentication failed" in logs["serve, wrong database password"]


def _migrate(url: URL) -> None:
    from service.config import Settings
    from service.migrate import upgrade_to_head

    upgrade_to_head(Settings(database_url=url, auth_disabled=True))


def _run_command(env: dict[str, str], args: list[str], cwd: Path) -> str:
    """Run `python -m service ARGS`, expected to fail; its combined output."""
    result = run_cli(env, cwd, *args)
    assert result.returncode != 0, "expected this run to fail"
    return result.stdout + result.stderr


async def _traffic(
    http: httpx.AsyncClient, token_a: str, token_b: str, near_miss: str
) -> list[httpx.Response]:
    """Every kind of request, good and bad, with both tokens and a near miss."""
    a = {"Authorization": f"Bearer {token_a}"}
    b = {"Authorization": f"Bearer {token_b}"}
    miss = {"Authorization": f"Bearer {near_miss}"}
    json_type = {"Content-Type": "application/json"}
    return [
        await http.get("/healthz"),
        await http.get("/readyz"),
        await http.get("/items"),
        await http.get("/items/1"),
        await http.get("/items/99999"),
        await http.get("/items?limit=abc"),
        await http.get("/schema/openapi.json"),
        await http.get("/nothing-here"),
        await http.post("/items", json=[{"name": "s", "value": 1}], headers=a),
        await http.patch("/items", json=[{"id": 1, "value": 2}], headers=b),
        await http.patch("/items", json=[{"id": 99999, "value": 2}], headers=b),
        await http.delete("/items/2", headers=a),
        await http.post("/items", json=[{"name": "s", "value": 1}], headers=miss),
        await http.post("/items", json=[{"name": "s", "value": 1}], params={"token": near_miss}),
        await http.post("/items", content=b"{", headers={**a, **json_type}),
        await http.post(
            "/items", content=b'[{"name":"\xff","value":1}]', headers={**a, **json_type}
        ),
        await http.post("/items", content=b"[]", headers={**a, "Content-Type": "text/plain"}),
        await http.patch("/items", json=[{"id": 0, "value": 1}], headers=b),
        await http.get("/metrics"),
    ]
