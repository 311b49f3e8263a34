//! The cluster's wire formats, in two halves.
//!
//! - The data plane, [`wire`]: the frames that carry one MoE layer's hidden vectors and routing to
//!   a worker over QUIC and its partial sums back. It is sans-I/O: encoding and decoding of byte
//!   buffers with hard limits, no sockets.
//! - The control plane: the gRPC service `Control` (`proto/cluster.proto`). [`control`] holds the
//!   project's own domain types and the validating conversions from and to the generated protobuf
//!   types; [`grpc`] re-exports the generated tonic client and server for the daemons.
//!
//! [`runtime`] is the data plane's own one-thread runtime; [`stream`] reads and writes frames on
//! QUIC streams.
//!
//! [`trust`] is the cluster's trust layer under both: the cluster CA, join tokens, identities,
//! rustls configurations for gRPC and QUIC, and the TLS glue tonic needs.

pub mod control;
pub mod grpc;
pub mod runtime;
pub mod stream;
pub mod trust;
pub mod wire;
