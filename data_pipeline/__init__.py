"""Image corpora to WebDataset shards, and shards from object storage to training batches."""
