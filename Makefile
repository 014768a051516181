# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# The local CPU build of torch is pinned through constraints.txt; pyproject.toml keeps a normal range.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
ARGS ?=

# the runtime dependencies (what `make demo` needs)
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $(STAMP)

# and the test extras (transformers, TRL, playwright, ...), which only the tests need
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $(TEST_STAMP)

.PHONY: install demo test test-all lint
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/nanoseek demo $(ARGS)

# The code reward's sandbox needs bubblewrap: installed here where possible (root with apt-get); otherwise this says
# how, and the sandbox tests are skipped with that reason (pytest -rs lists it).
test: $(TEST_STAMP)
	@missing=""; command -v bwrap >/dev/null || missing="$$missing bubblewrap"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "make test: installing$$missing (the code sandbox, the chat-page test's browser): apt-get install -y$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null; \
	fi; \
	command -v chromium >/dev/null || echo "make test: chromium is missing, so the chat-page test is SKIPPED." \
	  "Install it with: sudo apt-get install chromium" >&2; \
	if command -v bwrap >/dev/null; then $(BIN)/python -m pytest; else \
	  echo "make test: bubblewrap is missing and could not be installed here, so the code-sandbox tests are" \
	       "SKIPPED. Install it with: sudo apt-get install bubblewrap" >&2; \
	  NANOSEEK_SKIP_SANDBOX_TESTS=1 $(BIN)/python -m pytest; \
	fi

test-all: $(TEST_STAMP)
	$(BIN)/python -m pytest -m "slow or not slow"

lint: $(TEST_STAMP)
	$(BIN)/ruff check nanoseek tests benchmarks
