"""Training data: records from Parquet/JSONL, chat tokenisation with assistant-only loss masks,
packing into fixed-length bins, a resumable data-parallel sampler and packed microbatches."""
