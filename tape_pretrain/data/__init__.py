"""Data: sources, the SentencePiece tokenizer, token shards with a manifest, and the training loader."""
