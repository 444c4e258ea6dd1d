"""Shared test set-up: no network, ever."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

# Tiny models: one thread is faster than two fighting over small kernels. Tolerances must not
# depend on it: run the suite with GRAPHSD_TEST_THREADS (or OMP_NUM_THREADS) set to 2 or 4 too
# (kernels then split and order their sums differently). The processes the tests start (the
# commands, servers and batteries forked or run fresh, Ray's workers) follow OMP_NUM_THREADS, so
# it is set to the same count when it is not set: otherwise they take one thread per core and, on
# two cores with two xdist workers busy, spend a tenth of the run's CPU fighting over them.
THREADS = os.environ.get("GRAPHSD_TEST_THREADS") or os.environ.get("OMP_NUM_THREADS") or "1"
os.environ.setdefault("OMP_NUM_THREADS", THREADS)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(THREADS))

# pytest-xdist (--dist loadfile, pyproject.toml) gives each worker whole files, one after another
# in collection order (--no-loadscope-reorder: otherwise the files with the most tests go first,
# which puts the few-test files of servers, subprocesses and Ray last and leaves one worker running
# them alone for minutes at the end). The files in SHARED_SERVER go to one worker together, as one
# unit (pytest_xdist_make_scheduler below). Longest first, so the many short files fill in around
# the long ones and the run ends on files of a second or less (a worker is handed its next file
# while it runs its current file's last tests, so a long file late in the order can leave the other
# worker idle); a file not listed (each under ~2 s) runs after them in the usual order.
SHARED_SERVER = [  # in this order: the first needs a fresh server, the last restarts and stops it
    "tests/test_server.py",
    "tests/test_server_preview.py",
    "tests/test_server_load.py",
]
LONGEST_FIRST = [  # seconds each took in a full run with -n 2 (Ray's worker processes take CPU besides its own worker)
    "tests/test_ray.py",  # 161
    *SHARED_SERVER,  # 86 together
    "tests/test_main_job.py",  # 39
    "tests/test_lora_style.py",  # 37
    "tests/test_single_file.py",  # 27
    "tests/test_compile.py",  # 26
    "tests/test_frontend.py",  # 23
    "tests/test_hostile.py",  # 19
    "tests/test_samplers_comfy.py",  # 15
    "tests/test_comfy_ui_format.py",  # 12
    "tests/test_controlnet.py",  # 12
    "plugins/graphsd-train/tests/test_training_diffusion.py",  # 11
    "tests/test_inpaint.py",  # 10
    "tests/test_batching.py",
    "tests/test_embeddings.py",
    "tests/test_sd_parity.py",  # 9
    "tests/test_lora_nodes.py",  # 8
    "tests/test_merge.py",
    "tests/test_lora.py",
    "tests/test_sd_nodes.py",  # 6
    "tests/test_vram.py",
    "tests/test_comfy_sampling.py",
    "tests/test_architecture.py",
    "tests/test_engine.py",
    "tests/test_text_encode.py",
    "tests/test_comfy_loaders.py",
    "tests/test_signals.py",
    "tests/test_model_family.py",  # 5
    "tests/test_conditioning_ops.py",
    "tests/test_inversion.py",
    "tests/test_comfy_simple_nodes.py",
    "tests/test_paths.py",
    "tests/test_sd_workflows.py",
    "tests/test_workflow_fuzz.py",  # 4
    "tests/test_vae_encode_tiled.py",
    "plugins/graphsd-train/tests/test_training_data.py",
    "tests/test_convert.py",
    "tests/test_lora_formats.py",
    "tests/test_model_files_hostile.py",
    "plugins/graphsd-train/tests/test_lora_training.py",  # 3
    "tests/test_hypernetwork.py",
    "plugins/graphsd-train/tests/test_save_model.py",  # 2
]


def _file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(config, items):
    """Longest first (see LONGEST_FIRST), each file's tests together and in their order."""
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_file_of(item.nodeid), len(rank)))


def pytest_xdist_make_scheduler(config, log):
    """With --dist loadfile: xdist's file scheduling, but the SHARED_SERVER files are one unit
    (their server is a session fixture, so one worker starts it once). xdist_group marks cannot
    do this here: --dist loadgroup's group suffix does not reach the node ids under pytest 9."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FilesSharingAServer(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = _file_of(nodeid)
            return "shared server" if path in SHARED_SERVER else path

    return FilesSharingAServer(config, log)


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory, forks):
    """{"server": one ``graphsd serve`` with the default options, shared by the files in
    SHARED_SERVER (one process, its model loaded once); a test that restarts it puts the new one
    here. Each of those tests tolerates what the ones before it ran (histories, images, cache)."""
    from test_server_harness import Served

    holder = {"server": Served(tmp_path_factory.mktemp("served"), forks=forks).start()}
    yield holder
    assert holder["server"].stop() == 0, holder["server"].log()


@pytest.fixture(scope="session")
def forks(tmp_path_factory):
    """The fork server (forkserver.py): graphsd's command in a process of its own, without the
    seconds of imports a fresh interpreter pays. One for the run, shared by the xdist workers."""
    from forkserver import ForkServer

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    base = tmp_path_factory.getbasetemp()
    return ForkServer(base.parent if worker else base, os.getppid() if worker else os.getpid())
