//! The bytes a coordinator streams to workers that have no copy of the model: the pieces of
//! every routed expert (`engine::model::weights::ExpertPiece`), the same way for a GGUF model
//! (slices of stacked tensors) and a Hugging Face one (per-expert tensors and FP8 scales).
//! Sans-I/O: `server.rs` puts the pieces into assignments and asks [`Streamable::check`]
//! before it serves a byte range.

use std::collections::HashMap;
use std::ops::Range;

use engine::model::weights::{ExpertMatrix, ExpertPiece};
use proto::control::{self, PieceKind};

/// Why a byte range of a tensor is not served to a worker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0:?} holds no routed expert of this model; only those are served")]
    NotServed(String),
    #[error("bytes {start}..{end} of {tensor} are not all routed-expert weights")]
    NotExpertBytes {
        tensor: String,
        start: u64,
        end: u64,
    },
    #[error("expert {expert} of layer {layer} is not assigned to this worker")]
    NotAssigned { layer: u32, expert: u32 },
}

/// Every expert's pieces, by expert and by tensor.
#[derive(Default)]
pub struct Streamable {
    by_expert: HashMap<(u32, u32), Vec<control::ExpertPiece>>,
    /// Per tensor: `(byte range, layer, expert)` of each piece in it, by offset, disjoint.
    by_tensor: HashMap<String, Vec<(Range<u64>, u32, u32)>>,
}

/// The wire's description of an engine piece.
pub fn to_control(p: &ExpertPiece) -> control::ExpertPiece {
    let m = match p.matrix {
        ExpertMatrix::Gate => 0,
        ExpertMatrix::Up => 1,
        ExpertMatrix::Down => 2,
    };
    control::ExpertPiece {
        layer: p.layer as u32,
        expert: p.expert as u32,
        kind: PieceKind::of(m, p.scales).expect("three matrices"),
        tensor: p.tensor.clone(),
        offset: p.range.start,
        length: p.range.end - p.range.start,
        dtype: p.ty.name().to_string(),
        shape: p.shape.iter().map(|&d| d as u64).collect(),
    }
}

impl Streamable {
    /// Indexes `pieces`; pieces of one tensor that overlap are refused (a model whose experts
    /// share bytes cannot be handed out expert by expert).
    pub fn new(pieces: &[ExpertPiece]) -> Result<Streamable, String> {
        let mut s = Streamable::default();
        for p in pieces {
            let (layer, expert) = (p.layer as u32, p.expert as u32);
            s.by_tensor
                .entry(p.tensor.clone())
                .or_default()
                .push((p.range.clone(), layer, expert));
            s.by_expert
                .entry((layer, expert))
                .or_default()
                .push(to_control(p));
        }
        for (name, list) in &mut s.by_tensor {
            list.sort_by_key(|(r, _, _)| r.start);
            if let Some(w) = list.windows(2).find(|w| w[0].0.end > w[1].0.start) {
                return Err(format!(
                    "{name}: the pieces of expert {} of layer {} and expert {} overlap",
                    w[0].2, w[0].1, w[1].2
                ));
            }
        }
        Ok(s)
    }

    /// The pieces of `experts` of `layer`, as an assignment carries them.
    pub fn pieces(&self, layer: u32, experts: &[u32]) -> Vec<control::ExpertPiece> {
        experts
            .iter()
            .filter_map(|&e| self.by_expert.get(&(layer, e)))
            .flatten()
            .cloned()
            .collect()
    }

    /// Whether `tensor` holds pieces of routed experts.
    pub fn serves(&self, tensor: &str) -> bool {
        self.by_tensor.contains_key(tensor)
    }

    /// Whether bytes `range` of `tensor` may be sent to a worker holding the experts for which
    /// `held(layer, expert)` is true: every byte must belong to a piece of one of them.
    pub fn check(
        &self,
        tensor: &str,
        range: Range<u64>,
        held: impl Fn(u32, u32) -> bool,
    ) -> Result<(), Refusal> {
        let list = self
            .by_tensor
            .get(tensor)
            .ok_or_else(|| Refusal::NotServed(tensor.to_string()))?;
        let uncovered = || Refusal::NotExpertBytes {
            tensor: tensor.to_string(),
            start: range.start,
            end: range.end,
        };
        let mut at = range.start;
        let first = list.partition_point(|(r, _, _)| r.end <= at);
        for (r, layer, expert) in &list[first..] {
            if at >= range.end {
                break;
            }
            if r.start > at {
                return Err(uncovered());
            }
            if !held(*layer, *expert) {
                return Err(Refusal::NotAssigned {
                    layer: *layer,
                    expert: *expert,
                });
            }
            at = r.end;
        }
        if at < range.end {
            return Err(uncovered());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::quant::QuantType;

    fn piece(
        l: usize,
        e: usize,
        m: ExpertMatrix,
        scales: bool,
        t: &str,
        r: Range<u64>,
    ) -> ExpertPiece {
        ExpertPiece {
            layer: l,
            expert: e,
            matrix: m,
            scales,
            tensor: t.into(),
            range: r,
            ty: if scales {
                QuantType::F32
            } else {
                QuantType::F8E4M3
            },
            shape: [4, 4],
        }
    }

    #[test]
    fn stacked_slices_and_per_expert_tensors_are_checked_alike() {
        let stacked = "blk.1.ffn_up_exps.weight";
        let w = |e: usize| format!("model.layers.2.mlp.experts.{e}.gate_proj.weight");
        let s = |e: usize| format!("model.layers.2.mlp.experts.{e}.gate_proj.weight_scale_inv");
        let mut pieces: Vec<ExpertPiece> = (0..4)
            .map(|e| {
                piece(
                    1,
                    e,
                    ExpertMatrix::Up,
                    false,
                    stacked,
                    e as u64 * 100..(e as u64 + 1) * 100,
                )
            })
            .collect();
        for e in 0..2 {
            pieces.push(piece(2, e, ExpertMatrix::Gate, false, &w(e), 0..16));
            pieces.push(piece(2, e, ExpertMatrix::Gate, true, &s(e), 0..4));
        }
        let st = Streamable::new(&pieces).unwrap();
        let held = |l: u32, e: u32| (l, e) == (1, 1) || (l, e) == (1, 2) || (l, e) == (2, 1);

        // Two contiguous experts of a stacked tensor in one range; a part of one.
        assert_eq!(st.check(stacked, 100..300, held), Ok(()));
        assert_eq!(st.check(stacked, 150..160, held), Ok(()));
        assert_eq!(
            st.check(stacked, 250..350, held),
            Err(Refusal::NotAssigned {
                layer: 1,
                expert: 3
            })
        );
        assert_eq!(
            st.check(stacked, 0..100, held),
            Err(Refusal::NotAssigned {
                layer: 1,
                expert: 0
            })
        );
        // A per-expert tensor and its scales.
        assert_eq!(st.check(&w(1), 0..16, held), Ok(()));
        assert_eq!(st.check(&s(1), 0..4, held), Ok(()));
        assert_eq!(
            st.check(&w(0), 0..16, held),
            Err(Refusal::NotAssigned {
                layer: 2,
                expert: 0
            })
        );
        // Bytes past the pieces, and tensors that hold no expert.
        assert!(matches!(
            st.check(&w(1), 8..20, held),
            Err(Refusal::NotExpertBytes { .. })
        ));
        assert!(matches!(
            st.check("model.embed_tokens.weight", 0..4, held),
            Err(Refusal::NotServed(_))
        ));

        // Assignments carry the pieces of the experts asked for, kinds and types named.
        let got = st.pieces(2, &[1]);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].kind, PieceKind::Gate);
        assert_eq!(got[0].dtype, "F8_E4M3");
        assert_eq!(got[1].kind, PieceKind::GateScales);
        assert_eq!((got[1].tensor.as_str(), got[1].length), (s(1).as_str(), 4));
        assert_eq!(
            st.pieces(1, &[2, 3])
                .iter()
                .map(|p| p.offset)
                .collect::<Vec<_>>(),
            [200, 300]
        );

        pieces.push(piece(1, 9, ExpertMatrix::Up, false, stacked, 350..450));
        assert!(Streamable::new(&pieces).is_err(), "overlapping pieces");
    }
}
