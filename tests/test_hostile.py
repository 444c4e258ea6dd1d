"""The hostile-input battery (``hostile_cases.py``): every case ends with its documented exit
code and a message that names what was wrong, never a traceback; nothing is written outside
the output directory, nothing that was there is changed or deleted, no temporary file stays,
no pickled code runs, memory stays bounded and no case hangs.

The cases run in one process of their own (forked past graphsd's imports: forkserver.py) under
a data-size limit (``ulimit -d``) of DATA_LIMIT, so
an input that makes graphsd allocate gigabytes fails there (and the memory estimates see the
same limit on every machine), and each case's peak RSS must stay within RSS_GROWTH of what the
process had when the case started (the peak count is restarted for every case, /proc/self/clear_refs),
and what the process holds at a case's start within RETAINED of what it had after importing graphsd.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import hostile_cases
import pytest

pytestmark = pytest.mark.slow  # the fast lane (pytest -m "not slow") skips this module

DATA_LIMIT = 4 * 1024**3
RSS_GROWTH_MB = 1024
RETAINED_MB = 2 * RSS_GROWTH_MB
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def results(tmp_path_factory, forks):
    base = tmp_path_factory.mktemp("hostile")
    out = base / "results.json"
    (base / "cases").mkdir()
    proc = forks.run(
        [sys.executable, str(HERE / "hostile_cases.py"), str(out), str(base / "cases")],
        rlimit_data=DATA_LIMIT, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.exists(), proc.stderr[-3000:]
    data = json.loads(out.read_text())
    data["runner"] = proc
    return data


def test_the_battery_is_broad():
    categories = {c.category for c in hostile_cases.CASES}
    assert len(hostile_cases.CASES) >= 40 and categories == {"paths", "files", "resources"}


@pytest.mark.parametrize("case", hostile_cases.CASES, ids=lambda c: c.name)
def test_hostile_input(results, case):
    assert results["runner"].returncode == 0, results["runner"].stderr[-3000:]
    record = next(r for r in results["cases"] if r["name"] == case.name)
    said = record["stderr"] + record["stdout"]
    assert record["exit"] == case.exit, said
    for text in case.says:
        assert text in said, said
    for text in case.never_says:
        assert text not in said, said
    assert not record["pwned"], "a pickled payload ran"
    assert record["temporaries"] == [], "temporary files were left behind"
    swept = [name for name in record["removed"] if Path(name).name.startswith(".graphsd-") and name.endswith(".tmp")]
    assert len(swept) == case.sweeps, record["removed"]
    assert record["changed"] == [] and record["removed"] == swept, f"changed {record['changed']}, removed {record['removed']}"
    assert all(name.startswith("out" + os.sep) for name in record["added"]), f"written outside out/: {record['added']}"
    if case.writes is not None:
        assert len(record["added"]) == case.writes, record["added"]
    # the case's own peak above where it started: an input that makes graphsd allocate gigabytes
    grown = record["maxrss_mb"] - record.get("start_mb", results["baseline_mb"])
    assert grown < RSS_GROWTH_MB, f"peak RSS {record['maxrss_mb']:.0f} MB"
    # what the earlier cases left in the process (heap kept by the allocator, whose arenas grow
    # with the thread count, caches): bounded too, so a case that leaks a model each run shows
    assert record.get("start_mb", 0) - results["baseline_mb"] < RETAINED_MB, f"RSS {record['start_mb']:.0f} MB before the case"
