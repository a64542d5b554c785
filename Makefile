# gridshed: the two commands a new user needs are `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.setup-stamp
APT_PKGS := mosquitto mbpoll socat

.PHONY: setup demo test bench pipx-check firmware lint clean apt

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory apt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@# per-port MicroPython stubs for the static checks (esp32 and rp2 stubs collide in one site-packages)
	for port in esp32 rp2; do $(BIN)/pip install -q --no-deps --target $(VENV)/mpstubs/$$port \
	  micropython-$$port-stubs==1.29.0.post1 micropython-stdlib-stubs==1.29.0.post2 || exit 1; done
	@$(BIN)/micropython -c "import sys; print('micropython', sys.implementation.version)"
	@touch $(STAMP)

# System tools the tests talk to (real Mosquitto broker, libmodbus's mbpoll, socat).
apt:
	@missing=""; for t in mosquitto mbpoll socat; do \
	  command -v $$t >/dev/null 2>&1 || [ -x /usr/sbin/$$t ] || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS) >/dev/null; \
	  else \
	    echo "missing:$$missing -- run: sudo apt-get install $(APT_PKGS)"; \
	  fi; \
	fi

demo: setup
	$(BIN)/gridshed sim scenarios/ercot_ffr_dip.csv --site scenarios/demo-site.toml

# four workers on a 2-core machine: most e2e time is the simulated site's real time (waiting, not
# CPU), so four overlap it (939 tests: 4m38 with -n 4 against 8m39 with -n 2 on 2 cores). A module's
# tests stay on one worker (module fixtures such as the 20-board fleet); the longest module
# (tests/e2e/test_field_flows.py, ~4 min) bounds the run.
test: setup
	$(BIN)/pytest tests -n 4 --dist loadfile

bench: setup
	$(BIN)/python bench/run.py

# `pipx install .` into a private PIPX_HOME and the installed gridshed run from another directory
# (boards, meters, build, sim, vboard + deploy + status); also a section of make bench
pipx-check: setup
	$(BIN)/python bench/run.py --only install --out build/pipx-check.json

firmware: setup
	$(BIN)/gridshed build --board unix-sim

lint: setup
	$(BIN)/ruff check --select E9,F63,F7,F82,F401,F811 host_tools firmware tests

clean:
	rm -rf build .pytest_cache
