"""The service as shipped (`python -m service`), as a real uvicorn process on a free port."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import URL, make_url

from tests.conftest import AUTH, free_port, run_cli, run_service, service_environment

pytestmark = pytest.mark.slow


def test_end_to_end_on_the_configured_database(
    database_url: URL, notebook_rows: None, tmp_path: Path
) -> None:
    with run_service(service_environment(database_url), tmp_path) as service:
        with httpx.Client(base_url=service.base_url, timeout=10) as http:
            assert http.get("/readyz").status_code == 200
            body = http.get("/items", params={"min_value": 23}).json()
            assert [item["id"] for item in body["items"]] == [12, 19, 21, 22]
            batch = [{"id": 5, "value": 11.0}, {"id": 6, "value": 15.99}]
            assert http.patch("/items", json=batch).status_code == 401
            assert http.patch("/items", json=batch, headers=AUTH).json() == {"updated": 2}
            created = http.post("/items", json=[{"name": "e2e", "value": 2.5}], headers=AUTH)
            assert created.status_code == 201
            new_id = created.json()["items"][0]["id"]
            assert http.get(f"/items/{new_id}").json()["name"] == "e2e"
            assert http.delete(f"/items/{new_id}", headers=AUTH).status_code == 204
            assert "server" not in http.get("/healthz").headers
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(timeout=30) == 0
    log = service.log()
    assert "using database" in log
    assert "Traceback" not in log


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"DATABASE_URL": "mysql://app:Hunter2Hunter2@db/app"}, "DATABASE_URL"),
        (
            {"DATABASE_URL": "postgresql://app:Hunter2Hunter2@db/app", "API_TOKENS": ""},
            "API_TOKENS",
        ),
        ({"DB_POOL_SIZE": "lots"}, "DB_POOL_SIZE"),
        ({"API_TOKENS": "replace-me-with-a-long-random-token"}, "API_TOKENS"),
    ],
)
def test_bad_setting_stops_start_up_with_one_line(
    tmp_path: Path, overrides: dict[str, str], key: str
) -> None:
    result = run_cli(service_environment(None, **overrides), tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"configuration error: {key}: ")
    assert "Hunter2Hunter2" not in result.stderr + result.stdout
    assert "replace-me" not in result.stderr + result.stdout


def test_dotenv_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("DB_POOL_SIZE=nope\n")
    result = run_cli(service_environment(None), tmp_path)
    assert result.returncode == 2
    assert "DB_POOL_SIZE" in result.stderr


def test_fresh_machine_runs_on_the_embedded_database_and_keeps_its_data(
    tmp_path: Path, embedded_db_dir: Path
) -> None:
    env = service_environment(None, API_TOKENS="", EMBEDDED_DB_DIR=str(embedded_db_dir))
    with run_service(env, tmp_path) as service, httpx.Client(base_url=service.base_url) as http:
        body = http.get("/items", params={"min_value": 23}, timeout=10).json()
        assert [item["id"] for item in body["items"]] == [12, 19, 21, 22]
        # No API_TOKENS on the embedded development database: writes are open (with a warning).
        created = http.post("/items", json=[{"name": "kept", "value": 99.5}], timeout=10)
        assert created.status_code == 201
        new_id = created.json()["items"][0]["id"]
        assert new_id == 23
    assert "writes are open" in service.log()
    with run_service(env, tmp_path) as service, httpx.Client(base_url=service.base_url) as http:
        assert http.get(f"/items/{new_id}", timeout=10).json()["name"] == "kept"
        assert len(http.get("/items", timeout=10).json()["items"]) == 7  # not seeded twice


def test_migrate_command_applies_and_is_repeatable(database_url: URL, tmp_path: Path) -> None:
    env = service_environment(database_url, API_TOKENS="")  # migrating serves nothing
    for _ in range(2):
        result = run_cli(env, tmp_path, "migrate")
        assert result.returncode == 0, result.stderr
    assert "migrations applied" in result.stderr


@pytest.mark.parametrize("command", [("migrate",), ("seed", "--rows", "5"), ()])
def test_a_database_that_cannot_be_used_is_one_line_not_a_traceback(
    tmp_path: Path, server_url: URL, command: tuple[str, ...]
) -> None:
    port = free_port()
    cases = [
        (server_url.set(database="no_such_database"), "the database does not exist"),
        (server_url.set(password="Hunter2Hunter2", username="nobody"), "refused this user"),
    ]
    if command:  # serving waits for a database that is not there yet (see the next test)
        cases.append(
            (
                make_url(f"postgresql://app:Hunter2Hunter2@127.0.0.1:{port}/items"),
                f"error: cannot use 127.0.0.1:{port}/items: connection refused",
            )
        )
    for url, expected in cases:
        env = service_environment(url, **({"API_TOKENS": ""} if command else {}))
        result = run_cli(env, tmp_path, *command)
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert expected in lines[0], lines[0]
        assert "Traceback" not in result.stderr + result.stdout
        assert "Hunter2Hunter2" not in result.stderr + result.stdout
    assert "replace-me" not in result.stderr + result.stdout


def test_serving_a_database_not_there_yet_answers_503_and_logs_one_line_per_failure(
    tmp_path: Path,
) -> None:
    """A managed database may be waking up or failing over when a pod starts: the pod must
    come up, say why it cannot serve, and not write a line per request."""
    port = free_port()
    env = service_environment(
        make_url(f"postgresql://app:Hunter2Hunter2@127.0.0.1:{port}/items"), DB_POOL_TIMEOUT="1"
    )
    with run_service(env, tmp_path) as service, httpx.Client(base_url=service.base_url) as http:
        answers = [http.get("/items", timeout=10) for _ in range(20)]
        ready = http.get("/readyz", timeout=10)
    log = service.log()  # complete once the process has ended
    assert {a.status_code for a in answers} == {503}
    assert all(a.headers["retry-after"] == "1" for a in answers)
    assert ready.status_code == 503
    start_line = f"cannot use 127.0.0.1:{port}/items yet: connection refused"
    assert log.count(start_line) == 1, log
    failure_line = f"database unavailable (127.0.0.1:{port}/items): connection refused"
    assert log.count(failure_line) == 1, log  # 20 failed requests, one line
    assert "Traceback" not in log and "Hunter2Hunter2" not in log


def test_make_run_replica_serves_reads_from_an_embedded_streaming_replica(
    tmp_path: Path, embedded_db_dir: Path
) -> None:
    """`make run-replica`: the embedded primary plus a streaming replica of it, reads on the
    replica, a write's Consistency-Token honoured; both servers end with the service."""
    env = service_environment(None, API_TOKENS="", EMBEDDED_DB_DIR=str(embedded_db_dir))
    with (
        run_service(env, tmp_path, args=("serve", "--replica")) as service,
        httpx.Client(base_url=service.base_url, timeout=10) as http,
    ):
        written = http.patch("/items", json=[{"id": 12, "value": 77.5}])
        assert written.status_code == 200, written.text
        token = written.headers["consistency-token"]
        read = http.get("/items/12", headers={"Consistency-Token": token})
        assert read.json()["value"] == 77.5
        for _ in range(20):  # token-less reads, on the replica once it has caught up
            http.get("/items", params={"min_value": 23})
        metrics = http.get("/metrics").text
    served = [line for line in metrics.splitlines() if line.startswith("db_reads_total")]
    replica_reads = sum(float(line.split()[-1]) for line in served if 'target="replica"' in line)
    assert replica_reads >= 20, served
    assert service.process.returncode == 0
    log = service.log()
    assert "Traceback" not in log
