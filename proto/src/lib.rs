//! The cluster's wire formats. `wire` is the data plane: the frames that carry one MoE layer's
//! hidden vectors and routing to a worker over QUIC and its partial sums back. It is sans-I/O:
//! encoding and decoding of byte buffers with hard limits, no sockets.

pub mod wire;
