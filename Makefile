# Two commands for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := data/demo
DEMO_IMAGES ?= 800
DEMO_TRAIN ?= --train.epochs=30 --train.patience=5

# The real path on this project's reference Flickr8k copy in ../shared (SHARED=DIR for another; see README):
# JPEGs -> int8 MobileNetV2 features -> captions.
SHARED ?= ../shared
F8K := $(SHARED)/flickr8k
F8K_BACKBONE := $(SHARED)/backbones/mobilenet_v2_imagenet_int8.tflite
F8K_DATA ?= data/flickr8k
F8K_FEATURES := $(F8K_DATA)/features/mobilenet_v2-int8-train-dev.pkl
F8K_CAPTIONS := $(F8K_DATA)/captions
F8K_MODEL ?= models/flickr8k-mobilenet_v2
F8K_TRAIN ?=
# Runs a stage and says how long it took (the per-stage times in results/benchmarks.md come from these lines).
TIMED = t0=$$(date +%s); $(1) && echo "  [$(2): $$(( $$(date +%s) - t0 )) s]"

.PHONY: demo test test-slow bench clean-demo flickr8k pretrained

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Installs the package (editable) with the test extra; re-run only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[train,test]'
	touch $@

# The fast suite (offline; about 80 s on 2 idle cores, 2.5 min when another job shares them); slow tests are marked and left to test-slow.
test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

# The slow tests: the random-VGG16 linear probe, the distribution strategies (two real worker processes).
test-slow: $(VENV)/.installed
	CAPTIONER_MULTIWORKER_TEST=1 $(BIN)/python -m pytest -q -m slow

# First the main job: the pretrained default (captioner/pretrained, TensorFlow-free) captions four real
# Flickr8k dev photos (docs/photos). Then the whole pipeline on generated data, offline: every stage is
# cached, so a re-run is quick.
demo: $(VENV)/.installed
	$(BIN)/caption docs/photos/*.jpg || echo "(the pretrained default needs its backbone file: docs/runtime.md says where it is looked for)"
	$(BIN)/captioner demo-data --output $(DEMO) --images $(DEMO_IMAGES)
	$(BIN)/captioner extract --images $(DEMO)/images --output $(DEMO)/features/vgg16-fc2.pkl --weights none
	$(BIN)/captioner prepare --captions $(DEMO)/Flickr8k.token.txt --splits $(DEMO) --output $(DEMO)/captions
	$(BIN)/captioner train --features $(DEMO)/features/vgg16-fc2.pkl --captions $(DEMO)/captions --output models/demo $(DEMO_TRAIN)
	$(BIN)/captioner evaluate --model models/demo --features $(DEMO)/features/vgg16-fc2.pkl --captions $(DEMO)/captions --split test --beam 3

# The tables of results/benchmarks.md (about 17 minutes on 2 CPU cores; the real-data rows after `make flickr8k`).
bench: $(VENV)/.installed
	$(BIN)/python bench/extract.py --count 60 --course-count 20
	if [ -d $(F8K_CAPTIONS) ]; then \
		$(BIN)/python bench/train.py --prepared $(F8K_CAPTIONS) --features $(F8K)/features/mobilenetv2-gap1280-train.npz; \
	else $(BIN)/python bench/train.py; fi
	$(BIN)/python bench/step.py
	$(BIN)/python bench/decode.py --naive-images 20
	if [ -d $(F8K_MODEL) ]; then $(BIN)/python bench/serve.py --model $(F8K_MODEL) --clients 8 --duration 30 --max-captions 600 --caption-images 3; \
	else $(BIN)/python bench/serve.py; fi

# Every stage on the real Flickr8k files beside the checkout, each cached (a rerun is quick):
# extract the 7,000 train+dev images-224 JPEGs with the shared int8 MobileNetV2 (about 1.5 minutes
# on 2 cores), prepare the captions, train (about 20 minutes on 2 cores), evaluate on dev (beam 3),
# then caption the original-resolution dev photos in $(F8K)/images. F8K_TRAIN passes train
# overrides (e.g. F8K_TRAIN=--train.epochs=1 F8K_MODEL=models/scratch for a quick plumbing check).
flickr8k: $(VENV)/.installed
	@if [ ! -f $(F8K)/Flickr8k.token.txt ] || [ ! -d $(F8K)/images-224 ] || [ ! -f $(F8K_BACKBONE) ]; then \
		echo "make flickr8k: $(F8K) (Flickr8k.token.txt, images-224/) and $(F8K_BACKBONE) are needed; not found, nothing done"; \
		exit 0; \
	fi; \
	set -e; \
	$(call TIMED,$(BIN)/captioner extract --images $(F8K)/images-224 --output $(F8K_FEATURES) --backbone mobilenet_v2 --weights $(F8K_BACKBONE),extract); \
	$(call TIMED,$(BIN)/captioner prepare --captions $(F8K)/Flickr8k.token.txt --splits $(F8K) --output $(F8K_CAPTIONS),prepare); \
	$(call TIMED,$(BIN)/captioner train --features $(F8K_FEATURES) --captions $(F8K_CAPTIONS) --output $(F8K_MODEL) $(F8K_TRAIN),train); \
	$(call TIMED,$(BIN)/captioner evaluate --model $(F8K_MODEL) --features $(F8K_FEATURES) --captions $(F8K_CAPTIONS) --split dev --beam 3 --images $(F8K)/images-224,evaluate); \
	ls $(F8K)/images | grep -Fx -f $(F8K)/Flickr_8k.devImages.txt | sed 's|^|$(F8K)/images/|' > $(F8K_DATA)/dev-photos.txt; \
	$(call TIMED,xargs $(BIN)/caption --model $(F8K_MODEL) --beam 3 < $(F8K_DATA)/dev-photos.txt | tee $(F8K_MODEL)/captions-dev-photos.txt,caption $$(wc -l < $(F8K_DATA)/dev-photos.txt) photos)

# The pretrained default's recipe end to end (model card: docs/model-card.md): the 7x7x320 maps of the
# int8 MobileNetV2, three cross-entropy transformers, SCST of each (10 epochs), their ensemble's captions
# of the train images, a transformer student trained on the references plus those captions, SCST of the
# student (7 epochs), then the export. Every step is cached and resumes after a kill; about 6 hours on
# 2 idle cores by the runs' epoch times (the SCST epochs are most of it). PT (the recipe's folder), PT_BUNDLE
# (where it exports), PT_TRAIN and PT_SCST (flags appended to its train and finetune commands; later flags
# win) can be set: `make pretrained PT=models/pretrained-check PT_BUNDLE=models/pretrained-check/bundle
# PT_TRAIN=--train.epochs=1 PT_SCST=--finetune.epochs=1` runs every step once with one epoch, a check of
# the recipe's plumbing (about 45 minutes), not a model to ship.
PT ?= models/pretrained
PT_BUNDLE ?= captioner/pretrained
PT_TRAIN ?=
PT_SCST ?=
F8K_MAPS := $(F8K_DATA)/features/mobilenet_v2-int8-maps320-train-dev.h5
pretrained: $(VENV)/.installed
	$(BIN)/captioner prepare --captions $(F8K)/Flickr8k.token.txt --splits $(F8K) --output $(F8K_CAPTIONS)
	$(BIN)/captioner extract --images $(F8K)/images-224 --output $(F8K_MAPS) --backbone mobilenet_v2 \
		--weights $(F8K_BACKBONE) --config configs/maps-320.json
	set -e; for seed in 0 1 2; do \
		$(BIN)/captioner train --features $(F8K_MAPS) --captions $(F8K_CAPTIONS) --output $(PT)/ce-s$$seed \
			--config configs/transformer.json --train.seed=$$seed $(PT_TRAIN); \
		$(BIN)/captioner finetune --model $(PT)/ce-s$$seed --features $(F8K_MAPS) --captions $(F8K_CAPTIONS) \
			--output $(PT)/scst-s$$seed --config configs/scst-attention-xe.json --finetune.epochs=10 $(PT_SCST); \
	done
	$(BIN)/captioner evaluate --model $(PT)/scst-s0 --model $(PT)/scst-s1 --model $(PT)/scst-s2 --features $(F8K_MAPS) \
		--captions $(F8K_CAPTIONS) --split train --beam 3 --output $(PT)/teacher
	$(BIN)/captioner train --features $(F8K_MAPS) --captions $(F8K_CAPTIONS) --output $(PT)/student --config configs/pretrained-student.json \
		--train.teacher_captions=$(PT)/teacher/eval-train.json $(PT_TRAIN)
	$(BIN)/captioner finetune --model $(PT)/student --features $(F8K_MAPS) --captions $(F8K_CAPTIONS) --output $(PT)/scst \
		--config configs/scst-attention-xe.json --finetune.epochs=7 $(PT_SCST)
	$(BIN)/captioner evaluate --model $(PT)/scst --features $(F8K_MAPS) --captions $(F8K_CAPTIONS) --split dev --beam 3
	$(BIN)/captioner export --model $(PT)/scst --output $(PT_BUNDLE) --export.backbone=false --force

clean-demo:
	rm -rf $(DEMO) models/demo
