//! A model file as a set of named tensors, whatever the container (GGUF or safetensors).

use crate::quant::QuantType;
use crate::Bytes;

/// One stored tensor. `shape` is outermost-first (row-major, PyTorch/numpy order): a linear
/// weight `W[out, in]` has shape `[out, in]` in both containers (GGUF's `ne` is reversed),
/// and a stacked expert tensor has shape `[n_expert, out, in]`.
#[derive(Clone, Debug)]
pub struct RawTensor {
    pub name: String,
    pub ty: QuantType,
    pub shape: Vec<usize>,
    pub data: Bytes,
}

impl RawTensor {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Errors common to every container when the model asks for a tensor.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{file}: tensor `{name}` not found")]
    Missing { file: String, name: String },
    #[error("{file}: tensor `{name}`: {what}")]
    Bad {
        file: String,
        name: String,
        what: String,
    },
}

/// Read access to a model's tensors by their container's own names.
pub trait TensorSource: Send + Sync {
    /// The tensor called `name`, its bytes borrowed from the mapping.
    fn tensor(&self, name: &str) -> Result<RawTensor, SourceError>;
    /// Whether a tensor called `name` exists.
    fn contains(&self, name: &str) -> bool;
    /// All tensor names (for diagnostics and for recognising skipped tensors such as MTP).
    fn names(&self) -> Vec<String>;
    /// A short description of where the tensors come from, for error messages.
    fn describe(&self) -> String;
}

/// A shared source is a source (the model and its tokenizer metadata share one GGUF).
impl<T: TensorSource + ?Sized> TensorSource for std::sync::Arc<T> {
    fn tensor(&self, name: &str) -> Result<RawTensor, SourceError> {
        (**self).tensor(name)
    }
    fn contains(&self, name: &str) -> bool {
        (**self).contains(name)
    }
    fn names(&self) -> Vec<String> {
        (**self).names()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}
