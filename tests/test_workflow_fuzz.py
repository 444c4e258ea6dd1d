"""Property test: random and mutated workflow documents never make the loader or validator
raise anything but the documented WorkflowError."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphsd import Engine, Settings, WorkflowError

FIXTURES = Path(__file__).parent / "fixtures"
ENGINE = Engine(Settings(device="cpu", load_entry_points=False, plugins_dirs=[str(FIXTURES / "plugins")]))

VALID = {
    "version": 1,
    "params": {"x": 1, "name": "pic"},
    "nodes": {
        "a": {"type": "Number", "inputs": {"value": "${x}"}},
        "b": {"type": "Add", "inputs": {"a": "@a.value", "b": 2}},
        "l": {"type": "MakeLatent", "inputs": {"size": 8, "mode": "ones"}},
        "i": {"type": "LatentToImage", "inputs": {"latent": "@l.latent"}},
        "s": {"type": "SaveImage", "inputs": {"image": "@i.image", "prefix": "${name}"}},
    },
}

names = st.sampled_from(["a", "b", "l", "i", "s", "x", "value", "latent", "image", "", "nodes", "inputs", "type", "0"])
link_like = st.builds(lambda n, o: f"@{n}.{o}", names, names) | st.sampled_from(["@", "@@x", "@a.", "@.value", "${x}", "${nope}", "$${x}", "a ${x} b"])
scalars = st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=True) | st.text(max_size=8) | link_like | names
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(names | st.text(max_size=4), kids, max_size=3), max_leaves=12)


@st.composite
def mutated(draw):
    doc = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 4))):
        path = [doc]
        target = doc
        # walk down a random path of dict keys, then replace, delete or add something there
        while isinstance(target, dict) and target and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(target, key=str)))
            path.append(key)
            if not isinstance(target[key], dict):
                break
            target = target[key]
        if not isinstance(target, dict):
            continue
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        key = draw(st.sampled_from(sorted(target, key=str))) if target and action != "add" else draw(names)
        if action == "delete":
            target.pop(key, None)
        else:
            target[key] = draw(json_values)
    return doc


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_documents_only_raise_workflow_error(doc):
    try:
        ENGINE.load(doc)
    except WorkflowError as err:
        assert err.issues and all(str(i) for i in err.issues)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_arbitrary_values_only_raise_workflow_error(value):
    with pytest.raises(WorkflowError):
        ENGINE.load(value if isinstance(value, dict) else {"nodes": value})


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200), st.sampled_from([".yaml", ".json"]))
def test_arbitrary_text_files_only_raise_workflow_error(tmp_path_factory, text, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"wf{suffix}"
    path.write_text(text, encoding="utf-8")
    try:
        ENGINE.load(path)
    except WorkflowError:
        pass


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(max_size=3), st.fixed_dictionaries({"class_type": st.sampled_from(["KSampler", "CheckpointLoaderSimple", "CLIPTextEncode", "Nope", "SaveImage"]), "inputs": json_values}), min_size=1, max_size=4))
def test_comfy_like_prompts_only_raise_workflow_error(prompt):
    try:
        ENGINE.load(prompt)
    except WorkflowError:
        pass
