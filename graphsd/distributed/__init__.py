"""Running graphsd jobs on many workers: model-aware routing (:mod:`.routing`, plain Python) and
Ray actors that each hold a warm Engine (:mod:`.ray_pool`, needs the ``ray`` extra:
``pip install "graphsd[ray]"``). ``graphsd serve --ray`` and ``graphsd batch --ray`` use them;
docs/scaling.md explains how to go from one machine to a Ray cluster."""

RAY_MISSING = 'this needs Ray, which is not installed: pip install "graphsd[ray]" (or pip install "ray>=2.40")'
