//! The cluster's numerics between the engine's setting and the control plane's name for it
//! (`proto` does not depend on the engine): the coordinator sends its activation format in
//! every hello, and each worker takes it.

use engine::tensor::Activations as Engine;
use proto::control::Activations as Wire;

/// The engine's activation format as the control plane carries it.
pub fn to_wire(a: Engine) -> Wire {
    match a {
        Engine::F32 => Wire::F32,
        Engine::Int16 => Wire::Int16,
        Engine::Int8 => Wire::Int8,
    }
}

/// The control plane's activation format as the engine's setting.
pub fn from_wire(a: Wire) -> Engine {
    match a {
        Wire::F32 => Engine::F32,
        Wire::Int16 => Engine::Int16,
        Wire::Int8 => Engine::Int8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every format goes over the wire and back as itself, under the same name.
    #[test]
    fn every_format_round_trips() {
        for a in [Engine::F32, Engine::Int16, Engine::Int8] {
            assert_eq!(from_wire(to_wire(a)), a);
            assert_eq!(to_wire(a).as_str().parse::<Engine>(), Ok(a));
        }
    }
}
