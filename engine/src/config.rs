//! Model hyper-parameters from GGUF metadata or config.json.
