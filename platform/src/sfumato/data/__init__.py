"""Data stages: ingest (manifest + rejects), shards (WebDataset per resolution), loader."""
