"""Shard format, writer, reader, label store, protocols and loaders."""
