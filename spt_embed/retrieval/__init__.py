"""Corpora, FAISS indexes and sharded, resumable indexing."""
