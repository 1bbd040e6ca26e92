# ecqae: train -> hls -> verify -> evaluate, on the embedded default unless told otherwise.
# The Makefile bootstraps its own virtual environment from requirements.lock.

PYTHON  ?= $(shell command -v python3.11 || command -v python3)
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.ecqae-installed

# Training knobs (make train DATA=... ETA=... EPOCHS=...)
DATA    ?= embedded
ETA     ?= auto
EPOCHS  ?= 30
ELINKS  ?= 5
WAFERS  ?= 200000
SEED    ?= 0
RUN     ?= runs/default
PLAIN   ?= $(RUN)-plain
TRAIN_ARGS ?=
# Firmware knobs (make hls CONFIG=firmware_configs/econt_asic.yaml)
CONFIG  ?= $(wildcard firmware_configs/*.yaml)
HLS_OUT ?= hls
# Evaluation / benchmark knobs
EVAL_OUT ?= $(RUN)/evaluation
BENCH_WAFERS ?= 100000
BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: all train train-plain hls verify evaluate handoff bench bench-smoke test lint venv clean

all: train train-plain hls verify evaluate

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $@

venv: $(STAMP)

train: $(STAMP)
	$(PY) -m ecqae train --data $(DATA) --eta $(ETA) --epochs $(EPOCHS) --elinks $(ELINKS) \
		--wafers $(WAFERS) --seed $(SEED) --out $(RUN) $(TRAIN_ARGS)

# The ablation: the same model and training without the sum and eta conditions.
train-plain: $(STAMP)
	$(PY) -m ecqae train --data $(DATA) --eta $(ETA) --epochs $(EPOCHS) --elinks $(ELINKS) \
		--wafers $(WAFERS) --seed $(SEED) --out $(PLAIN) --no-condition $(TRAIN_ARGS)

hls: $(STAMP)
	$(PY) -m ecqae hls --run $(RUN) --out $(HLS_OUT) $(CONFIG)

verify: $(STAMP)
	$(PY) -m ecqae verify --run $(RUN) --hls $(HLS_OUT) $(CONFIG)

evaluate: $(STAMP)
	$(PY) -m ecqae evaluate --run $(RUN) --out $(EVAL_OUT) $(if $(wildcard $(PLAIN)/COMPLETE),--ablation $(PLAIN))

handoff: $(STAMP)
	$(PY) -m ecqae handoff --run $(RUN) --hls $(HLS_OUT) $(CONFIG)

# make bench BENCH_WAFERS=1000000; make bench BENCH_ARGS="--scaling --chain --reps 5"
bench: $(STAMP)
	$(PY) -m ecqae bench --wafers $(BENCH_WAFERS) --out bench.json $(BENCH_ARGS)

bench-smoke: $(STAMP)
	$(PY) -m ecqae bench --smoke --out runs/bench-smoke.json $(BENCH_ARGS)

test: $(STAMP)
	$(PY) -m ruff check ecqae tests
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check ecqae tests
	$(PY) -m ruff format --check ecqae tests

clean:
	rm -rf runs hls/*/ hls/.[!.]* bench.json .pytest_cache
