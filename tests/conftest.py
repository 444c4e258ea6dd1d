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

# pytest-xdist (--dist loadfile, pyproject.toml) gives each worker whole files, one after another
# in collection order (--no-loadscope-reorder: otherwise the files with the most tests go first,
# which puts the few-test files of servers, subprocesses and Ray last and leaves one worker
# running them alone for minutes at the end). These files take longest (tens of seconds each, on
# 2 cores), so they start first and the many short files fill in around them. Longest first;
# a file not listed runs after them in the usual order.
LONGEST_FIRST = [
    "tests/test_ray.py",
    "tests/test_main_job.py",
    "tests/test_single_file.py",
    "tests/test_comfy_ui_format.py",
    "tests/test_server_load.py",
    "tests/test_hostile.py",
    "tests/test_samplers_comfy.py",
    "tests/test_frontend.py",
    "tests/test_lora_style.py",
    "tests/test_sd_nodes.py",
    "tests/test_compile.py",
    "tests/test_sd_parity.py",
    "tests/test_comfy_simple_nodes.py",
    "tests/test_inpaint.py",
    "tests/test_controlnet.py",
    "tests/test_embeddings.py",
    "tests/test_server_security.py",
    "tests/test_signals.py",
    "tests/test_comfy_sampling.py",
    "tests/test_server.py",
    "tests/test_server_preview.py",
    "tests/test_merge.py",
]


def pytest_collection_modifyitems(config, items):
    """Longest files first (see LONGEST_FIRST); each file's tests stay together, in their order."""
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))
