//! The DeepSeek-V3 graph.
