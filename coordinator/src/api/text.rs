//! From generated ids to the text a response carries: incremental detokenisation, R1's
//! thinking (between `<think>` and `</think>`) split off as `reasoning_content`, and stop
//! strings (text that could still become a stop string is held back until it cannot).

use std::sync::Arc;

use engine::tokenizer::{StreamDecoder, Tokenizer, TokenizerError};

/// Newly completed text of both channels.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delta {
    pub reasoning: String,
    pub content: String,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty()
    }

    fn push(&mut self, reasoning: bool, text: &str) {
        if reasoning {
            self.reasoning.push_str(text);
        } else {
            self.content.push_str(text);
        }
    }
}

/// The ids of `<think>` and `</think>` in a vocabulary, when it has both.
pub fn think_ids(tok: &Tokenizer) -> Option<(u32, u32)> {
    Some((tok.token_to_id("<think>")?, tok.token_to_id("</think>")?))
}

/// Turns one request's ids into text deltas.
pub struct TextOut {
    tokenizer: Arc<Tokenizer>,
    decoder: StreamDecoder,
    think: Option<(u32, u32)>,
    /// Inside the thinking part.
    reasoning: bool,
    /// No token seen yet (a first `<think>` opens the thinking part).
    first: bool,
    stops: Vec<String>,
    /// Text of the current channel not yet released (it may begin a stop string).
    held: String,
    stopped: bool,
}

impl TextOut {
    /// `reasoning`: the prompt ends inside the thinking part (R1's template opens it).
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        think: Option<(u32, u32)>,
        reasoning: bool,
        stops: Vec<String>,
    ) -> Self {
        TextOut {
            tokenizer,
            decoder: StreamDecoder::new(true),
            think,
            reasoning: reasoning && think.is_some(),
            first: true,
            stops,
            held: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop string has ended the text (later ids are ignored).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Whether the text is (still) in the thinking part.
    pub fn in_reasoning(&self) -> bool {
        self.reasoning
    }

    /// Adds one generated id.
    pub fn push(&mut self, id: u32) -> Result<Delta, TokenizerError> {
        let mut d = Delta::default();
        if self.stopped {
            return Ok(d);
        }
        let first = std::mem::replace(&mut self.first, false);
        if let Some((open, close)) = self.think {
            if id == open && first && !self.reasoning {
                self.reasoning = true;
                return Ok(d);
            }
            if id == close && self.reasoning {
                let rest = self.decoder.finish();
                self.release(&rest, &mut d, true);
                self.reasoning = false;
                return Ok(d);
            }
        }
        let piece = self.decoder.step(&self.tokenizer, id)?;
        self.release(&piece, &mut d, false);
        Ok(d)
    }

    /// The end of generation: whatever was held back.
    pub fn finish(&mut self) -> Delta {
        let mut d = Delta::default();
        if !self.stopped {
            let rest = self.decoder.finish();
            self.release(&rest, &mut d, true);
        }
        d
    }

    /// Appends `text` to the current channel and releases what can no longer start a stop
    /// string (everything when `flush`).
    fn release(&mut self, text: &str, d: &mut Delta, flush: bool) {
        self.held.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s)).min() {
            self.held.truncate(at);
            self.stopped = true;
            d.push(self.reasoning, &self.held);
            self.held.clear();
            return;
        }
        let keep = if flush { 0 } else { self.partial_stop_len() };
        let cut = self.held.len() - keep;
        d.push(self.reasoning, &self.held[..cut]);
        self.held.drain(..cut);
    }

    /// Bytes at the end of `held` that are a proper prefix of some stop string.
    fn partial_stop_len(&self) -> usize {
        let h = &self.held;
        let mut best = 0;
        for s in &self.stops {
            for (k, _) in s.char_indices().skip(1) {
                if k > best && h.ends_with(&s[..k]) {
                    best = k;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Arc<Tokenizer> {
        let spec = engine::synth::SynthSpec::tiny();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        engine::synth::write_model(&path, &spec).unwrap();
        let mf = engine::model::ModelFile::open(&path).unwrap();
        Arc::new(mf.tokenizer().unwrap())
    }

    fn ids(tok: &Tokenizer, text: &str) -> Vec<u32> {
        tok.encode(text, false).unwrap()
    }

    fn run(out: &mut TextOut, ids: &[u32]) -> Delta {
        let mut all = Delta::default();
        for &id in ids {
            let d = out.push(id).unwrap();
            all.reasoning += &d.reasoning;
            all.content += &d.content;
        }
        let d = out.finish();
        all.reasoning += &d.reasoning;
        all.content += &d.content;
        all
    }

    #[test]
    fn plain_text_and_stop_strings() {
        let tok = tokenizer();
        let text = "The sky is blue. END of story";
        let ids = ids(&tok, text);
        let mut plain = TextOut::new(tok.clone(), think_ids(&tok), false, vec![]);
        assert_eq!(run(&mut plain, &ids).content, text);

        // A stop string split over several tokens: the text before it, nothing after.
        let mut out = TextOut::new(tok.clone(), think_ids(&tok), false, vec!["END".into()]);
        let mut released = String::new();
        for &id in &ids {
            let d = out.push(id).unwrap();
            released += &d.content;
            // Never releases a part of the stop string.
            assert!(
                !released.contains('E') || released.ends_with(". "),
                "{released:?}"
            );
        }
        released += &out.finish().content;
        assert_eq!(released, "The sky is blue. ");
        assert!(out.stopped());

        // A held-back prefix that does not become the stop string is released.
        let mut out = TextOut::new(
            tok.clone(),
            think_ids(&tok),
            false,
            vec!["blue moon".into()],
        );
        assert_eq!(run(&mut out, &ids).content, text);
        assert!(!out.stopped());
    }

    #[test]
    fn thinking_goes_to_reasoning() {
        let tok = tokenizer();
        let (open, close) = think_ids(&tok).expect("the tiny vocabulary has think tags");
        let mut body = ids(&tok, "let me think");
        body.push(close);
        body.extend(ids(&tok, "\n\nBlue."));

        // R1's template opens the thinking part in the prompt.
        let mut out = TextOut::new(tok.clone(), Some((open, close)), true, vec![]);
        let d = run(&mut out, &body);
        assert_eq!(d.reasoning, "let me think");
        assert_eq!(d.content, "\n\nBlue.");

        // A model that opens it itself.
        let mut ids2 = vec![open];
        ids2.extend(&body);
        let mut out = TextOut::new(tok.clone(), Some((open, close)), false, vec![]);
        assert_eq!(run(&mut out, &ids2), d);

        // Without think tags in play, `</think>` is ordinary (special) text and content.
        let mut out = TextOut::new(tok.clone(), Some((open, close)), false, vec![]);
        let d = run(&mut out, &body);
        assert_eq!(d.reasoning, "");
        assert!(d.content.starts_with("let me think"), "{d:?}");
    }
}
