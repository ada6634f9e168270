# Two set-up commands: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: demo test test-cluster soak lint bench bench-quick clean venv train-demo

venv: $(STAMP)

# NOTE: order matters. The CPU torch wheel goes in first, then torchscale/fairscale without their
# pins, then the project; otherwise pip resolves torch to a multi-GB CUDA build.
$(STAMP): pyproject.toml clients/python/pyproject.toml requirements/cpu.txt requirements/no-deps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements/cpu.txt
	$(PIP) install -q --no-deps -r requirements/no-deps.txt
	$(PIP) install -q -e ./clients/python -e '.[dev]'
	$(PY) -c "import biprompt, torch, torchscale.model.BEiT3, segment_anything, transformers"
	touch $(STAMP)

# lint-imports checks the layers (contracts in pyproject.toml): serving > graph > deployments >
# biprompt, and the client apart from all of them.
test: $(STAMP)
	$(PY) -m ruff check biprompt deployments graph serving clients tests benchmarks deploy
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q
	$(PY) -m pytest -q tests/cluster

# The multi-node tier alone (a head and two worker nodes on this machine; about 4-5 min on 2
# cores). A pytest process of its own: one process holds one Ray connection.
test-cluster: $(STAMP)
	$(PY) -m pytest -q tests/cluster

# Soak: locust (8 users) against a local app with its own Ray and Redis for SOAK_S seconds
# (default 600); writes out/soak/report.md + report.json, exits non-zero when a target fails.
SOAK_S ?= 600
soak: $(STAMP)
	SOAK_S=$(SOAK_S) $(PY) -m benchmarks.soak $(SOAK_ARGS)

# Prints the web page's URL (/demo/); SERVE=1 keeps the app up after the samples, until Ctrl-C.
demo: $(STAMP)
	$(PY) -m serving.demo $(if $(SERVE),--serve) $(DEMO_ARGS)

# Retrains the bundled ShapesRef demo model into DEMO_OUT (seeded), in under an hour on 2 cores:
# SAM (biprompt/train/demo.py; --evf-steps 0 skips its old text stage), SAM's refinement-click
# stage (biprompt/train/refine.py), then the text expert from nothing on that SAM, on a pool
# of scenes encoded once and with the grounding loss on BEiT-3's patches (biprompt/train/text.py
# --new --grounding), then the reference-image expert (biprompt/train/reference.py), then a second
# refinement pass weighted to 320x240 canvases. That pass trains only SAM's prompt encoder and mask
# decoder; it comes last because both experts start their own decoders from SAM's, and read only
# the frozen encoder's embeddings, which it leaves as they were. Last of all, the selection arbiter
# is fit on the finished experts (biprompt/train/arbiter.py, about 1.5 min). WIDE=1 draws
# every stage's scenes from the wider distribution (shapes_ref.WIDE), with the earlier text stage
# and no grounding loss: 59.6 min here, but a worse model at this size (README, "The demo model").
# The recipe before grounding (three more text passes, about 115 min) is in git history (d373fe9).
DEMO_OUT ?= models/demo
ifeq ($(WIDE),1)
train-demo: $(STAMP)
	$(PY) -m biprompt.train.demo --out $(DEMO_OUT) --evf-steps 1400 --wide
	$(PY) -m biprompt.train.refine --model $(DEMO_OUT) --full --steps 400 --images 6 \
		--prompts 4 --max-clicks 8 --lr 3e-4 --warmup 20 --wide
	$(PY) -m biprompt.train.reference --model $(DEMO_OUT) --steps 3000 --wide
else
train-demo: $(STAMP)
	$(PY) -m biprompt.train.demo --out $(DEMO_OUT) --evf-steps 0
	$(PY) -m biprompt.train.refine --model $(DEMO_OUT) --full --steps 600 --images 6 \
		--prompts 4 --max-clicks 8 --lr 3e-4 --warmup 20
	$(PY) -m biprompt.train.text --model $(DEMO_OUT) --new --seed 20261123 --steps 1800 \
		--pool 8000 --lr 5e-4 --warmup 150 --distinct-targets --grounding 1
	$(PY) -m biprompt.train.reference --model $(DEMO_OUT) --steps 2000
	$(PY) -m biprompt.train.refine --model $(DEMO_OUT) --full --steps 600 --images 6 \
		--prompts 4 --max-clicks 8 --lr 3e-4 --warmup 20 --seed 20261203 \
		--canvas-weights 0.2,0.6,0.1,0.1
	$(PY) -m biprompt.train.arbiter --model $(DEMO_OUT)
endif

# Benchmarks: writes BENCHMARKS.md (and out/bench/results.json). bench-quick (or QUICK=1) takes
# a few minutes on 2 cores; bench runs more requests per row.
bench: $(STAMP)
	$(PY) -m benchmarks.run $(if $(QUICK),--quick) $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(PY) -m benchmarks.run --quick $(BENCH_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) out
