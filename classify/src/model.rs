//! The sentence encoder: a BERT-family model directory (`config.json`,
//! `tokenizer.json`, `model.safetensors`) loaded by candle and run by
//! [`Bert`] on the CPU, mean-pooled over the tokens and L2-normalized, so
//! the dot product of two embeddings is their cosine similarity. Nothing is
//! downloaded: `scripts/fetch-model` puts models in `models/<name>/`.
//!
//! A batch is tokenized and packed without padding into passes; each pass
//! is spread over every core (`RAYON_NUM_THREADS` caps it).

use crate::bert::Bert;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config as BertConfig;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use tokenizers::{Tokenizer, TruncationParams};

/// The files a model directory must hold.
pub const MODEL_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A model file is not there: the model was never fetched, or the path is wrong.
    #[error("{} is missing: run scripts/fetch-model, or set BOTLINE_MODEL_PATH to a directory with {}", .0.display(), MODEL_FILES.join(", "))]
    Missing(PathBuf),
    /// A model file is there but unusable.
    #[error("{}: {reason}", path.display())]
    Unreadable { path: PathBuf, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("inference: {0}")]
    Inference(#[from] candle_core::Error),
}

/// `config.json`: the BERT dimensions candle reads, and the prefix this
/// model expects before a query (e5 wants `query: `), when it names one.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelConfig {
    #[serde(flatten)]
    pub bert: BertConfig,
    #[serde(default)]
    pub query_prefix: Option<String>,
}

/// Turns texts into unit-length sentence embeddings.
pub trait Embedder: Send + Sync + 'static {
    /// One embedding per text, in order, each of length `dimension()`.
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError>;
    fn dimension(&self) -> usize;
}

pub struct Encoder {
    model: Bert,
    tokenizer: Tokenizer,
    prefix: String,
    dimension: usize,
}

impl Encoder {
    /// Load the model in `dir`. `prefix` overrides the query prefix from
    /// `config.json`; `max_tokens` cuts longer texts (the model's own limit
    /// applies too).
    pub fn load(dir: &Path, prefix: Option<&str>, max_tokens: usize) -> Result<Self, ModelError> {
        for file in MODEL_FILES {
            if !dir.join(file).is_file() {
                return Err(ModelError::Missing(dir.join(file)));
            }
        }
        let config_path = dir.join("config.json");
        let config: ModelConfig = std::fs::read_to_string(&config_path)
            .map_err(|error| error.to_string())
            .and_then(|text| serde_json::from_str(&text).map_err(|error| error.to_string()))
            .map_err(|reason| ModelError::Unreadable {
                path: config_path,
                reason,
            })?;
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(|error| ModelError::Unreadable {
                path: tokenizer_path,
                reason: error.to_string(),
            })?;
        let weights = dir.join("model.safetensors");
        let device = Device::Cpu;
        // SAFETY: the weights are memory-mapped; the file must not change
        // while the process runs (fetch-model replaces files by renaming).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &device) }
            .map_err(|error| ModelError::Unreadable {
            path: weights.clone(),
            reason: error.to_string(),
        })?;
        let model = Bert::load(vb, &config.bert).map_err(|error| ModelError::Unreadable {
            path: weights,
            reason: error.to_string(),
        })?;
        let prefix = prefix
            .map(str::to_string)
            .or(config.query_prefix.clone())
            .unwrap_or_default();
        Encoder::new(model, tokenizer, &config.bert, prefix, max_tokens)
    }

    /// An encoder from parts already in memory (tests build tiny models).
    pub fn new(
        model: Bert,
        mut tokenizer: Tokenizer,
        config: &BertConfig,
        prefix: String,
        max_tokens: usize,
    ) -> Result<Self, ModelError> {
        // Padding is ours (per chunk); whatever the file asked for is dropped.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens.clamp(2, config.max_position_embeddings),
                ..Default::default()
            }))
            .map_err(|error| ModelError::Tokenizer(error.to_string()))?;
        Ok(Encoder {
            model,
            tokenizer,
            prefix,
            dimension: config.hidden_size,
        })
    }

    /// The prefix put before every text.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The tokenizer, as the model reads text (cut to `max_tokens`).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The ids the model sees around a text's own tokens: the start token
    /// and the prefix's tokens before, the end token after (e5: `<s> ▁query :`
    /// and `</s>`). Found as what the framings of two one-letter texts share.
    pub fn frame(&self) -> Result<(Vec<u32>, Vec<u32>), ModelError> {
        let (a, b) = (self.token_ids("a")?, self.token_ids("b")?);
        let before = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        let after = a
            .iter()
            .rev()
            .zip(b.iter().rev())
            .take_while(|(x, y)| x == y)
            .count()
            .min(a.len() - before);
        Ok((a[..before].to_vec(), a[a.len() - after..].to_vec()))
    }

    fn token_ids(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let input = format!("{}{}", self.prefix, text);
        let encoding = self
            .tokenizer
            .encode(input, true)
            .map_err(|error| ModelError::Tokenizer(error.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Embeddings of token id sequences (special tokens included).
    pub fn embed_ids(&self, ids: &[&[u32]]) -> Result<Vec<Vec<f32>>, ModelError> {
        Ok(self.model.sentence_embeddings(ids)?)
    }
}

impl Embedder for Encoder {
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
        let ids = texts
            .iter()
            .map(|text| self.token_ids(text))
            .collect::<Result<Vec<_>, _>>()?;
        let ids: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        self.embed_ids(&ids)
    }

    fn dimension(&self) -> usize {
        self.dimension
    }
}

/// The cosine similarity of two unit vectors: their dot product.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    dot(a, b)
}

/// A dot product in 32 lanes, which the compiler turns into four vector
/// registers added to independently (a plain sum may not be reordered, so
/// it would be one scalar chain).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 32;
    let mut lanes = [0f32; LANES];
    let (a_lanes, b_lanes) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let rest: f32 = a_lanes
        .remainder()
        .iter()
        .zip(b_lanes.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (a, b) in a_lanes.zip(b_lanes) {
        for i in 0..LANES {
            lanes[i] += a[i] * b[i];
        }
    }
    lanes.iter().sum::<f32>() + rest
}

/// The sum of `rows` (each `width` long) scaled to unit length, so also
/// their mean's direction; all zeros when there are none.
pub fn unit_sum<'a>(rows: impl IntoIterator<Item = &'a [f32]>, width: usize) -> Vec<f32> {
    let mut sum = vec![0f32; width];
    for row in rows {
        for (s, x) in sum.iter_mut().zip(row) {
            *s += x;
        }
    }
    let norm = sum.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    sum.iter_mut().for_each(|x| *x /= norm);
    sum
}

/// Threads candle uses for one forward pass.
pub fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bert::tests::{tiny_config, tiny_weights};
    use crate::bert::TOKENS_PER_PASS;
    use std::str::FromStr;

    /// A two-layer BERT with random weights and a word-level tokenizer over
    /// a few words: enough to run every step of the real path.
    pub(crate) fn tiny_encoder() -> Encoder {
        let words = [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world", "refund", "my", "order", "where",
            "is", "password", "reset", "please", "thanks", "a", "b", "c",
        ];
        let vocab: String = words
            .iter()
            .enumerate()
            .map(|(i, w)| format!("\"{w}\": {i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let json = format!(
            r#"{{
              "version": "1.0", "truncation": null,
              "padding": {{"strategy": {{"Fixed": 16}}, "direction": "Right", "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"}},
              "added_tokens": [], "normalizer": {{"type": "Lowercase"}},
              "pre_tokenizer": {{"type": "Whitespace"}},
              "post_processor": {{"type": "TemplateProcessing",
                "single": [{{"SpecialToken": {{"id": "[CLS]", "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}}, {{"SpecialToken": {{"id": "[SEP]", "type_id": 0}}}}],
                "pair": [{{"Sequence": {{"id": "A", "type_id": 0}}}}],
                "special_tokens": {{"[CLS]": {{"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]}}, "[SEP]": {{"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}}}}},
              "decoder": null,
              "model": {{"type": "WordLevel", "vocab": {{{vocab}}}, "unk_token": "[UNK]"}}
            }}"#
        );
        let tokenizer = Tokenizer::from_str(&json).unwrap();
        let config = tiny_config(words.len());
        let (weights, _) = tiny_weights(&config);
        let vb = VarBuilder::from_varmap(&weights, DType::F32, &Device::Cpu);
        let model = Bert::load(vb, &config).unwrap();
        Encoder::new(model, tokenizer, &config, "please ".into(), 12).unwrap()
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
    }

    #[test]
    fn embeddings_are_unit_length_in_order_and_independent_of_padding() {
        let encoder = tiny_encoder();
        let texts = [
            "where is my order please thanks a b c",
            "hello",
            "refund",
            "reset my password",
            "",
            "unknown words only",
        ];
        let batch = encoder.embed(&texts).unwrap();
        assert_eq!(batch.len(), texts.len());
        for (text, embedding) in texts.iter().zip(&batch) {
            assert_eq!(embedding.len(), encoder.dimension());
            let norm: f32 = embedding.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{text:?}: norm {norm}");
            // Alone, the text is not padded: the same vector.
            let alone = encoder.embed(&[text]).unwrap().remove(0);
            assert!(
                close(embedding, &alone),
                "{text:?}: {embedding:?} vs {alone:?}"
            );
        }
        assert!(
            !close(&batch[1], &batch[2]),
            "different texts, different vectors"
        );
        // Text past max_tokens is cut: only the first 12 tokens count.
        let long = "hello world ".repeat(20);
        let longer = format!("{long} refund refund");
        let cut = encoder.embed(&[&long, &longer]).unwrap();
        assert!(close(&cut[0], &cut[1]));
    }

    #[test]
    fn many_texts_span_several_passes() {
        let encoder = tiny_encoder();
        let words = ["hello", "world", "refund", "order", "a", "b"];
        let texts: Vec<String> = (0..TOKENS_PER_PASS / 4 + 5)
            .map(|n| {
                (0..n % 9 + 1)
                    .map(|i| words[(n + i) % words.len()])
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let batch = encoder.embed(&refs).unwrap();
        for (text, embedding) in refs.iter().zip(&batch) {
            assert!(
                close(embedding, &encoder.embed(&[text]).unwrap()[0]),
                "{text:?}"
            );
        }
    }

    #[test]
    fn missing_files_name_the_path_and_the_fix() {
        let error = Encoder::load(Path::new("/nonexistent/model"), None, 128)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("/nonexistent/model/config.json"), "{error}");
        assert!(error.contains("scripts/fetch-model"), "{error}");
        assert!(error.contains("BOTLINE_MODEL_PATH"), "{error}");
    }
}
