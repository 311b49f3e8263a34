//! The generated gRPC code for the `Control` service (`proto/cluster.proto`), for the daemons:
//! the coordinator implements [`Control`] and serves it with [`control_server`]; workers and the
//! CLI call it through [`ControlClient`] (or the typed wrapper [`crate::control::Client`]).
//!
//! The message types live in [`pb`]; convert them to and from [`crate::control`]'s domain types
//! at once (`TryFrom` validates), so nothing beyond the service implementation touches them.

/// The generated protobuf messages and tonic stubs.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("dsv3.cluster.v1");
}

pub use pb::control_client::ControlClient;
pub use pb::control_server::{Control, ControlServer};

/// Largest encoded control-plane message either side accepts or sends (an assignment of every
/// stacked expert tensor of a large model fits with room to spare).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// The service wrapped with the project's message-size limits.
pub fn control_server<T: Control>(service: T) -> ControlServer<T> {
    ControlServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// A client on `channel` with the project's message-size limits.
pub fn control_client(
    channel: tonic::transport::Channel,
) -> ControlClient<tonic::transport::Channel> {
    ControlClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}
