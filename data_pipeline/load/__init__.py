"""Shards to training batches: shard lists, epoch order, streaming reads, decoding and augmentation."""
