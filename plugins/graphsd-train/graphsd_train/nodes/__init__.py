"""The plugin's node modules; :func:`graphsd_train.graphsd_register_nodes` registers their ``NODES``."""
