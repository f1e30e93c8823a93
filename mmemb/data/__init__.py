"""Sample schema, WebDataset shards, streaming and collation."""

from mmemb.data.schema import SCHEMA_VERSION, Item, Sample

__all__ = ["SCHEMA_VERSION", "Item", "Sample"]
