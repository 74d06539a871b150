"""SentencePiece piece types (the same numbers are GGUF token types), shared by the tokenizer and the writers
of its other formats (tokenizer.json)."""

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
