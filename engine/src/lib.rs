//! The numerical engine: everything needed to compute DeepSeek-V3/R1 on one machine.
//!
//! Model files (GGUF, Hugging Face safetensors incl. FP8), quantized block formats, the CPU
//! backend, the model graph with its latent KV cache, the tokenizer, the chat template and
//! sampling. This crate knows nothing about networks, clusters, HTTP or async runtimes: both
//! daemons link it, and the cluster cuts the model at [`model::moe`]'s expert entry point.

pub mod bench;
pub mod bytes;
pub mod chat;
pub mod config;
pub mod cpu;
pub mod generate;
pub mod gguf;
pub mod gpu;
pub mod hf;
pub mod model;
pub mod npy;
pub mod quant;
pub mod sampling;
pub mod source;
pub mod synth;
pub mod tensor;
pub mod threads;
pub mod tokenizer;

pub use bytes::Bytes;
