"""Tokenizers for GGUF models, giving llama.cpp's token ids for the same vocabulary.

tokenizer.py  Tokenizer (encode / decode / stream) and reading the `tokenizer.ggml.*` keys
pretok.py     the pre-tokenizers of byte-level BPE vocabularies, by `tokenizer.ggml.pre`
unicode.py    llama.cpp's Unicode category tables the pre-tokenizers match with
merge.py      the two merge loops (BPE by rank, SentencePiece by score)
vocab.py      token attributes, end-of-generation ids and the special-token split
"""

from .tokenizer import IncrementalDecoder, Tokenizer, gguf_tokenizer_metadata

__all__ = ["IncrementalDecoder", "Tokenizer", "gguf_tokenizer_metadata"]
