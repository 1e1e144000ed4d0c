# The two commands: `make run` serves the API, `make test` runs every check. Both build the
# virtual environment from the lock file first. Needs only Python 3.11+ and make.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run run-replica test lint unit faults deploy-check image image-check load rehearse bench lock \
	swagger-ui clean

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

# The Dockerfile built with podman (docker where only it is), tagged as the dev overlay deploys it.
# Where no registry answers, its base debian:trixie-slim is made from Debian's packages first
# (mmdebstrap). README, "Container image".
IMAGE ?= registry.example.com/playing-with-neon-service:dev
image:
	IMAGE=$(IMAGE) $(PYTHON) deploy/image.py

# Builds the image, then runs it as k8s/base runs the pods (UID 10001, read-only root, no
# capabilities, /tmp a tmpfs) against a PostgreSQL of its own: migrate, serve, the API, the
# HEALTHCHECK, SIGTERM draining, load; prints the figures (size, start to ready, RSS).
image-check: $(STAMP)
	IMAGE=$(IMAGE) $(BIN)/python -m tests.image.check

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
# batches at 1, 4 and 16 times -c64, two kinds of clients), the production path (PgBouncer 1.24.1
# in both pooler modes with the baseline and the stack floor, database round trips of 1 and 4 ms;
# tests/build-pgbouncer.sh builds it once), tracing's cost and profiles; about 41 minutes;
# writes bench/RESULTS.md. One section alone: .venv/bin/python bench/run.py --only-overload
# (about 13 minutes), --only-production (about 13), --only-tracing.
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

# Swagger UI for the docs page (/schema/swagger), vendored in service/static/swagger-ui from npm's
# swagger-ui-dist (npm pack checks the tarball against the registry's integrity hash; it runs no
# install scripts). Only the bundle, its stylesheet, a favicon and the licences are kept.
SWAGGER_UI_VERSION ?= 5.35.0
SWAGGER_UI_FILES := LICENSE NOTICE package.json favicon-32x32.png swagger-ui-bundle.js \
	swagger-ui-bundle.js.LICENSE.txt swagger-ui.css
swagger-ui:
	rm -rf .swagger-ui-dist && mkdir .swagger-ui-dist
	cd .swagger-ui-dist && npm pack --silent swagger-ui-dist@$(SWAGGER_UI_VERSION) >/dev/null \
		&& tar -xzf swagger-ui-dist-$(SWAGGER_UI_VERSION).tgz
	rm -rf service/static/swagger-ui && mkdir -p service/static/swagger-ui
	cd .swagger-ui-dist/package && cp $(SWAGGER_UI_FILES) ../../service/static/swagger-ui/
	rm -rf .swagger-ui-dist

clean:
	rm -rf $(VENV) .venv-load .venv-deploy .venv-checkov load-report .mypy_cache .ruff_cache .pytest_cache
