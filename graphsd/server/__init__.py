"""``graphsd serve``: a ComfyUI-compatible HTTP and websocket server with a persistent queue.

ComfyUI API clients and the ComfyUI web frontend (the ``comfyui-frontend-package`` wheel, served
at ``/``) drive one long-lived Engine; prompts wait in a SQLite queue in the data folder, survive
a crash of the server and end in its history exactly once. See docs/server.md.

This package needs aiohttp (``pip install "graphsd[server]"``); nothing imports it unless the
server runs, so ``import graphsd`` stays light. The SD knowledge (which ComfyUI classes exist and
what they become) comes from plugins, through the ``graphsd_comfy_*`` hooks.
"""
