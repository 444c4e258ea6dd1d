"""graphsd batch without Ray: one job per row of a .jsonl/.csv params file, run in this process one
after the other, each row's outputs in its own folder exactly once; a second run skips the rows
that are done; a summary and batch-manifest.json say what was done, skipped and failed (with the
reason), and the exit code is 1 when a row failed.

The workflow is a small plugin node (written here into a plugins folder, loaded as users load
theirs) that writes one text file made of its inputs, so the tests check contents cheaply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graphsd.batch import MANIFEST, read_rows
from graphsd.cli import main
from graphsd.errors import GraphsdError
from graphsd.server.runner import STAGING

PLUGIN = '''
from pathlib import Path
from pydantic import Field
from graphsd import Node, NodeError, NodeIO, hookimpl
from graphsd.paths import write_atomic

class Note(Node):
    type = "Note"
    category = "test"
    output_node = True
    class Inputs(NodeIO):
        text: str = Field("")
        count: int = Field(1, ge=0, le=5)
        fail: bool = Field(False)
    class Outputs(NodeIO):
        paths: list[str] = Field(default_factory=list)
    def run(self, inputs, ctx):
        if inputs.fail:
            raise NodeError("asked to fail", field="fail")
        path = write_atomic(Path(ctx.output_dir) / "note.txt", lambda t: t.write_text(inputs.text * inputs.count))
        ctx.wrote_file(path)
        return self.Outputs(paths=[str(path)])

@hookimpl
def graphsd_register_nodes():
    return [Note]
'''

WORKFLOW = {
    "version": 1,
    "params": {"text": "x", "count": 1, "fail": False},
    "nodes": {"note": {"type": "Note", "inputs": {"text": "${text}", "count": "${count}", "fail": "${fail}"}}},
}


@pytest.fixture
def setup(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "note_plugin.py").write_text(PLUGIN)
    workflow = tmp_path / "notes.json"
    workflow.write_text(json.dumps(WORKFLOW))
    return tmp_path, ["--plugins-dir", str(plugins), "--output-dir", str(tmp_path / "out"), "--quiet"]


def batch(workflow: Path, rows: Path, args: list[str], *extra: str) -> int:
    return main(["batch", str(workflow), "--params", str(rows), *args, *extra])


def test_rows_are_read_from_jsonl_and_csv_and_bad_files_are_refused(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "a", "count": 2}\n\n{"name": "b", "fail": true}\n')
    assert read_rows(tmp_path / "a.jsonl") == [{"text": "a", "count": 2}, {"name": "b", "fail": True}]
    (tmp_path / "a.csv").write_text("text,count\nhello,3\n\"a, b\",1\n")
    assert read_rows(tmp_path / "a.csv") == [{"text": "hello", "count": "3"}, {"text": "a, b", "count": "1"}]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(GraphsdError, match="line 2: a row must be a JSON object"):
        read_rows(tmp_path / "bad.jsonl")
    (tmp_path / "rows.txt").write_text("x")
    with pytest.raises(GraphsdError, match=r"must be \.jsonl or \.csv"):
        read_rows(tmp_path / "rows.txt")


def test_a_batch_runs_each_row_once_into_its_folder_and_reports_failed_rows(setup, capsys):
    base, args = setup
    rows = base / "rows.csv"
    rows.write_text("name,text,count,fail\nfirst,ab,2,false\n,cd,1,false\nsame,cd,1,false\nbad,x,9,false\nboom,x,1,true\n")
    assert batch(base / "notes.json", rows, args) == 1
    out = base / "out"
    assert (out / "first" / "note.txt").read_text() == "abab"
    assert (out / "row-00002" / "note.txt").read_text() == "cd"  # no name: the row's place in the file
    assert (out / "same" / "note.txt").read_text() == "cd"  # the same job as row 2 (its output cached): a copy of the file
    assert sorted(p.name for p in out.iterdir()) == sorted(["first", "row-00002", "same", MANIFEST])
    err = capsys.readouterr().err
    assert "batch: 5 rows: 3 done, 0 skipped (done before), 2 failed" in err
    assert "failed bad (row 4)" in err and "count" in err  # refused before running: 9 is above the node's maximum
    assert "failed boom (row 5): note: input 'fail': asked to fail" in err
    manifest = json.loads((out / MANIFEST).read_text())
    assert [(r["name"], r["status"]) for r in manifest["rows"]] == [
        ("first", "done"),
        ("row-00002", "done"),
        ("same", "done"),
        ("bad", "failed"),
        ("boom", "failed"),
    ]
    assert manifest["rows"][0]["files"] == ["first/note.txt"]
    # a second run skips what is done and tries the failed rows again; nothing is written twice
    (out / "first" / "note.txt").write_text("kept")
    assert batch(base / "notes.json", rows, args) == 1
    assert "batch: 5 rows: 0 done, 3 skipped (done before), 2 failed" in capsys.readouterr().err
    assert (out / "first" / "note.txt").read_text() == "kept"
    assert [p.name for p in (out / "first").iterdir()] == ["note.txt"]
    assert not (out / STAGING).exists()


def test_a_row_whose_folder_is_gone_runs_again_and_set_gives_every_row_a_param(setup, capsys):
    base, args = setup
    rows = base / "rows.jsonl"
    rows.write_text('{"text": "a"}\n{"text": "b", "count": 3}\n')
    assert batch(base / "notes.json", rows, args, "--set", "count=2") == 0
    out = base / "out"
    assert [(out / f"row-0000{i}" / "note.txt").read_text() for i in (1, 2)] == ["aa", "bbb"]  # the row's own value wins
    (out / "row-00002" / "note.txt").unlink()
    (out / "row-00002").rmdir()
    assert batch(base / "notes.json", rows, args, "--set", "count=2") == 0
    assert "1 done, 1 skipped" in capsys.readouterr().err
    assert (out / "row-00002" / "note.txt").read_text() == "bbb"


def test_rows_with_one_name_or_an_unknown_param_are_refused_clearly(setup, capsys):
    base, args = setup
    rows = base / "rows.jsonl"
    rows.write_text('{"name": "a"}\n{"name": "a"}\n')
    assert batch(base / "notes.json", rows, args) == 2
    assert "rows 1 and 2 have the same name 'a'" in capsys.readouterr().err
    rows.write_text('{"txt": "a"}\n')
    assert batch(base / "notes.json", rows, args) == 1
    assert "no param named 'txt'" in capsys.readouterr().err
