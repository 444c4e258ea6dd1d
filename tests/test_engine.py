"""Engine core: validation errors, planning, caching, failures, interruption, events."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from graphsd import Engine, Settings, WorkflowError
from graphsd.events import CacheEvent

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def engine(tmp_path):
    return Engine(Settings(output_dir=str(tmp_path / "out"), plugins_dirs=[str(FIXTURES / "plugins")], device="cpu"))


def wf(nodes, params=None):
    return {"version": 1, "params": params or {}, "nodes": nodes}


def issues_of(engine, doc, params=None):
    with pytest.raises(WorkflowError) as info:
        engine.load(doc, params)
    return info.value.issues


CHAIN = wf(
    {
        "a": {"type": "Number", "inputs": {"value": "${x}"}},
        "b": {"type": "Number", "inputs": {"value": 10}},
        "sum": {"type": "Add", "inputs": {"a": "@a.value", "b": "@b.value"}},
        "double": {"type": "Add", "inputs": {"a": "@sum.value", "b": "@sum.value"}},
        "out": {"type": "Sink", "inputs": {"value": "@double.value"}},
        "other": {"type": "Number", "inputs": {"value": 3}},
        "out2": {"type": "Sink", "inputs": {"value": "@other.value"}},
    },
    params={"x": 1},
)


# ---- validation: every kind of error, all reported at once -------------------------------
def test_unknown_type_suggests_closest(engine):
    [issue] = issues_of(engine, wf({"n": {"type": "Numbr", "inputs": {}}}))
    assert issue.code == "unknown_type" and issue.node == "n" and "Number" in str(issue)


def test_all_errors_reported_at_once(engine):
    doc = wf(
        {
            "n": {"type": "Number", "inputs": {"value": 5000, "valu": 1}},  # out of range + unknown input
            "s": {"type": "Add", "inputs": {"b": 1}},  # missing required a
            "l": {"type": "MakeLatent", "inputs": {"mode": "twos"}},  # not in the allowed set
            "i": {"type": "LatentToImage", "inputs": {"latent": "@n.value"}},  # type mismatch int -> Latent
            "j": {"type": "LatentToImage", "inputs": {"latent": "@ghost.latent"}},  # missing node
            "k": {"type": "LatentToImage", "inputs": {"latent": "@l.lat"}},  # missing output
            "m": {"type": "LatentToImage", "inputs": {"latent": "zeros"}},  # literal for a link-only input
        }
    )
    issues = issues_of(engine, doc)
    by_code = {(i.code, i.node, i.field) for i in issues}
    assert ("bad_value", "n", "value") in by_code
    assert ("unknown_input", "n", "valu") in by_code
    assert ("missing_input", "s", "a") in by_code
    assert ("bad_value", "l", "mode") in by_code
    assert ("type_mismatch", "i", "latent") in by_code
    assert ("missing_node", "j", "latent") in by_code
    assert ("missing_output", "k", "latent") in by_code
    assert ("literal_for_link", "m", "latent") in by_code
    mismatch = next(i for i in issues if i.code == "type_mismatch")
    assert "int" in str(mismatch) and "Latent" in str(mismatch)
    unknown_input = next(i for i in issues if i.code == "unknown_input")
    assert "value" in str(unknown_input)  # suggests the closest input name


def test_cycle_lists_its_nodes(engine):
    doc = wf(
        {
            "a": {"type": "Add", "inputs": {"a": "@c.value"}},
            "b": {"type": "Add", "inputs": {"a": "@a.value"}},
            "c": {"type": "Add", "inputs": {"a": "@b.value"}},
        }
    )
    [issue] = issues_of(engine, doc)
    assert issue.code == "cycle"
    assert all(n in str(issue) for n in ("a", "b", "c"))


def test_malformed_yaml_gives_line_and_column(engine, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\nnodes:\n  a: {type: Number, inputs: {value: 1}\n")
    [issue] = issues_of(engine, path)
    assert issue.code == "syntax" and "line" in str(issue) and "column" in str(issue)


def test_malformed_json_gives_line_and_column(engine, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"version": 1,\n "nodes": {,}}')
    [issue] = issues_of(engine, path)
    assert "line 2" in str(issue)


def test_undefined_param_and_unknown_override(engine):
    doc = wf({"a": {"type": "Number", "inputs": {"value": "${nope}"}}}, params={"x": 1})
    codes = {i.code for i in issues_of(engine, doc, params={"y": 2})}
    assert codes == {"unknown_param"}
    assert len(issues_of(engine, doc, params={"y": 2})) == 2


def test_links_and_literal_strings_cannot_be_confused(engine):
    g = engine.load(wf({"a": {"type": "Number", "inputs": {"value": 1}}, "s": {"type": "Add", "inputs": {"a": "@a.value"}}}))
    assert "a" in g.nodes["s"].links
    bad = issues_of(engine, wf({"a": {"type": "Number", "inputs": {"value": "@not a link"}}}))
    assert bad[0].code == "bad_link"


def test_params_typed_substitution(engine):
    res = engine.run(CHAIN, params={"x": 4})
    assert res.outputs["out"]["value"] == 28


# ---- planning and caching ---------------------------------------------------------------
def test_unchanged_rerun_executes_nothing(engine):
    first = engine.run(CHAIN)
    assert set(first.executed) == {"a", "b", "sum", "double", "out", "other", "out2"}
    second = engine.run(CHAIN)
    assert second.executed == []
    assert set(second.cached) == {"out", "out2"}  # cached sinks: their ancestors are not even visited
    assert second.outputs["out"] == first.outputs["out"]
    assert any(isinstance(e, CacheEvent) and e.action == "hit" for e in second.events)


def test_changed_literal_reruns_exactly_its_descendants(engine):
    engine.run(CHAIN)
    res = engine.run(CHAIN, params={"x": 2})
    assert set(res.executed) == {"a", "sum", "double", "out"}
    assert set(res.cached) == {"b", "out2"}
    assert res.outputs["out"]["value"] == 24


def test_cache_keeps_earlier_runs(engine):
    engine.run(CHAIN, params={"x": 1})
    engine.run(CHAIN, params={"x": 2})
    res = engine.run(CHAIN, params={"x": 1})
    assert res.executed == []


def test_never_cached_node_always_runs(engine):
    doc = wf({"c": {"type": "Counter", "inputs": {"a": 1}}, "out": {"type": "Sink", "inputs": {"value": "@c.value"}}})
    engine.run(doc)
    res = engine.run(doc)
    assert res.executed == ["c", "out"]  # its output may differ each run, so dependents re-run too


def test_only_requested_outputs_ancestors_run(engine):
    res = engine.run(CHAIN, outputs=["out2"])
    assert set(res.executed) == {"other", "out2"}


@pytest.mark.slow
def test_cache_keys_identical_across_processes(engine, tmp_path):
    res = engine.run(CHAIN)
    code = (
        "import sys, json; from graphsd import Engine, Settings;"
        f"e = Engine(Settings(plugins_dirs=[{str(FIXTURES / 'plugins')!r}], device='cpu'));"
        f"r = e.run(json.loads(sys.argv[1])); print(sorted(r.keys))"
    )
    import json

    out = subprocess.run([sys.executable, "-c", code, json.dumps(CHAIN)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(sorted(res.keys))


def test_lru_budget_evicts_oldest(tmp_path):
    # budget 300 B: the 256 B latent fits alone, the 192 B image pushes it out
    eng = Engine(Settings(output_dir=str(tmp_path), plugins_dirs=[str(FIXTURES / "plugins")], device="cpu", cache_budget_mb=300 / 2**20))
    doc = wf({"l": {"type": "MakeLatent", "inputs": {"size": 4}}, "i": {"type": "LatentToImage", "inputs": {"latent": "@l.latent"}}})
    res = eng.run(doc, outputs=["i"])
    evicted = [e.key for e in res.events if isinstance(e, CacheEvent) and e.action == "evict"]
    assert evicted == [next(e.key for e in res.events if e.kind == "node_start" and e.node_id == "l")]
    again = eng.run(doc, outputs=["i"])  # the image is still cached, so its evicted ancestor need not run
    assert again.executed == [] and again.cached == ["i"]


# ---- failures and interruption ----------------------------------------------------------
def test_failing_branch_does_not_stop_independent_one(engine):
    doc = wf(
        {
            "f": {"type": "Fail", "inputs": {}},
            "after": {"type": "Sink", "inputs": {"value": "@f.value"}},
            "ok": {"type": "Number", "inputs": {"value": 7}},
            "ok_out": {"type": "Sink", "inputs": {"value": "@ok.value"}},
            "crash": {"type": "Crash", "inputs": {}},
            "crash_out": {"type": "Sink", "inputs": {"value": "@crash.value"}},
        }
    )
    res = engine.run(doc)
    assert res.status == "failed"
    assert res.outputs["ok_out"]["value"] == 7
    failed = {f.node_id: f for f in res.errors}
    assert set(failed) == {"f", "crash"}
    assert failed["f"].skipped == ("after",) and "always fails" in failed["f"].message and "'a'" in failed["f"].message
    assert failed["crash"].error_type == "ZeroDivisionError" and "ZeroDivisionError" in failed["crash"].traceback


def test_interrupt_between_steps(engine):
    doc = wf({"s": {"type": "Steps", "inputs": {"n": 10, "interrupt_at": 3}}, "out": {"type": "Sink", "inputs": {"value": "@s.value"}}})
    res = engine.run(doc)
    assert res.status == "interrupted"
    progress = [e.value for e in res.events if e.kind == "progress"]
    assert progress == [1, 2, 3, 4]  # stopped at the first check after the flag was set
    assert "out" not in res.executed
    assert engine.run(wf({"n": {"type": "Number", "inputs": {"value": 1}}}), outputs=["n"]).status == "success"  # next run is fine


def test_event_sequence(engine):
    seen = []
    engine.run(wf({"n": {"type": "Number", "inputs": {"value": 1}}, "o": {"type": "Sink", "inputs": {"value": "@n.value"}}}), on_event=seen.append)
    kinds = [e.kind for e in seen if e.kind != "cache"]
    assert kinds == ["run_start", "node_start", "node_done", "node_start", "node_done", "run_done"]
    assert all("run_id" in e.to_dict() for e in seen)


def test_engine_overrides_leave_the_callers_settings_alone(tmp_path):
    settings = Settings(device="cpu", output_dir=str(tmp_path / "a"))
    engine = Engine(settings, output_dir=str(tmp_path / "b"))
    assert engine.settings.output_dir == str(tmp_path / "b") and settings.output_dir == str(tmp_path / "a")
    with pytest.raises(TypeError, match="nope"):
        Engine(settings, nope=1)
