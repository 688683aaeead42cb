"""Data: image-text pairs for training and memories, feature caches, evaluation sets.

One module per stage, bottom-up, each importing only those above it in this list:

- ``ids``: pair ids (declared or derived from keys) and when two id schemes can be compared
- ``records``: ``PairRecord`` and the ``PairSource`` interface every reader implements
- ``shards``: webdataset tar shards as a source
- ``sources``: CSV/TSV and image-folder sources, ``open_source`` / ``read_pairs``
- ``ranks``: which rank and DataLoader worker gets which item (the DDP split)
- ``stream``: ``PairStream``, a source assigned to ranks/workers, shuffled, decoded, batched
- ``collate``: ``PairCollator``, decoded samples -> backbone inputs
- ``features``: the feature-cache format, ``open_feature_cache``, ``CachedPairs``
- ``datamodule``: ``ImageTextDataModule``, the Lightning wiring of all of the above
- ``zeroshot``: evaluation sets (classification folders, webdatasets, retrieval CSVs)

Nothing is imported here, so importing one stage does not load the DataModule (and Lightning).
"""
