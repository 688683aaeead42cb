"""Jobs: whole-source passes through ``Trainer.predict`` that write a directory, resumable and atomic.

- ``chunked``: the shared machinery (cut a source into chunks, predict each on every rank, merge the
  ranks' shares, resume after a kill, assemble the chunks into row-aligned arrays)
- ``memory_build``: encode a source into a memory (``reco memory build``)
- ``feature_cache``: encode a source and search a model's memory for every pair (``reco cache``)

Apart from ``memory/`` and ``data/`` because these are the only places where the training framework, the
data pipeline and the on-disk formats meet: the store stays free of Lightning, the data free of the model.
Layer: above ``data`` and ``memory``, below ``model``.
"""
