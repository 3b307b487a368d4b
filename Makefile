# Two set-up commands: `make demo` and `make test` (both create/update .venv first via `make setup`).
VENV ?= .venv
PY := $(VENV)/bin/python
OPENSORA_HOME ?= $(CURDIR)/.opensora
export OPENSORA_HOME
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -n 2

.PHONY: setup demo test ui bench clean-data

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/opensora-dag demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The Dagster UI on 127.0.0.1:3000 with DAGSTER_HOME=$(OPENSORA_HOME)/dagster holding the project's dagster.yaml.
ui: setup
	mkdir -p $(OPENSORA_HOME)/dagster && cp dagster.yaml $(OPENSORA_HOME)/dagster/dagster.yaml
	DAGSTER_HOME=$(OPENSORA_HOME)/dagster $(VENV)/bin/dagster dev -w workspace.yaml --host 127.0.0.1 --port 3000

bench: setup
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-data:
	rm -rf $(OPENSORA_HOME)
