# The two commands of the README:  make demo  (set up + run the quickstart pipeline)
#                                  make test  (set up + run the test suite)
PYTHON ?= python3
CONFIG ?= configs/quickstart.yaml
export RAY_USAGE_STATS_ENABLED = 0
# idle OpenMP threads sleep instead of spinning: on a shared or oversubscribed CPU (Ray workers beside
# the driver) spinning made small torch ops up to 40x slower here
export OMP_WAIT_POLICY ?= PASSIVE
STAMP := .setup.stamp
# faiss build: cpu, or gpu on a CUDA machine (pip uninstall faiss-cpu first): make demo EXTRAS=gpu,dev
EXTRAS ?= cpu,dev

.PHONY: setup demo test cluster-test lint bench clean

$(STAMP): pyproject.toml scripts/install-system-deps.sh
	bash scripts/install-system-deps.sh
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	$(PYTHON) -c "import torch, torchvision; torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)" \
	  || { echo "error: torch $$($(PYTHON) -c 'import torch; print(torch.__version__)') cannot load torchvision; reinstall the pinned pair: pip install --force-reinstall torch==2.14.1 torchvision==0.29.1"; exit 1; }
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PYTHON) -m specdistill.cli run --config $(CONFIG)

test: setup
	$(PYTHON) -m pytest

# every command of docs/cluster.md on a real `ray up` cluster at 127.0.0.1 (root; private namespaces,
# safe beside other Ray tests): scripts/cluster-smoke.sh
cluster-test: setup
	bash scripts/cluster-smoke.sh

lint: setup
	$(PYTHON) -m ruff check .

bench: setup
	for script in benchmarks/bench_*.py; do $(PYTHON) $$script || exit 1; done

clean:
	rm -rf runs $(STAMP)
