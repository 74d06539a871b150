"""Retrieval over documents an encoder never saw: passages (overlapping token windows), a lexical index
(BM25 through the `bm25s` library), fusion of lexical and dense scores, a saved index folder that the
torch-free runtimes (ONNX, llama.cpp, CoreML) read, document-grouped evaluation and the two-stage recipe.

Layering: passages, lexical, fusion and metrics are numpy (+ bm25s) only, so train/ may import them as it
imports embedding.py; index, search and evaluate reach a runtime only through its `embed_batch` and `codec`
(embedding.py stays the one embedding path); recipe drives train/ and sits above it.
"""
