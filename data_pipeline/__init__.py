"""Image corpora to WebDataset shards, and shards from object storage to training batches."""

from typing import Any


def __getattr__(name: str) -> Any:
    # The loader pulls in torch; the shard builder should not pay for that on import
    if name == "make_loader":
        from data_pipeline.load.loader import make_loader

        return make_loader
    raise AttributeError(name)
