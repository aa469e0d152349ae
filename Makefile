# Two commands: `make run` (start the service) and `make test` (every test).
# Both create what they need: the virtualenv, the Python packages and, on
# Debian as root, the system packages the tests use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test bench bench-quick bench-peers system-deps clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	@echo "Starting on http://$${WS_HOST:-127.0.0.1}:$${WS_PORT:-3001}/ (sign in at /login; Ctrl-C to stop)"
	$(BIN)/gunicorn -k gevent wsgi:app

test: $(STAMP) system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Our suite: both brokers x 1k/5k/10k clients, 3 reps (~10 min). Needs gcc and redis-server.
bench: $(STAMP) system-deps
	$(BIN)/python bench/run.py $(BENCH_ARGS)

bench-quick: $(STAMP) system-deps
	$(BIN)/python bench/run.py --quick

# Side by side with node-ws, flask-sock-naive and c-limit in the shared harness (~15 min).
bench-peers: $(STAMP)
	bench/peers.sh $(PEERS_ARGS)

system-deps:
	@sh scripts/system-deps.sh

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
