# The README's commands. Every target creates .venv and installs the project when it is missing.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: test demo bench venv clean

venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(PY) -m pip install -q -e '.[test]'
	touch $(VENV_STAMP)

test: $(VENV_STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

demo: $(VENV_STAMP)
	$(PY) demo.py

bench: $(VENV_STAMP)
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache
