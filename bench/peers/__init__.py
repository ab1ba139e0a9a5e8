"""The serving bench's peers: KServe's Python server and Triton's dynamic batcher (PyTriton).

``setup.py`` makes their virtualenvs, ``kserve/server.py`` and ``pytriton/server.py`` run in
them, ``compare.py`` (``python bench/serving.py --peers``) runs Nightshift against them.
"""
