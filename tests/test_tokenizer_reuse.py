"""A checkpoint folder's tokenizer is read once per content: loading the same folder again (in
another model manager, as a new engine or a reloaded workflow does) reuses it, and a tokenizer
changed on disk is read again."""

from __future__ import annotations

import json

from sd_tiny import save_sd1

from graphsd.memory import ModelManager
from graphsd.std.models.loading import load_checkpoint


def tokenizer_of(folder):
    manager = ModelManager()
    load_checkpoint(manager, folder)
    (key,) = [k for k in manager.entries if k.split(":")[1] == "tokenizer"]
    return manager.get(key)


def test_a_folder_tokenizer_is_reused_until_its_files_change(tmp_path):
    folder = save_sd1(tmp_path / "sd1")
    first = tokenizer_of(folder)
    assert tokenizer_of(folder) is first  # read once
    config_file = folder / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["model_max_length"] = first.model_max_length // 2
    config_file.write_text(json.dumps(config))
    changed = tokenizer_of(folder)
    assert changed is not first and changed.model_max_length == first.model_max_length // 2
