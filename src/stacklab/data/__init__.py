"""The data side of the stack: sources, filters, dedup, synthetic tasks, mixture, tokenizer,
shards and the training-data loader."""
