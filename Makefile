# The two commands: `make run` serves the API, `make test` runs every check. Both build the
# virtual environment from the lock file first. Needs only Python 3.11+ and make.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run run-replica test lint unit faults deploy-check load rehearse bench lock clean

# Plain-text logs for people, unless LOG_FORMAT is set in the environment.
run: $(STAMP)
	LOG_FORMAT=$${LOG_FORMAT:-console} $(BIN)/python -m service

# The same, with a streaming replica of the embedded database (pg_basebackup -R, copied afresh at
# each start into .data/postgres-replica) serving the reads, as DATABASE_READ_URL would.
run-replica: $(STAMP)
	LOG_FORMAT=$${LOG_FORMAT:-console} $(BIN)/python -m service serve --replica

test: lint unit faults deploy-check

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict service

unit: $(STAMP)
	$(BIN)/python -m pytest --ignore=tests/faults --ignore=tests/test_bad_input.py \
		--ignore=tests/test_security.py

# Faults, bad input and intruders on real processes (uvicorn, a PostgreSQL the tests stop and
# start, PgBouncer): 2-3 minutes. Prints the Reliability table and writes it to
# load-report/reliability.md (rows as JSON lines in load-report/reliability.jsonl).
faults: $(STAMP)
	rm -f load-report/reliability.jsonl
	RELIABILITY_REPORT=load-report/reliability.jsonl $(BIN)/python -m pytest tests/faults \
		tests/test_bad_input.py tests/test_security.py

# Static checks of the Dockerfile and k8s/: tools pinned in deploy/*.lock, installed on first use.
deploy-check:
	PYTHON=$(PYTHON) bash deploy/validate.sh

# Locust headless against the service as shipped (seeded embedded database), or against LOAD_HOST.
# Knobs, as environment or make variables: LOAD_USERS=50 LOAD_SPAWN_RATE=10 LOAD_DURATION=60 (s)
# LOAD_P95_MS=500 LOAD_ROWS=10000 LOAD_HOST= LOAD_API_TOKEN=. Reports in load-report/.
load: $(STAMP)
	$(BIN)/python tests/load/run.py

# A rolling update under load, shaped like k8s/: 3 processes behind HAProxy, PgBouncer in
# transaction mode, locust distributed; each process replaced in turn. Needs Debian's haproxy and
# a pgbouncer (tests/build-pgbouncer.sh's 1.24.1, else Debian's). REHEARSE_DURATION=40 (s)
# REHEARSE_USERS=20. Writes load-report/rehearsal.md and .json.
rehearse: $(STAMP)
	$(BIN)/python -m tests.rehearse.run

# The service (1 and 2 workers) against a bare ASGI + asyncpg baseline under wrk, interleaved
# rounds on one embedded PostgreSQL, then the overload section (bench/overload.py: reads and
# batches at 1, 4 and 16 times -c64, two kinds of clients) and profiles; about 20 minutes; writes
# bench/RESULTS.md. `.venv/bin/python bench/run.py --only-overload` runs the overload section alone
# (about 6 minutes) and replaces it in bench/RESULTS.md.
bench: $(STAMP) .venv-bench/.installed
	$(BIN)/python bench/run.py

# py-spy for the benchmark's profiles, in a virtual environment of its own.
.venv-bench/.installed: requirements-bench.lock
	test -x .venv-bench/bin/python || $(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install --quiet --require-hashes --no-deps -r requirements-bench.lock
	touch .venv-bench/.installed

$(STAMP): requirements-dev.lock
	$(PYTHON) -c 'import sys; sys.exit("Python 3.11+ is required") if sys.version_info < (3, 11) else None'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements-dev.lock
	touch $(STAMP)

# Re-pin after editing pyproject.toml's dependencies (uv resolves; pip installs).
lock: $(STAMP)
	$(BIN)/python -m pip install --quiet uv==0.13.9
	$(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes \
		--no-header --quiet -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --extra embedded --extra dev --universal \
		--python-version 3.11 --generate-hashes --no-header --quiet -o requirements-dev.lock

clean:
	rm -rf $(VENV) .venv-load .venv-deploy .venv-checkov load-report .mypy_cache .ruff_cache .pytest_cache
