"""graphsd-train: training as a graphsd plugin.

Nodes that train a text-to-image model from nothing (``ShapesDataset``, ``ImageFolderDataset``,
``TrainVAE``, ``TrainUNet``, ``SaveModel``, ``EvaluateShapes``: :mod:`graphsd_train.nodes.training`)
and style patches on a frozen model (``TrainLoRA``, ``TrainHypernetwork``, ``NightShapesDataset``:
:mod:`graphsd_train.nodes.patch_training`). The methods are one module per step (``shapes``,
``data``, ``tokenizer``, ``vae``, ``diffusion``, ``lora``, ``export``, ``evaluate``); ``tiny`` and
``styles`` are the recipes of the model and the style patches graphsd ships.

graphsd finds this package through its ``graphsd`` entry point once it is installed
(``pip install ./plugins/graphsd-train``). It builds on graphsd's SD stack (:mod:`graphsd.std`:
LoRA and hypernetwork formats, text encoding); graphsd itself never imports it.
"""

from __future__ import annotations

from graphsd import Node, hookimpl


@hookimpl
def graphsd_register_nodes() -> list[type[Node]]:
    # imported here, not at module level: `import graphsd_train.evaluate` (a benchmark, a test)
    # should not pay for the training stack
    from graphsd_train.nodes import patch_training, training

    return [*training.NODES, *patch_training.NODES]
