"""SaveModel's writer: a trained model is saved as a diffusers folder under a new name, never
over a folder it did not write, and replaces exactly the model folder named when asked to."""

from __future__ import annotations

from pathlib import Path

import pytest
import sd_tiny
from graphsd_train.export import save_pipeline

from graphsd.errors import NodeError


def save_tiny(folder: Path, **kwargs) -> Path:
    from diffusers import EulerDiscreteScheduler

    return save_pipeline(folder, sd_tiny.unet(), sd_tiny.vae(), sd_tiny.text_encoder(), sd_tiny.tokenizer(),
                         dict(EulerDiscreteScheduler().config), **kwargs)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_saving_a_model_never_replaces_a_folder_it_did_not_write(tmp_path):
    images = tmp_path / "portraits"
    images.mkdir()
    (images / "me.png").write_bytes(b"a photo")
    before = tree(tmp_path)
    written = save_tiny(images)
    assert written == tmp_path / "portraits_2" and (written / "model_index.json").is_file()
    with pytest.raises(NodeError, match="not a folder of the kind"):
        save_tiny(images, overwrite=True)  # asked to overwrite, but it is not a model
    assert {k: v for k, v in tree(tmp_path).items() if k.startswith("portraits/")} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary may remain"


@pytest.mark.slow
def test_overwrite_replaces_exactly_the_model_folder_named(tmp_path):
    first = save_tiny(tmp_path / "model")
    (first / "marker.txt").write_text("from the first save")
    again = save_tiny(tmp_path / "model")
    assert again == tmp_path / "model_2" and (first / "marker.txt").exists()
    replaced = save_tiny(tmp_path / "model", overwrite=True)
    assert replaced == first and not (first / "marker.txt").exists() and (first / "model_index.json").is_file()
    assert (tmp_path / "model_2" / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model_2"]
