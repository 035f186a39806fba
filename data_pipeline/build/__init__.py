"""`build-shards`: image folders and manifests to WebDataset tar shards."""
