"""Data: corpus readers, the built-in corpus, the SentencePiece tokenizer, the chat template, token shards."""
