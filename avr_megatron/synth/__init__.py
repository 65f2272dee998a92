"""AvR data synthesis: input loading, frontier-batched stages, sharded resumable output, pairs."""
