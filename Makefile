# Two commands for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := data/demo
DEMO_IMAGES ?= 800
DEMO_TRAIN ?= --train.epochs=30 --train.patience=5

.PHONY: demo test test-slow bench clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Installs the package (editable) with the test extra; re-run only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# The fast suite (offline, about a minute and a half on 2 cores); slow tests are marked and left to test-slow.
test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

# The slow tests: the random-VGG16 linear probe, the distribution strategies (two real worker processes).
test-slow: $(VENV)/.installed
	CAPTIONER_MULTIWORKER_TEST=1 $(BIN)/python -m pytest -q -m slow

# The whole pipeline on generated data, offline: every stage is cached, so a re-run is quick.
demo: $(VENV)/.installed
	$(BIN)/captioner demo-data --output $(DEMO) --images $(DEMO_IMAGES)
	$(BIN)/captioner extract --images $(DEMO)/images --output $(DEMO)/features/vgg16-fc2.pkl --weights none
	$(BIN)/captioner prepare --captions $(DEMO)/Flickr8k.token.txt --splits $(DEMO) --output $(DEMO)/captions
	$(BIN)/captioner train --features $(DEMO)/features/vgg16-fc2.pkl --captions $(DEMO)/captions --output models/demo $(DEMO_TRAIN)
	$(BIN)/captioner evaluate --model models/demo --features $(DEMO)/features/vgg16-fc2.pkl --captions $(DEMO)/captions --split test --beam 3

# The README's benchmark tables (about 15 minutes on 2 CPU cores).
bench: $(VENV)/.installed
	$(BIN)/python bench/extract.py --count 60 --course-count 20
	$(BIN)/python bench/train.py
	$(BIN)/python bench/decode.py --naive-images 20

clean-demo:
	rm -rf $(DEMO) models/demo
