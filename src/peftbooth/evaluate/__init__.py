"""Did it work? The DreamBooth evaluation protocol (``peftbooth eval``). The offline proxies computed at the end
of training are training/proxies.py's.

* :mod:`.protocol`: the paper's prompts and its metrics (DINO, CLIP-I, CLIP-T) as pure functions of embeddings;
* :mod:`.evaluators`: the CLIP and DINO models that make those embeddings;
* :mod:`.runner`: ``peftbooth eval RUN_DIR``, the protocol run on a run folder and on its base model;
* :mod:`.command`: the ``eval`` subcommand (a run on the world model goes to :mod:`peftbooth.world.metrics`).
"""
