//! Hugging Face model directories: config.json plus safetensors (single file or sharded index).
