//! The control plane's domain types and their conversions to and from protobuf.
//!
//! Only this module (and [`crate::grpc`]) knows the generated types. Converting *to* protobuf is
//! infallible (`From`); converting *from* protobuf (`TryFrom`) checks every bound below, every
//! enum value and every cross-field rule, and fails with a [`ConvertError`] naming the field.
//! A service implementation converts a request first and answers `InvalidArgument` on error
//! (see [`ConvertError::into_status`]).

use std::collections::HashSet;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::grpc::pb;

/// Longest worker name (it becomes a certificate's common name).
pub const MAX_NAME_LEN: usize = 64;
/// Longest free-text field (backend, adapter name, version, address, model name, fingerprint).
pub const MAX_TEXT_LEN: usize = 256;
/// Most devices a worker reports.
pub const MAX_DEVICES: usize = 16;
/// Largest CSR a worker may send.
pub const MAX_CSR_LEN: usize = 8 << 10;
/// Largest PEM text (certificate chains) in a join reply.
pub const MAX_PEM_LEN: usize = 64 << 10;
/// Most MoE layers in one assignment.
pub const MAX_LAYERS: usize = 256;
/// Expert ids are below this (the data-plane frames carry them as u16).
pub const MAX_EXPERT_ID: u32 = 1 << 16;
/// Most experts of one layer in one assignment.
pub const MAX_EXPERTS_PER_LAYER: usize = 4096;
/// Most expert pieces described in one assignment (DeepSeek-V3 in FP8 has 58 x 256 x 6 in
/// all; the message-size limit bounds the bytes).
pub const MAX_PIECES: usize = 1 << 18;
/// Longest tensor name.
pub const MAX_TENSOR_NAME_LEN: usize = 256;
/// Most dimensions of a piece.
pub const MAX_DIMS: usize = 8;
/// Longest element type name (the table itself lives in `engine`).
pub const MAX_DTYPE_LEN: usize = 16;
/// Largest chunk of weights in one `Chunk` message.
pub const MAX_CHUNK: usize = 1 << 20;
/// The most bytes one `FetchWeights` call may ask for (the coordinator refuses more).
pub const MAX_FETCH: u64 = 256 << 20;
/// Most workers in a status reply.
pub const MAX_WORKERS: usize = 4096;
/// Heartbeat interval bounds.
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(10);
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(60);
/// Length of the join secret.
pub const SECRET_LEN: usize = 32;

/// A protobuf message that breaks a bound or a rule.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConvertError {
    #[error("{field}: {len} exceeds the limit of {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("{field}: {value} is not a valid value")]
    BadEnum { field: &'static str, value: i32 },
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("chunk at offset {offset}: data does not match its SHA-256")]
    HashMismatch { offset: u64 },
}

impl ConvertError {
    fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        ConvertError::Invalid {
            field,
            reason: reason.into(),
        }
    }

    /// The gRPC status a server answers for a request that failed to convert.
    pub fn into_status(self) -> tonic::Status {
        tonic::Status::invalid_argument(self.to_string())
    }
}

impl From<ConvertError> for tonic::Status {
    fn from(e: ConvertError) -> Self {
        e.into_status()
    }
}

fn text(field: &'static str, s: String, max: usize) -> Result<String, ConvertError> {
    if s.len() > max {
        return Err(ConvertError::TooLong {
            field,
            len: s.len(),
            max,
        });
    }
    if s.chars().any(char::is_control) {
        return Err(ConvertError::invalid(field, "contains control characters"));
    }
    Ok(s)
}

/// PEM text: printable ASCII and line breaks.
fn pem(field: &'static str, s: String) -> Result<String, ConvertError> {
    if s.is_empty() {
        return Err(ConvertError::Empty { field });
    }
    if s.len() > MAX_PEM_LEN {
        return Err(ConvertError::TooLong {
            field,
            len: s.len(),
            max: MAX_PEM_LEN,
        });
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_graphic() || matches!(b, b' ' | b'\n' | b'\r'))
    {
        return Err(ConvertError::invalid(field, "is not PEM text"));
    }
    Ok(s)
}

fn nonempty(field: &'static str, s: String, max: usize) -> Result<String, ConvertError> {
    if s.is_empty() {
        return Err(ConvertError::Empty { field });
    }
    text(field, s, max)
}

fn count<T>(field: &'static str, v: &[T], max: usize) -> Result<(), ConvertError> {
    if v.len() > max {
        return Err(ConvertError::TooLong {
            field,
            len: v.len(),
            max,
        });
    }
    Ok(())
}

/// Checks a worker name: 1 to [`MAX_NAME_LEN`] ASCII letters, digits, `.`, `_` or `-`.
pub fn check_worker_name(name: &str) -> Result<(), ConvertError> {
    if name.is_empty() {
        return Err(ConvertError::Empty { field: "name" });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(ConvertError::TooLong {
            field: "name",
            len: name.len(),
            max: MAX_NAME_LEN,
        });
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(ConvertError::invalid(
            "name",
            format!("{name:?} may only contain ASCII letters, digits, '.', '_' and '-'"),
        ));
    }
    Ok(())
}

fn worker_name(name: String) -> Result<String, ConvertError> {
    check_worker_name(&name)?;
    Ok(name)
}

// ---------------------------------------------------------------------------------------------
// Numerics

/// The activation format of quantized products, cluster-wide (the engine's
/// `tensor::Activations`; this crate does not depend on the engine).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Activations {
    /// Exact: weights dequantised inside the dot product.
    #[default]
    F32,
    /// 16-bit integers per block for the K-quants.
    Int16,
    /// int8 per block (llama.cpp's scheme).
    Int8,
}

impl Activations {
    pub fn as_str(self) -> &'static str {
        match self {
            Activations::F32 => "f32",
            Activations::Int16 => "int16",
            Activations::Int8 => "int8",
        }
    }

    fn from_pb(field: &'static str, value: i32) -> Result<Self, ConvertError> {
        match pb::Activations::try_from(value) {
            Ok(pb::Activations::F32) => Ok(Activations::F32),
            Ok(pb::Activations::Int16) => Ok(Activations::Int16),
            Ok(pb::Activations::Int8) => Ok(Activations::Int8),
            Err(_) => Err(ConvertError::BadEnum { field, value }),
        }
    }

    fn to_pb(self) -> i32 {
        match self {
            Activations::F32 => pb::Activations::F32,
            Activations::Int16 => pb::Activations::Int16,
            Activations::Int8 => pb::Activations::Int8,
        }
        .into()
    }
}

// Worker state

/// Where a worker is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WorkerState {
    /// Connected, has no (current) assignment yet.
    Joining,
    /// Loading its assigned experts.
    Loading,
    /// Serving every assigned expert.
    Ready,
    /// Finishing in-flight work, takes no new work.
    Draining,
    /// Stopped answering (set by the coordinator, never sent by a worker).
    Offline,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Joining => "joining",
            WorkerState::Loading => "loading",
            WorkerState::Ready => "ready",
            WorkerState::Draining => "draining",
            WorkerState::Offline => "offline",
        }
    }

    fn from_pb(field: &'static str, value: i32) -> Result<Self, ConvertError> {
        match pb::WorkerState::try_from(value) {
            Ok(pb::WorkerState::Joining) => Ok(WorkerState::Joining),
            Ok(pb::WorkerState::Loading) => Ok(WorkerState::Loading),
            Ok(pb::WorkerState::Ready) => Ok(WorkerState::Ready),
            Ok(pb::WorkerState::Draining) => Ok(WorkerState::Draining),
            Ok(pb::WorkerState::Offline) => Ok(WorkerState::Offline),
            Ok(pb::WorkerState::Unspecified) | Err(_) => {
                Err(ConvertError::BadEnum { field, value })
            }
        }
    }
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<WorkerState> for pb::WorkerState {
    fn from(s: WorkerState) -> Self {
        match s {
            WorkerState::Joining => pb::WorkerState::Joining,
            WorkerState::Loading => pb::WorkerState::Loading,
            WorkerState::Ready => pb::WorkerState::Ready,
            WorkerState::Draining => pb::WorkerState::Draining,
            WorkerState::Offline => pb::WorkerState::Offline,
        }
    }
}

impl TryFrom<pb::WorkerState> for WorkerState {
    type Error = ConvertError;
    fn try_from(s: pb::WorkerState) -> Result<Self, ConvertError> {
        WorkerState::from_pb("state", s as i32)
    }
}

// ---------------------------------------------------------------------------------------------
// Join

/// A worker asks to join: the token's secret, its name and a CSR for its own key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinRequest {
    pub token_secret: [u8; SECRET_LEN],
    pub name: String,
    pub csr_der: Vec<u8>,
}

impl From<JoinRequest> for pb::JoinRequest {
    fn from(r: JoinRequest) -> Self {
        pb::JoinRequest {
            token_secret: r.token_secret.to_vec(),
            name: r.name,
            csr_der: r.csr_der,
        }
    }
}

impl TryFrom<pb::JoinRequest> for JoinRequest {
    type Error = ConvertError;
    fn try_from(r: pb::JoinRequest) -> Result<Self, ConvertError> {
        let token_secret: [u8; SECRET_LEN] =
            r.token_secret.as_slice().try_into().map_err(|_| {
                ConvertError::invalid(
                    "token_secret",
                    format!("{} bytes, expected {SECRET_LEN}", r.token_secret.len()),
                )
            })?;
        count("csr_der", &r.csr_der, MAX_CSR_LEN)?;
        if r.csr_der.is_empty() {
            return Err(ConvertError::Empty { field: "csr_der" });
        }
        Ok(JoinRequest {
            token_secret,
            name: worker_name(r.name)?,
            csr_der: r.csr_der,
        })
    }
}

/// The worker's signed certificate and the cluster CA's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinReply {
    pub worker_cert_pem: String,
    pub ca_cert_pem: String,
}

impl From<JoinReply> for pb::JoinReply {
    fn from(r: JoinReply) -> Self {
        pb::JoinReply {
            worker_cert_pem: r.worker_cert_pem,
            ca_cert_pem: r.ca_cert_pem,
        }
    }
}

impl TryFrom<pb::JoinReply> for JoinReply {
    type Error = ConvertError;
    fn try_from(r: pb::JoinReply) -> Result<Self, ConvertError> {
        Ok(JoinReply {
            worker_cert_pem: pem("worker_cert_pem", r.worker_cert_pem)?,
            ca_cert_pem: pem("ca_cert_pem", r.ca_cert_pem)?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Hello

/// One compute device of a worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// "vulkan", "metal", "dx12", "gl" or "cpu".
    pub backend: String,
    /// The adapter's name.
    pub name: String,
    /// Memory usable for experts.
    pub memory_bytes: u64,
}

impl From<DeviceInfo> for pb::DeviceInfo {
    fn from(d: DeviceInfo) -> Self {
        pb::DeviceInfo {
            backend: d.backend,
            name: d.name,
            memory_bytes: d.memory_bytes,
        }
    }
}

impl TryFrom<pb::DeviceInfo> for DeviceInfo {
    type Error = ConvertError;
    fn try_from(d: pb::DeviceInfo) -> Result<Self, ConvertError> {
        Ok(DeviceInfo {
            backend: nonempty("devices.backend", d.backend, MAX_TEXT_LEN)?,
            name: text("devices.name", d.name, MAX_TEXT_LEN)?,
            memory_bytes: d.memory_bytes,
        })
    }
}

/// A joined worker introduces itself.
#[derive(Clone, Debug, PartialEq)]
pub struct Hello {
    pub name: String,
    pub devices: Vec<DeviceInfo>,
    /// Total memory usable for experts.
    pub memory_bytes: u64,
    /// Measured expert throughput, GB/s of weights read.
    pub speed: f64,
    /// The fingerprint of the worker's own copy of the model; `None` when it has none.
    pub model_fingerprint: Option<String>,
    /// Its data-plane endpoint is up.
    pub quic_ready: bool,
    /// The worker's build version.
    pub version: String,
}

impl From<Hello> for pb::HelloRequest {
    fn from(h: Hello) -> Self {
        pb::HelloRequest {
            name: h.name,
            devices: h.devices.into_iter().map(Into::into).collect(),
            memory_bytes: h.memory_bytes,
            speed: h.speed,
            has_model: h.model_fingerprint.is_some(),
            model_fingerprint: h.model_fingerprint.unwrap_or_default(),
            quic_ready: h.quic_ready,
            version: h.version,
        }
    }
}

impl TryFrom<pb::HelloRequest> for Hello {
    type Error = ConvertError;
    fn try_from(h: pb::HelloRequest) -> Result<Self, ConvertError> {
        count("devices", &h.devices, MAX_DEVICES)?;
        if !h.speed.is_finite() || h.speed < 0.0 {
            return Err(ConvertError::invalid(
                "speed",
                format!("{} is not a finite non-negative throughput", h.speed),
            ));
        }
        let fingerprint = text("model_fingerprint", h.model_fingerprint, MAX_TEXT_LEN)?;
        let model_fingerprint = match (h.has_model, fingerprint.is_empty()) {
            (true, false) => Some(fingerprint),
            (false, true) => None,
            (true, true) => {
                return Err(ConvertError::Empty {
                    field: "model_fingerprint",
                })
            }
            (false, false) => {
                return Err(ConvertError::invalid(
                    "model_fingerprint",
                    "set although has_model is false",
                ))
            }
        };
        Ok(Hello {
            name: worker_name(h.name)?,
            devices: h
                .devices
                .into_iter()
                .map(DeviceInfo::try_from)
                .collect::<Result<_, _>>()?,
            memory_bytes: h.memory_bytes,
            speed: h.speed,
            model_fingerprint,
            quic_ready: h.quic_ready,
            version: text("version", h.version, MAX_TEXT_LEN)?,
        })
    }
}

/// The coordinator's answer to [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloReply {
    pub worker_id: u64,
    pub coordinator_version: String,
    /// The coordinator's QUIC port, on the host the worker dialled.
    pub data_port: u16,
    /// The activation format of quantized products, cluster-wide.
    pub activations: Activations,
}

impl From<HelloReply> for pb::HelloReply {
    fn from(r: HelloReply) -> Self {
        pb::HelloReply {
            worker_id: r.worker_id,
            coordinator_version: r.coordinator_version,
            data_port: r.data_port.into(),
            activations: r.activations.to_pb(),
        }
    }
}

impl TryFrom<pb::HelloReply> for HelloReply {
    type Error = ConvertError;
    fn try_from(r: pb::HelloReply) -> Result<Self, ConvertError> {
        let data_port = u16::try_from(r.data_port)
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| {
                ConvertError::invalid("data_port", format!("{} is not a port", r.data_port))
            })?;
        Ok(HelloReply {
            worker_id: r.worker_id,
            coordinator_version: text("coordinator_version", r.coordinator_version, MAX_TEXT_LEN)?,
            data_port,
            activations: Activations::from_pb("activations", r.activations)?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Assignment

/// The experts of one MoE layer that a worker holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerExperts {
    pub layer: u32,
    /// Distinct expert ids, each below `n_experts`.
    pub experts: Vec<u32>,
    /// Routed experts of the layer, at most [`MAX_EXPERT_ID`].
    pub n_experts: u32,
}

impl From<LayerExperts> for pb::LayerExperts {
    fn from(l: LayerExperts) -> Self {
        pb::LayerExperts {
            layer: l.layer,
            experts: l.experts,
            n_experts: l.n_experts,
        }
    }
}

impl TryFrom<pb::LayerExperts> for LayerExperts {
    type Error = ConvertError;
    fn try_from(l: pb::LayerExperts) -> Result<Self, ConvertError> {
        count("experts.experts", &l.experts, MAX_EXPERTS_PER_LAYER)?;
        if l.n_experts == 0 || l.n_experts > MAX_EXPERT_ID {
            return Err(ConvertError::invalid(
                "experts.n_experts",
                format!(
                    "layer {}: {} experts is not within 1..={MAX_EXPERT_ID}",
                    l.layer, l.n_experts
                ),
            ));
        }
        let mut seen = HashSet::with_capacity(l.experts.len());
        for &e in &l.experts {
            if e >= l.n_experts {
                return Err(ConvertError::invalid(
                    "experts.experts",
                    format!(
                        "layer {}: expert id {e} is not below its {} experts",
                        l.layer, l.n_experts
                    ),
                ));
            }
            if !seen.insert(e) {
                return Err(ConvertError::invalid(
                    "experts.experts",
                    format!("layer {}: expert {e} listed twice", l.layer),
                ));
            }
        }
        Ok(LayerExperts {
            layer: l.layer,
            experts: l.experts,
            n_experts: l.n_experts,
        })
    }
}

/// What a piece of an expert is: one of its three matrices, or the FP8 block scales of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PieceKind {
    Gate,
    Up,
    Down,
    GateScales,
    UpScales,
    DownScales,
}

impl PieceKind {
    pub const ALL: [PieceKind; 6] = [
        PieceKind::Gate,
        PieceKind::Up,
        PieceKind::Down,
        PieceKind::GateScales,
        PieceKind::UpScales,
        PieceKind::DownScales,
    ];

    /// A short name (also the suffix of a worker's cache file).
    pub fn as_str(self) -> &'static str {
        match self {
            PieceKind::Gate => "gate",
            PieceKind::Up => "up",
            PieceKind::Down => "down",
            PieceKind::GateScales => "gate_scales",
            PieceKind::UpScales => "up_scales",
            PieceKind::DownScales => "down_scales",
        }
    }

    /// 0, 1, 2 for gate, up, down (weights or scales).
    pub fn matrix(self) -> usize {
        self as usize % 3
    }

    pub fn is_scales(self) -> bool {
        self as usize >= 3
    }

    /// The kind for matrix `0..3` (gate, up, down), its weights or its scales.
    pub fn of(matrix: usize, scales: bool) -> Option<PieceKind> {
        (matrix < 3).then(|| PieceKind::ALL[matrix + if scales { 3 } else { 0 }])
    }

    fn from_pb(value: i32) -> Result<Self, ConvertError> {
        let bad = || ConvertError::BadEnum {
            field: "pieces.kind",
            value,
        };
        Ok(match pb::PieceKind::try_from(value).map_err(|_| bad())? {
            pb::PieceKind::Unspecified => return Err(bad()),
            pb::PieceKind::Gate => PieceKind::Gate,
            pb::PieceKind::Up => PieceKind::Up,
            pb::PieceKind::Down => PieceKind::Down,
            pb::PieceKind::GateScales => PieceKind::GateScales,
            pb::PieceKind::UpScales => PieceKind::UpScales,
            pb::PieceKind::DownScales => PieceKind::DownScales,
        })
    }
}

impl From<PieceKind> for pb::PieceKind {
    fn from(k: PieceKind) -> Self {
        match k {
            PieceKind::Gate => pb::PieceKind::Gate,
            PieceKind::Up => pb::PieceKind::Up,
            PieceKind::Down => pb::PieceKind::Down,
            PieceKind::GateScales => pb::PieceKind::GateScales,
            PieceKind::UpScales => pb::PieceKind::UpScales,
            PieceKind::DownScales => pb::PieceKind::DownScales,
        }
    }
}

impl std::fmt::Display for PieceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One piece of one routed expert's weights: bytes `offset..offset + length` of tensor
/// `tensor` (a slice of a stacked GGUF tensor, or a whole per-expert Hugging Face tensor or
/// its FP8 scales), holding `shape` elements of `dtype`. Whether the length matches the type
/// and shape is for the engine to say (the type table lives there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertPiece {
    pub layer: u32,
    pub expert: u32,
    pub kind: PieceKind,
    pub tensor: String,
    /// Within the tensor's data.
    pub offset: u64,
    /// Not zero; `offset + length` does not overflow.
    pub length: u64,
    /// The element type by the engine's name (`"BF16"`, `"Q4_K"`, `"F8_E4M3"`, ...).
    pub dtype: String,
    /// Outermost first, 1 to [`MAX_DIMS`] dimensions.
    pub shape: Vec<u64>,
}

impl ExpertPiece {
    /// The byte range within the tensor's data.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + self.length
    }
}

impl From<ExpertPiece> for pb::ExpertPiece {
    fn from(p: ExpertPiece) -> Self {
        pb::ExpertPiece {
            layer: p.layer,
            expert: p.expert,
            kind: pb::PieceKind::from(p.kind) as i32,
            tensor: p.tensor,
            offset: p.offset,
            length: p.length,
            dtype: p.dtype,
            shape: p.shape,
        }
    }
}

impl TryFrom<pb::ExpertPiece> for ExpertPiece {
    type Error = ConvertError;
    fn try_from(p: pb::ExpertPiece) -> Result<Self, ConvertError> {
        let kind = PieceKind::from_pb(p.kind)?;
        let tensor = nonempty("pieces.tensor", p.tensor, MAX_TENSOR_NAME_LEN)?;
        if p.expert >= MAX_EXPERT_ID {
            return Err(ConvertError::invalid(
                "pieces.expert",
                format!(
                    "{tensor}: expert id {} is not below {MAX_EXPERT_ID}",
                    p.expert
                ),
            ));
        }
        if p.length == 0 {
            return Err(ConvertError::Empty {
                field: "pieces.length",
            });
        }
        if p.offset.checked_add(p.length).is_none() {
            return Err(ConvertError::invalid(
                "pieces.length",
                format!(
                    "{tensor}: offset {} + length {} overflows",
                    p.offset, p.length
                ),
            ));
        }
        let dtype = nonempty("pieces.dtype", p.dtype, MAX_DTYPE_LEN)?;
        if !dtype
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(ConvertError::invalid(
                "pieces.dtype",
                format!("{tensor}: {dtype:?} is not a type name"),
            ));
        }
        if p.shape.is_empty() {
            return Err(ConvertError::Empty {
                field: "pieces.shape",
            });
        }
        count("pieces.shape", &p.shape, MAX_DIMS)?;
        Ok(ExpertPiece {
            layer: p.layer,
            expert: p.expert,
            kind,
            tensor,
            offset: p.offset,
            length: p.length,
            dtype,
            shape: p.shape,
        })
    }
}

/// What a worker must hold: pushed by the coordinator whenever the plan changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// Increases with every new plan; a worker acts on the highest it has seen.
    pub generation: u64,
    pub model_fingerprint: String,
    /// One entry per layer, layers distinct.
    pub experts: Vec<LayerExperts>,
    /// Where the assigned experts' bytes are, for a worker that streams them (empty when the
    /// coordinator does not stream). Each piece belongs to an assigned expert, each
    /// (layer, expert, kind) at most once.
    pub pieces: Vec<ExpertPiece>,
}

impl From<Assignment> for pb::Assignment {
    fn from(a: Assignment) -> Self {
        pb::Assignment {
            generation: a.generation,
            model_fingerprint: a.model_fingerprint,
            experts: a.experts.into_iter().map(Into::into).collect(),
            pieces: a.pieces.into_iter().map(Into::into).collect(),
        }
    }
}

impl TryFrom<pb::Assignment> for Assignment {
    type Error = ConvertError;
    fn try_from(a: pb::Assignment) -> Result<Self, ConvertError> {
        count("experts", &a.experts, MAX_LAYERS)?;
        count("pieces", &a.pieces, MAX_PIECES)?;
        let experts: Vec<LayerExperts> = a
            .experts
            .into_iter()
            .map(LayerExperts::try_from)
            .collect::<Result<_, _>>()?;
        let mut layers = HashSet::with_capacity(experts.len());
        if let Some(l) = experts.iter().find(|l| !layers.insert(l.layer)) {
            return Err(ConvertError::invalid(
                "experts.layer",
                format!("layer {} listed twice", l.layer),
            ));
        }
        let assigned: HashSet<(u32, u32)> = experts
            .iter()
            .flat_map(|l| l.experts.iter().map(|&e| (l.layer, e)))
            .collect();
        let pieces: Vec<ExpertPiece> = a
            .pieces
            .into_iter()
            .map(ExpertPiece::try_from)
            .collect::<Result<_, _>>()?;
        let mut seen = HashSet::with_capacity(pieces.len());
        for p in &pieces {
            if !assigned.contains(&(p.layer, p.expert)) {
                return Err(ConvertError::invalid(
                    "pieces.expert",
                    format!(
                        "{}: expert {} of layer {} is not assigned",
                        p.tensor, p.expert, p.layer
                    ),
                ));
            }
            if !seen.insert((p.layer, p.expert, p.kind)) {
                return Err(ConvertError::invalid(
                    "pieces.kind",
                    format!(
                        "expert {} of layer {}: {} listed twice",
                        p.expert, p.layer, p.kind
                    ),
                ));
            }
        }
        Ok(Assignment {
            generation: a.generation,
            model_fingerprint: nonempty("model_fingerprint", a.model_fingerprint, MAX_TEXT_LEN)?,
            experts,
            pieces,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Heartbeat

/// A worker's periodic report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub worker_id: u64,
    pub state: WorkerState,
    pub load_done_bytes: u64,
    pub load_total_bytes: u64,
    pub experts_loaded: u64,
    pub served_requests: u64,
    /// The assignment generation the worker is working on (0: none yet).
    pub generation: u64,
}

impl From<Heartbeat> for pb::HeartbeatRequest {
    fn from(h: Heartbeat) -> Self {
        pb::HeartbeatRequest {
            worker_id: h.worker_id,
            state: pb::WorkerState::from(h.state) as i32,
            load_done_bytes: h.load_done_bytes,
            load_total_bytes: h.load_total_bytes,
            experts_loaded: h.experts_loaded,
            served_requests: h.served_requests,
            generation: h.generation,
        }
    }
}

impl TryFrom<pb::HeartbeatRequest> for Heartbeat {
    type Error = ConvertError;
    fn try_from(h: pb::HeartbeatRequest) -> Result<Self, ConvertError> {
        let state = WorkerState::from_pb("state", h.state)?;
        if state == WorkerState::Offline {
            return Err(ConvertError::invalid(
                "state",
                "a worker cannot report itself offline",
            ));
        }
        if h.load_done_bytes > h.load_total_bytes {
            return Err(ConvertError::invalid(
                "load_done_bytes",
                format!(
                    "{} exceeds load_total_bytes {}",
                    h.load_done_bytes, h.load_total_bytes
                ),
            ));
        }
        Ok(Heartbeat {
            worker_id: h.worker_id,
            state,
            load_done_bytes: h.load_done_bytes,
            load_total_bytes: h.load_total_bytes,
            experts_loaded: h.experts_loaded,
            served_requests: h.served_requests,
            generation: h.generation,
        })
    }
}

/// The coordinator's answer to a heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeartbeatReply {
    /// When to send the next one, within [`MIN_HEARTBEAT`]..=[`MAX_HEARTBEAT`].
    pub interval: Duration,
    /// Finish in-flight work and leave.
    pub drain: bool,
}

impl From<HeartbeatReply> for pb::HeartbeatReply {
    fn from(r: HeartbeatReply) -> Self {
        pb::HeartbeatReply {
            interval_ms: u32::try_from(r.interval.as_millis()).unwrap_or(u32::MAX),
            drain: r.drain,
        }
    }
}

impl TryFrom<pb::HeartbeatReply> for HeartbeatReply {
    type Error = ConvertError;
    fn try_from(r: pb::HeartbeatReply) -> Result<Self, ConvertError> {
        let interval = Duration::from_millis(r.interval_ms.into());
        if !(MIN_HEARTBEAT..=MAX_HEARTBEAT).contains(&interval) {
            return Err(ConvertError::invalid(
                "interval_ms",
                format!(
                    "{} ms is outside {MIN_HEARTBEAT:?}..={MAX_HEARTBEAT:?}",
                    r.interval_ms
                ),
            ));
        }
        Ok(HeartbeatReply {
            interval,
            drain: r.drain,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Weights

/// A byte range of one tensor's data, asked of the coordinator by a worker without the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchRequest {
    pub model_fingerprint: String,
    pub tensor: String,
    /// Within the tensor's data.
    pub offset: u64,
    pub length: u64,
}

impl From<FetchRequest> for pb::FetchRequest {
    fn from(r: FetchRequest) -> Self {
        pb::FetchRequest {
            model_fingerprint: r.model_fingerprint,
            tensor: r.tensor,
            offset: r.offset,
            length: r.length,
        }
    }
}

impl TryFrom<pb::FetchRequest> for FetchRequest {
    type Error = ConvertError;
    fn try_from(r: pb::FetchRequest) -> Result<Self, ConvertError> {
        if r.length == 0 {
            return Err(ConvertError::Empty { field: "length" });
        }
        if r.offset.checked_add(r.length).is_none() {
            return Err(ConvertError::invalid(
                "length",
                format!("offset {} + length {} overflows", r.offset, r.length),
            ));
        }
        Ok(FetchRequest {
            model_fingerprint: nonempty("model_fingerprint", r.model_fingerprint, MAX_TEXT_LEN)?,
            tensor: nonempty("tensor", r.tensor, MAX_TENSOR_NAME_LEN)?,
            offset: r.offset,
            length: r.length,
        })
    }
}

/// A piece of a tensor's data. Converting to protobuf adds the SHA-256 of `data`; converting
/// from protobuf checks it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Within the tensor's data.
    pub offset: u64,
    /// At most [`MAX_CHUNK`] bytes.
    pub data: Vec<u8>,
}

impl From<Chunk> for pb::Chunk {
    fn from(c: Chunk) -> Self {
        let sha256 = Sha256::digest(&c.data).to_vec();
        pb::Chunk {
            offset: c.offset,
            data: c.data,
            sha256,
        }
    }
}

impl TryFrom<pb::Chunk> for Chunk {
    type Error = ConvertError;
    fn try_from(c: pb::Chunk) -> Result<Self, ConvertError> {
        count("data", &c.data, MAX_CHUNK)?;
        if c.data.is_empty() {
            return Err(ConvertError::Empty { field: "data" });
        }
        if c.sha256.len() != 32 {
            return Err(ConvertError::invalid(
                "sha256",
                format!("{} bytes, expected 32", c.sha256.len()),
            ));
        }
        if Sha256::digest(&c.data).as_slice() != c.sha256.as_slice() {
            return Err(ConvertError::HashMismatch { offset: c.offset });
        }
        Ok(Chunk {
            offset: c.offset,
            data: c.data,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Status

/// One worker as the coordinator sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerStatus {
    pub id: u64,
    pub name: String,
    pub address: String,
    pub backend: String,
    pub gpu: String,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    /// Routed experts assigned to it, spare copies included.
    pub experts_held: u64,
    /// Of them, spare copies of experts other workers own.
    pub spares_held: u64,
    pub layers: Vec<u32>,
    pub state: WorkerState,
    /// 0..=100.
    pub load_percent: f32,
    pub rtt_p50_us: u64,
    pub rtt_p99_us: u64,
    pub requests_served: u64,
}

impl From<WorkerStatus> for pb::WorkerStatus {
    fn from(w: WorkerStatus) -> Self {
        pb::WorkerStatus {
            id: w.id,
            name: w.name,
            address: w.address,
            backend: w.backend,
            gpu: w.gpu,
            memory_used_bytes: w.memory_used_bytes,
            memory_total_bytes: w.memory_total_bytes,
            experts_held: w.experts_held,
            spares_held: w.spares_held,
            layers: w.layers,
            state: pb::WorkerState::from(w.state) as i32,
            load_percent: w.load_percent,
            rtt_p50_us: w.rtt_p50_us,
            rtt_p99_us: w.rtt_p99_us,
            requests_served: w.requests_served,
        }
    }
}

impl TryFrom<pb::WorkerStatus> for WorkerStatus {
    type Error = ConvertError;
    fn try_from(w: pb::WorkerStatus) -> Result<Self, ConvertError> {
        count("workers.layers", &w.layers, MAX_LAYERS)?;
        if !(0.0..=100.0).contains(&w.load_percent) {
            return Err(ConvertError::invalid(
                "workers.load_percent",
                format!("{} is outside 0..=100", w.load_percent),
            ));
        }
        Ok(WorkerStatus {
            id: w.id,
            name: worker_name(w.name)?,
            address: text("workers.address", w.address, MAX_TEXT_LEN)?,
            backend: text("workers.backend", w.backend, MAX_TEXT_LEN)?,
            gpu: text("workers.gpu", w.gpu, MAX_TEXT_LEN)?,
            memory_used_bytes: w.memory_used_bytes,
            memory_total_bytes: w.memory_total_bytes,
            experts_held: w.experts_held,
            spares_held: w.spares_held.min(w.experts_held),
            layers: w.layers,
            state: WorkerState::from_pb("workers.state", w.state)?,
            load_percent: w.load_percent,
            rtt_p50_us: w.rtt_p50_us,
            rtt_p99_us: w.rtt_p99_us,
            requests_served: w.requests_served,
        })
    }
}

/// The whole cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterStatus {
    pub model: String,
    /// Every expert has a holder in the plan.
    pub all_placed: bool,
    /// Every expert is loaded by its holder.
    pub all_loaded: bool,
    pub workers: Vec<WorkerStatus>,
    pub tokens_per_second: f64,
    /// Where the coordinator runs the always-active part ("cpu (8 threads, AVX2)", "vulkan NVIDIA
    /// GeForce RTX 4090"; empty when unknown).
    pub coordinator_device: String,
    /// The cluster's numerics: the activation format of quantized products.
    pub activations: Activations,
    /// Copies of every routed expert the plan asks for (1: no spares).
    pub copies: u32,
    /// Routed experts of the model.
    pub experts: u64,
    /// Of them, those served by two or more live workers: they survive the loss of one.
    pub experts_with_spare: u64,
}

impl From<ClusterStatus> for pb::ClusterStatus {
    fn from(s: ClusterStatus) -> Self {
        pb::ClusterStatus {
            model: s.model,
            all_placed: s.all_placed,
            all_loaded: s.all_loaded,
            workers: s.workers.into_iter().map(Into::into).collect(),
            tokens_per_second: s.tokens_per_second,
            coordinator_device: s.coordinator_device,
            activations: s.activations.to_pb(),
            copies: s.copies,
            experts: s.experts,
            experts_with_spare: s.experts_with_spare,
        }
    }
}

impl TryFrom<pb::ClusterStatus> for ClusterStatus {
    type Error = ConvertError;
    fn try_from(s: pb::ClusterStatus) -> Result<Self, ConvertError> {
        count("workers", &s.workers, MAX_WORKERS)?;
        if !s.tokens_per_second.is_finite() || s.tokens_per_second < 0.0 {
            return Err(ConvertError::invalid(
                "tokens_per_second",
                format!("{} is not a finite non-negative rate", s.tokens_per_second),
            ));
        }
        Ok(ClusterStatus {
            model: text("model", s.model, MAX_TEXT_LEN)?,
            all_placed: s.all_placed,
            all_loaded: s.all_loaded,
            workers: s
                .workers
                .into_iter()
                .map(WorkerStatus::try_from)
                .collect::<Result<_, _>>()?,
            tokens_per_second: s.tokens_per_second,
            coordinator_device: text("coordinator_device", s.coordinator_device, MAX_TEXT_LEN)?,
            activations: Activations::from_pb("activations", s.activations)?,
            copies: s.copies.max(1),
            experts: s.experts,
            experts_with_spare: s.experts_with_spare.min(s.experts),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Requests that carry only an id

impl From<u64> for pb::AssignmentsRequest {
    fn from(worker_id: u64) -> Self {
        pb::AssignmentsRequest { worker_id }
    }
}

impl From<u64> for pb::DrainRequest {
    fn from(worker_id: u64) -> Self {
        pb::DrainRequest { worker_id }
    }
}

// ---------------------------------------------------------------------------------------------
// A client in domain types

/// A failed call: the server's status, or a reply that broke a bound.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("{}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
    #[error("invalid reply from the coordinator: {0}")]
    Invalid(#[from] ConvertError),
}

impl From<tonic::Status> for RpcError {
    fn from(s: tonic::Status) -> Self {
        RpcError::Status(s)
    }
}

impl RpcError {
    /// The gRPC code (`Internal` for an invalid reply).
    pub fn code(&self) -> tonic::Code {
        match self {
            RpcError::Status(s) => s.code(),
            RpcError::Invalid(_) => tonic::Code::Internal,
        }
    }
}

/// The `Control` service for workers and the CLI, in domain types: requests are converted on
/// the way out, replies validated on the way in. Cheap to clone (one HTTP/2 connection).
#[derive(Clone, Debug)]
pub struct Client {
    inner: crate::grpc::ControlClient<tonic::transport::Channel>,
}

impl Client {
    /// A client on a channel from [`crate::trust::connect`].
    pub fn new(channel: tonic::transport::Channel) -> Self {
        Client {
            inner: crate::grpc::control_client(channel),
        }
    }

    pub async fn join(&mut self, request: JoinRequest) -> Result<JoinReply, RpcError> {
        let reply = self.inner.join(pb::JoinRequest::from(request)).await?;
        Ok(JoinReply::try_from(reply.into_inner())?)
    }

    pub async fn hello(&mut self, hello: Hello) -> Result<HelloReply, RpcError> {
        let reply = self.inner.hello(pb::HelloRequest::from(hello)).await?;
        Ok(HelloReply::try_from(reply.into_inner())?)
    }

    /// The stream of this worker's assignments; it ends when the coordinator goes away.
    pub async fn assignments(
        &mut self,
        worker_id: u64,
    ) -> Result<
        impl tokio_stream::Stream<Item = Result<Assignment, RpcError>> + Send + Unpin,
        RpcError,
    > {
        use tokio_stream::StreamExt as _;
        let stream = self
            .inner
            .assignments(pb::AssignmentsRequest::from(worker_id))
            .await?
            .into_inner();
        Ok(stream.map(|item| Ok(Assignment::try_from(item?)?)))
    }

    pub async fn heartbeat(&mut self, heartbeat: Heartbeat) -> Result<HeartbeatReply, RpcError> {
        let reply = self
            .inner
            .heartbeat(pb::HeartbeatRequest::from(heartbeat))
            .await?;
        Ok(HeartbeatReply::try_from(reply.into_inner())?)
    }

    /// The chunks of the requested range, each checked against its SHA-256.
    pub async fn fetch_weights(
        &mut self,
        request: FetchRequest,
    ) -> Result<impl tokio_stream::Stream<Item = Result<Chunk, RpcError>> + Send + Unpin, RpcError>
    {
        use tokio_stream::StreamExt as _;
        let stream = self
            .inner
            .fetch_weights(pb::FetchRequest::from(request))
            .await?
            .into_inner();
        Ok(stream.map(|item| Ok(Chunk::try_from(item?)?)))
    }

    pub async fn status(&mut self) -> Result<ClusterStatus, RpcError> {
        let reply = self.inner.status(pb::StatusRequest {}).await?;
        Ok(ClusterStatus::try_from(reply.into_inner())?)
    }

    /// Whether the coordinator accepted the drain.
    pub async fn drain(&mut self, worker_id: u64) -> Result<bool, RpcError> {
        let reply = self.inner.drain(pb::DrainRequest::from(worker_id)).await?;
        Ok(reply.into_inner().accepted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            name: "box-1".into(),
            devices: vec![DeviceInfo {
                backend: "vulkan".into(),
                name: "RTX 4090".into(),
                memory_bytes: 24 << 30,
            }],
            memory_bytes: 20 << 30,
            speed: 800.0,
            model_fingerprint: Some("abc".into()),
            quic_ready: true,
            version: "0.1.0".into(),
        }
    }

    fn assignment() -> Assignment {
        Assignment {
            generation: 3,
            model_fingerprint: "abc".into(),
            experts: vec![
                LayerExperts {
                    layer: 3,
                    experts: vec![0, 5, 255],
                    n_experts: 256,
                },
                LayerExperts {
                    layer: 4,
                    experts: vec![1],
                    n_experts: 256,
                },
            ],
            pieces: vec![
                ExpertPiece {
                    layer: 3,
                    expert: 5,
                    kind: PieceKind::Up,
                    tensor: "blk.3.ffn_up_exps.weight".into(),
                    offset: 5 * 1000,
                    length: 1000,
                    dtype: "Q4_K".into(),
                    shape: vec![2048, 7168],
                },
                ExpertPiece {
                    layer: 4,
                    expert: 1,
                    kind: PieceKind::DownScales,
                    tensor: "model.layers.4.mlp.experts.1.down_proj.weight_scale_inv".into(),
                    offset: 0,
                    length: 56 * 16 * 4,
                    dtype: "F32".into(),
                    shape: vec![56, 16],
                },
            ],
        }
    }

    #[test]
    fn round_trips() {
        let h = hello();
        assert_eq!(
            Hello::try_from(pb::HelloRequest::from(h.clone())).unwrap(),
            h
        );
        let a = assignment();
        assert_eq!(
            Assignment::try_from(pb::Assignment::from(a.clone())).unwrap(),
            a
        );
        assert_eq!(a.pieces[0].range(), 5000..6000);
        for k in PieceKind::ALL {
            assert_eq!(PieceKind::of(k.matrix(), k.is_scales()), Some(k));
        }
        let hb = Heartbeat {
            worker_id: 7,
            state: WorkerState::Loading,
            load_done_bytes: 5,
            load_total_bytes: 10,
            experts_loaded: 1,
            served_requests: 0,
            generation: 3,
        };
        assert_eq!(
            Heartbeat::try_from(pb::HeartbeatRequest::from(hb)).unwrap(),
            hb
        );
        let c = Chunk {
            offset: 1 << 20,
            data: vec![7; 100],
        };
        assert_eq!(Chunk::try_from(pb::Chunk::from(c.clone())).unwrap(), c);
        let s = ClusterStatus {
            model: "r1".into(),
            all_placed: true,
            all_loaded: false,
            workers: vec![WorkerStatus {
                id: 1,
                name: "box-1".into(),
                address: "10.0.0.2:7000".into(),
                backend: "cpu".into(),
                gpu: String::new(),
                memory_used_bytes: 1,
                memory_total_bytes: 2,
                experts_held: 3,
                spares_held: 1,
                layers: vec![3, 4],
                state: WorkerState::Offline,
                load_percent: 50.0,
                rtt_p50_us: 40,
                rtt_p99_us: 90,
                requests_served: 9,
            }],
            tokens_per_second: 4.5,
            coordinator_device: "cpu (8 threads)".into(),
            activations: Activations::Int16,
            copies: 2,
            experts: 14848,
            experts_with_spare: 14000,
        };
        assert_eq!(
            ClusterStatus::try_from(pb::ClusterStatus::from(s.clone())).unwrap(),
            s
        );
    }

    #[test]
    fn enums_out_of_range_are_rejected() {
        let mut hb = pb::HeartbeatRequest {
            worker_id: 1,
            state: 99,
            ..Default::default()
        };
        assert_eq!(
            Heartbeat::try_from(hb),
            Err(ConvertError::BadEnum {
                field: "state",
                value: 99
            })
        );
        hb.state = 0; // unspecified
        assert!(matches!(
            Heartbeat::try_from(hb),
            Err(ConvertError::BadEnum { .. })
        ));
        hb.state = -1;
        assert!(matches!(
            Heartbeat::try_from(hb),
            Err(ConvertError::BadEnum { .. })
        ));
        hb.state = pb::WorkerState::Offline as i32;
        assert!(matches!(
            Heartbeat::try_from(hb),
            Err(ConvertError::Invalid { .. })
        ));
        let mut status = pb::ClusterStatus::from(ClusterStatus {
            model: String::new(),
            all_placed: false,
            all_loaded: false,
            workers: vec![],
            tokens_per_second: 0.0,
            coordinator_device: String::new(),
            activations: Activations::F32,
            copies: 1,
            experts: 0,
            experts_with_spare: 0,
        });
        status.workers.push(pb::WorkerStatus {
            name: "w".into(),
            state: 6,
            ..Default::default()
        });
        assert!(matches!(
            ClusterStatus::try_from(status),
            Err(ConvertError::BadEnum {
                field: "workers.state",
                value: 6
            })
        ));
        let reply = pb::HelloReply {
            worker_id: 1,
            coordinator_version: "1".into(),
            data_port: 4433,
            activations: 3,
        };
        assert!(matches!(
            HelloReply::try_from(reply),
            Err(ConvertError::BadEnum {
                field: "activations",
                value: 3
            })
        ));
    }

    #[test]
    fn oversized_and_malformed_fields_are_rejected() {
        let mut h = pb::HelloRequest::from(hello());
        h.name = "x".repeat(MAX_NAME_LEN + 1);
        assert!(matches!(
            Hello::try_from(h.clone()),
            Err(ConvertError::TooLong { field: "name", .. })
        ));
        h.name = "a b".into();
        assert!(matches!(
            Hello::try_from(h.clone()),
            Err(ConvertError::Invalid { field: "name", .. })
        ));
        h.name = "ok".into();
        h.devices = vec![pb::DeviceInfo::default(); MAX_DEVICES + 1];
        assert!(matches!(
            Hello::try_from(h.clone()),
            Err(ConvertError::TooLong {
                field: "devices",
                ..
            })
        ));
        h.devices.clear();
        h.speed = f64::NAN;
        assert!(matches!(
            Hello::try_from(h.clone()),
            Err(ConvertError::Invalid { field: "speed", .. })
        ));
        h.speed = 1.0;
        h.version = "v".repeat(MAX_TEXT_LEN + 1);
        assert!(matches!(
            Hello::try_from(h),
            Err(ConvertError::TooLong {
                field: "version",
                ..
            })
        ));

        let j = pb::JoinRequest {
            token_secret: vec![0; 31],
            name: "w".into(),
            csr_der: vec![1],
        };
        assert!(matches!(
            JoinRequest::try_from(j.clone()),
            Err(ConvertError::Invalid {
                field: "token_secret",
                ..
            })
        ));
        let j = pb::JoinRequest {
            token_secret: vec![0; 32],
            csr_der: vec![0; MAX_CSR_LEN + 1],
            ..j
        };
        assert!(matches!(
            JoinRequest::try_from(j),
            Err(ConvertError::TooLong {
                field: "csr_der",
                ..
            })
        ));

        let mut c = pb::Chunk::from(Chunk {
            offset: 0,
            data: vec![1; 10],
        });
        c.data[0] = 2;
        assert_eq!(
            Chunk::try_from(c.clone()),
            Err(ConvertError::HashMismatch { offset: 0 })
        );
        c.data = vec![0; MAX_CHUNK + 1];
        assert!(matches!(
            Chunk::try_from(c),
            Err(ConvertError::TooLong { field: "data", .. })
        ));

        let mut a = pb::Assignment::from(assignment());
        a.experts[0].experts.push(5);
        assert!(matches!(
            Assignment::try_from(a.clone()),
            Err(ConvertError::Invalid { .. })
        ));
        a.experts[0].experts = vec![MAX_EXPERT_ID];
        assert!(matches!(
            Assignment::try_from(a.clone()),
            Err(ConvertError::Invalid { .. })
        ));
        a.experts[0].experts = vec![0; MAX_EXPERTS_PER_LAYER + 1];
        assert!(matches!(
            Assignment::try_from(a.clone()),
            Err(ConvertError::TooLong { .. })
        ));
        a.experts[0].experts = vec![0];
        a.experts[1].layer = a.experts[0].layer;
        assert!(matches!(
            Assignment::try_from(a.clone()),
            Err(ConvertError::Invalid {
                field: "experts.layer",
                ..
            })
        ));
        a.experts[1].layer = 4;
        a.experts[0].n_experts = 0;
        assert!(matches!(
            Assignment::try_from(a.clone()),
            Err(ConvertError::Invalid {
                field: "experts.n_experts",
                ..
            })
        ));
        a.experts[0].n_experts = 4;
        a.experts[0].experts = vec![4];
        assert!(matches!(
            Assignment::try_from(a.clone()),
            Err(ConvertError::Invalid {
                field: "experts.experts",
                ..
            })
        ));
        let good = pb::Assignment::from(assignment());
        let piece_err = |f: &dyn Fn(&mut pb::ExpertPiece)| {
            let mut a = good.clone();
            f(&mut a.pieces[1]);
            Assignment::try_from(a).unwrap_err()
        };
        // A piece of an expert that is not assigned, and one listed twice.
        assert!(matches!(
            piece_err(&|p| p.expert = 2),
            ConvertError::Invalid {
                field: "pieces.expert",
                ..
            }
        ));
        let mut twice = good.clone();
        twice.pieces.push(twice.pieces[1].clone());
        assert!(matches!(
            Assignment::try_from(twice),
            Err(ConvertError::Invalid {
                field: "pieces.kind",
                ..
            })
        ));
        assert!(matches!(
            piece_err(&|p| p.kind = 0),
            ConvertError::BadEnum {
                field: "pieces.kind",
                value: 0
            }
        ));
        assert!(matches!(
            piece_err(&|p| p.kind = 7),
            ConvertError::BadEnum { .. }
        ));
        assert!(matches!(
            piece_err(&|p| p.shape = vec![1; MAX_DIMS + 1]),
            ConvertError::TooLong { .. }
        ));
        assert!(matches!(
            piece_err(&|p| p.shape.clear()),
            ConvertError::Empty {
                field: "pieces.shape"
            }
        ));
        assert!(matches!(
            piece_err(&|p| p.offset = u64::MAX),
            ConvertError::Invalid {
                field: "pieces.length",
                ..
            }
        ));
        assert!(matches!(
            piece_err(&|p| p.length = 0),
            ConvertError::Empty {
                field: "pieces.length"
            }
        ));
        assert!(matches!(
            piece_err(&|p| p.dtype = "F8/E4M3".into()),
            ConvertError::Invalid {
                field: "pieces.dtype",
                ..
            }
        ));
        assert!(matches!(
            piece_err(&|p| p.tensor.clear()),
            ConvertError::Empty {
                field: "pieces.tensor"
            }
        ));

        assert!(HeartbeatReply::try_from(pb::HeartbeatReply {
            interval_ms: 0,
            drain: false
        })
        .is_err());
        assert!(FetchRequest::try_from(pb::FetchRequest {
            model_fingerprint: "m".into(),
            tensor: "t".into(),
            offset: u64::MAX,
            length: 2,
        })
        .is_err());
    }
}
