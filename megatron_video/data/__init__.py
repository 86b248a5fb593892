"""Video/image data pipeline: annotations -> frame and size plans -> bucketed, one-shape batches.

annotations.py  data.txt + .json/.jsonl entries, validated; bad entries reported and skipped
frames.py       which source frames a video sample gets (fps resampling, crop, VAE/CP snapping)
resolution.py   target sizes (force resolution, Min-Max tokens, five ratios) and their transforms
video_io.py     PyAV decoding of chosen frames, Pillow images, the one H.264 writer
dataset.py      VideoTextDataset (replaces unreadable files within the bucket), build_dataloader
sampler.py      MegabatchBucketSampler: one shape per micro-batch, split by data-parallel rank
collate.py      stacking plus the latent-resolution video mask
config.py       the data-side config sections (descriptions and validation only) and SampleGeometry
text.py         captions: choice, cleanup, aesthetic notice, CFG dropout, tokenisation
i2v_masks.py    image-to-video masks, masked video, latent-grid mask, condition noise
batches.py      TrainBatch, BatchSource, keyed generators, EncodedBatches (encoders in the step)
feature_cache   latent / text-feature cache: format, build, read
index           the memory-mapped columnar sample index (tools/build_index.py) and the vectorised
                frame / resolution rules every dataset plans with; see docs/data_index.md
"""
