"""Tokenizers, raw documents, packing, prepared shards, the global order, the per-rank loader."""
