//! GGUF v3 reader: metadata, tensor infos, memory-mapped data, split files.
