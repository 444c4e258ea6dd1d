"""Shared test set-up: no network, ever."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import torch  # noqa: E402

# Tiny models: one thread is faster than two fighting over small kernels. Tolerances must not
# depend on it: run the suite with GRAPHSD_TEST_THREADS (or OMP_NUM_THREADS, which subprocesses
# the tests start also follow) set to 2 or 4 too (kernels then split and order their sums differently).
torch.set_num_threads(int(os.environ.get("GRAPHSD_TEST_THREADS") or os.environ.get("OMP_NUM_THREADS") or "1"))
