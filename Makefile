# Two commands do everything on a fresh machine:
#   make demo   set up what is missing, then make synthetic data and run the first scenario end to end
#   make test   set up what is missing, then run the test suite
PYTHON ?= python3
DEMO_DIR ?= demo

.PHONY: setup demo test bench

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	@$(PYTHON) -c "import common, monai, nibabel, ignite, pytest, xdist, matplotlib, onnx, onnxruntime, mlflow, submitit" 2>/dev/null \
	  && $(PYTHON) -c "import common, os, sys; sys.exit(0 if os.path.samefile(os.path.dirname(common.__file__), 'common') else 1)" 2>/dev/null \
	  || $(PYTHON) -m pip install -e ".[test]"

demo: setup
	$(PYTHON) tools/demo.py --work_dir $(DEMO_DIR)

test: setup
	$(PYTHON) -m pytest -n 2 --dist loadscope tests

bench: setup
	$(PYTHON) tools/bench_train_step.py
