"""The shard format: tar members written and read, the sample encoding, the index."""
