//! Byte-level BPE tokenizer from a tokenizer.json or from a GGUF's own vocabulary.
