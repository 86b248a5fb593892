"""Latent and text-feature cache: encode a data list once, then train without the frozen encoders.

format.py   folder layout, header and compatibility check, file writes and reads, caption variants
build.py    build_feature_cache (multi-rank, resumable), wait_for_shards, merge_index
read.py     FeatureCache, CachedFeatureDataset, CachedBatches (the TrainBatch EncodedBatches gives)

The format and the exactness guarantees are described in format.py's docstring.
"""
