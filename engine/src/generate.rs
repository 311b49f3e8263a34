//! One sequence from prompt to stop: prefill, then decode steps with sampling, streaming each
//! piece of text as it completes. Used by `coordinator generate` and the serving loop.

use crate::model::kv_cache::{CacheType, KvCache};
use crate::model::moe::RoutedExperts;
use crate::model::{ForwardError, Logits, Model, Workspace};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{StreamDecoder, Tokenizer, TokenizerError};

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Tokens that end the sequence (EOS). The stop token is returned but not streamed as text.
    pub stop_ids: Vec<u32>,
    /// Ids never to sample (besides the rows past the tokenizer's vocabulary), e.g.
    /// [`crate::model::ModelFile::unused_token_ids`].
    pub banned_ids: Vec<u32>,
    /// Teacher forcing: decode step `i` consumes `force[i]` instead of the sampled token.
    pub force: Option<Vec<u32>>,
    /// Keep every logits row (prompt rows from the prefill, then one per decode step).
    pub keep_logits: bool,
    pub cache: CacheType,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was produced.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

/// The result of a generation.
#[derive(Debug)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    /// `(prompt + tokens) x vocab` when requested: row `t` = logits after token `t`.
    pub logits: Option<Vec<f32>>,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("empty prompt")]
    EmptyPrompt,
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
}

impl From<crate::gpu::GpuForwardError> for GenerateError {
    fn from(e: crate::gpu::GpuForwardError) -> Self {
        match e {
            crate::gpu::GpuForwardError::Forward(f) => GenerateError::Forward(f),
            crate::gpu::GpuForwardError::Gpu(g) => GenerateError::Gpu(g),
        }
    }
}

/// One sequence's forward passes on some backend: the CPU [`Model`] with its cache and
/// workspace ([`CpuSequence`]) or the GPU's [`crate::gpu::GpuModel`].
pub trait SequenceModel {
    fn vocab_size(&self) -> usize;
    /// Positions the sequence can hold.
    fn capacity(&self) -> usize;
    /// Empties the cache.
    fn reset(&mut self);
    /// Runs `tokens` at the next positions and returns the requested logits.
    fn forward(
        &mut self,
        tokens: &[u32],
        experts: &dyn RoutedExperts,
        which: Logits,
    ) -> Result<&[f32], GenerateError>;
}

/// The CPU backend as a [`SequenceModel`].
pub struct CpuSequence<'m> {
    model: &'m Model,
    cache: KvCache,
    ws: Workspace,
}

impl<'m> CpuSequence<'m> {
    pub fn new(model: &'m Model, cache: CacheType, capacity: usize) -> Self {
        CpuSequence {
            cache: model.new_cache(cache, capacity),
            model,
            ws: Workspace::default(),
        }
    }
}

impl SequenceModel for CpuSequence<'_> {
    fn vocab_size(&self) -> usize {
        self.model.cfg.vocab_size
    }

    fn capacity(&self) -> usize {
        self.cache.capacity()
    }

    fn reset(&mut self) {
        self.cache.truncate(0);
    }

    fn forward(
        &mut self,
        tokens: &[u32],
        experts: &dyn RoutedExperts,
        which: Logits,
    ) -> Result<&[f32], GenerateError> {
        Ok(self
            .model
            .forward(tokens, &mut self.cache, experts, &mut self.ws, which)?)
    }
}

impl SequenceModel for crate::gpu::GpuModel {
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn capacity(&self) -> usize {
        crate::gpu::GpuModel::capacity(self)
    }

    fn reset(&mut self) {
        self.truncate(0);
    }

    fn forward(
        &mut self,
        tokens: &[u32],
        experts: &dyn RoutedExperts,
        which: Logits,
    ) -> Result<&[f32], GenerateError> {
        Ok(crate::gpu::GpuModel::forward(self, tokens, experts, which)?)
    }
}

/// Runs `req` on the CPU backend, calling `on_text` with each newly completed piece of text.
pub fn generate(
    model: &Model,
    experts: &dyn RoutedExperts,
    tokenizer: &Tokenizer,
    req: &GenerateRequest,
    on_text: impl FnMut(&str),
) -> Result<Generation, GenerateError> {
    let mut seq = CpuSequence::new(model, req.cache, req.prompt.len() + req.max_new_tokens + 1);
    generate_on(&mut seq, experts, tokenizer, req, on_text)
}

/// Runs `req` on any backend from an empty cache (`req.cache` is the caller's business here:
/// the sequence model already has its cache).
pub fn generate_on(
    model: &mut dyn SequenceModel,
    experts: &dyn RoutedExperts,
    tokenizer: &Tokenizer,
    req: &GenerateRequest,
    mut on_text: impl FnMut(&str),
) -> Result<Generation, GenerateError> {
    if req.prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    model.reset();
    let vocab = model.vocab_size();
    // Rows past the tokenizer's vocabulary are padding: never sample them.
    let mut sampler = Sampler::new(req.sampling)
        .with_banned_from(tokenizer.vocab_size().min(vocab) as u32)
        .with_banned_ids(req.banned_ids.iter().copied());
    let mut stream = StreamDecoder::new(true);
    let mut logits_out = req.keep_logits.then(Vec::new);

    let t0 = std::time::Instant::now();
    let which = if req.keep_logits {
        Logits::All
    } else {
        Logits::Last
    };
    let rows = model.forward(&req.prompt, experts, which)?;
    if let Some(l) = logits_out.as_mut() {
        l.extend_from_slice(rows);
    }
    let mut last = rows[rows.len() - vocab..].to_vec();
    let prefill_secs = t0.elapsed().as_secs_f64();

    let t1 = std::time::Instant::now();
    let mut tokens = Vec::new();
    let mut finish = FinishReason::Length;
    for step in 0..req.max_new_tokens {
        let next = sampler.sample(&last);
        tokens.push(next);
        let is_stop = req.stop_ids.contains(&next);
        if !is_stop {
            let piece = stream.step(tokenizer, next)?;
            if !piece.is_empty() {
                on_text(&piece);
            }
        }
        let feed = req
            .force
            .as_ref()
            .and_then(|f| f.get(step).copied())
            .unwrap_or(next);
        // The step after the last token is only needed for its logits row.
        let done = is_stop || step + 1 == req.max_new_tokens;
        if done && !req.keep_logits {
            if is_stop {
                finish = FinishReason::Stop;
            }
            break;
        }
        let row = model.forward(&[feed], experts, Logits::Last)?;
        last.copy_from_slice(row);
        if let Some(l) = logits_out.as_mut() {
            l.extend_from_slice(row);
        }
        if done {
            if is_stop {
                finish = FinishReason::Stop;
            }
            break;
        }
    }
    let rest = stream.finish();
    if !rest.is_empty() {
        on_text(&rest);
    }
    Ok(Generation {
        tokens,
        finish,
        logits: logits_out,
        prefill_secs,
        decode_secs: t1.elapsed().as_secs_f64(),
    })
}
