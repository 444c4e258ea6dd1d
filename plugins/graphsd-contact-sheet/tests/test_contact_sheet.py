"""The ContactSheet plugin, loaded the way users load it: as a plugin of a graphsd Engine."""

from pathlib import Path

import torch

from graphsd import Engine, Settings
from graphsd.types import Image

PLUGIN_ROOT = Path(__file__).resolve().parents[1]


def engine():
    # load through a plugins directory so the test works whether or not the package is installed
    return Engine(Settings(device="cpu", load_entry_points=False, plugins_dirs=[str(PLUGIN_ROOT)]))


def run_sheet(images, **inputs):
    cls = engine().nodes["ContactSheet"]
    return cls().run(cls.Inputs(images=Image(images), **inputs), ctx=None).image.pixels


def test_registered_through_the_plugin_hook():
    e = engine()
    assert "ContactSheet" in e.nodes and e.registry.node_plugin["ContactSheet"] == "graphsd_contact_sheet"


def test_layout_places_each_image_and_fills_gaps():
    imgs = torch.stack([torch.full((2, 3, 3), v) for v in (0.1, 0.2, 0.3)])  # 3 images 2x3
    sheet = run_sheet(imgs, gap=1, background=0.0)[0]
    # auto columns = ceil(sqrt(3)) = 2 -> 2 rows: height 2*(2+1)+1 = 7, width 2*(3+1)+1 = 9
    assert sheet.shape == (7, 9, 3)
    assert torch.all(sheet[1:3, 1:4] == 0.1) and torch.all(sheet[1:3, 5:8] == 0.2) and torch.all(sheet[4:6, 1:4] == 0.3)
    assert torch.all(sheet[4:6, 5:8] == 0.0) and torch.all(sheet[0] == 0.0)  # empty cell and gap


def test_columns_and_second_batch():
    a, b = torch.zeros(2, 4, 4, 3), torch.ones(1, 4, 4, 3)
    sheet = run_sheet(a, more=Image(b), columns=3, gap=0)[0]
    assert sheet.shape == (4, 12, 3) and torch.all(sheet[:, 8:] == 1.0) and torch.all(sheet[:, :8] == 0.0)


def test_size_mismatch_is_a_clear_error():
    import pytest

    from graphsd import NodeError

    with pytest.raises(NodeError, match="resize one batch"):
        run_sheet(torch.zeros(1, 4, 4, 3), more=Image(torch.zeros(1, 5, 4, 3)))
