# Two commands: `make run` (start the service) and `make test` (every check).
# Both create what they need: the virtualenv, the Python packages and, on
# Debian as root, the system packages the tests use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Branch coverage of the service's code, gunicorn's workers included (see [tool.coverage] in pyproject.toml).
COVERAGE := --cov --cov-branch --cov-report=term:skip-covered

.PHONY: run test test-fast lint conformance bench bench-quick bench-connect bench-storm bench-history bench-peers system-deps clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

# Development: demo users on the first run (and how to sign in, every run), then the server.
run: $(STAMP)
	@$(BIN)/flask --app app users seed-demo
	$(BIN)/gunicorn -k gevent wsgi:app

# Everything CI checks: lint and types first, then every test tier with coverage.
test: lint system-deps
	$(BIN)/python -m pytest $(COVERAGE) $(PYTEST_ARGS)

# The unit tier alone: the core over socketpairs and plain values, no server (a few seconds).
test-fast: $(STAMP)
	FUZZ_EXAMPLES=100 $(BIN)/python -m pytest tests/unit -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# RFC 6455 conformance: the Autobahn fuzzing client (Python 2.7) against our framing and connection code.
conformance: $(STAMP)
	sh conformance/run.sh

# Our suite (~35 min; needs gcc and redis-server): fan-out for both brokers x history on/off x 1k/5k/10k
# clients, 3 reps; the connect storm (10,000 clients, /health and probe broadcasts meanwhile) for the
# project and for the stack's floor (bench/floor); the reload storm with /health through it.
bench: $(STAMP) system-deps
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/run.py --connect-storm --brokers memory,redis --history on --reps 3
	$(BIN)/python bench/run.py --connect-storm --floor --reps 3
	$(BIN)/python bench/run.py --storm --reps 1

# The connect storm alone, project and floor (~2 min).
bench-connect: $(STAMP) system-deps
	$(BIN)/python bench/run.py --connect-storm --brokers memory --reps 3 $(BENCH_ARGS)
	$(BIN)/python bench/run.py --connect-storm --floor --reps 3

bench-quick: $(STAMP) system-deps
	$(BIN)/python bench/run.py --quick

# The reload storm: 10,000 clients, 50 broadcasts/s, a SIGHUP, /health polled; both brokers (~1 min).
bench-storm: $(STAMP) system-deps
	$(BIN)/python bench/run.py --storm --reps 1 $(BENCH_ARGS)

# The delivery guarantee's cost: history on vs off, runs long enough (1-2M deliveries) to rise above
# the machine's noise, 5 reps in ABBA order (~20 min).
bench-history: $(STAMP) system-deps
	$(BIN)/python bench/run.py --configs "1000:2000:0 5000:200:0 10000:100:0" --history on,off --reps 5 $(BENCH_ARGS)

# Side by side with node-ws, flask-sock-naive, c-limit and c-limit-coalesce in the shared harness (~7 min).
bench-peers: $(STAMP)
	bench/peers.sh $(PEERS_ARGS)

system-deps:
	@sh scripts/system-deps.sh

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts .coverage .coverage.*
