//! Static token vectors, the fast path (the Model2Vec idea): every token of
//! the vocabulary that the languages we serve can reach goes once through the
//! loaded transformer on its own, framed as a text is (`<s> query: TOKEN
//! </s>`), and is mean-pooled like a sentence. The vectors are then centred
//! (what every token shares, mostly the frame, tells tokens apart from none)
//! and weighted by rank (smooth inverse frequency with Zipf's law: frequent
//! tokens such as `▁the` or `的` count less). A message's vector is the
//! normalized sum of its tokens' vectors: no transformer, a few microseconds.
//!
//! Distilling takes minutes, so the result is kept beside the model in
//! [`FILE`] with the fingerprint of the model and recipe it came from;
//! `scripts/fetch-model` makes it, and classify makes it at start when it is
//! missing or was made from something else.

use crate::model::{unit_sum, Embedder, Encoder, ModelError, MODEL_FILES};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokenizers::Tokenizer;
use tracing::{info, warn};

/// The file beside the model that holds the distilled vectors.
pub const FILE: &str = "static.safetensors";

/// Part of the fingerprint: changing how vectors are made makes old files stale.
const RECIPE: &str = "botline static token vectors 1: framed token, mean pool, centre, SIF 1e-3 by Zipf rank; ASCII, CJK, punctuation, emoji";

/// Framed tokens handed to the encoder at a time while distilling, between
/// progress reports.
const DISTILL_CHUNK: usize = 256;

/// Smooth-inverse-frequency weight `a / (a + p)`, `p` the token's Zipf
/// probability from its rank.
const SIF: f32 = 1e-3;

/// Texts from which a batch is spread over the cores.
const PARALLEL_FROM: usize = 16;

/// Marks a token id that has no vector.
const NONE: u32 = u32::MAX;

/// Whether a vocabulary entry can occur in the languages classify serves
/// (English, Chinese, a mix of both, with emoji): ASCII, CJK ideographs and
/// punctuation, fullwidth forms, general punctuation, symbols and emoji. The
/// word markers `▁` (SentencePiece) and `##` (WordPiece) do not count.
pub fn served(token: &str) -> bool {
    token
        .trim_start_matches("##")
        .chars()
        .filter(|&c| c != '\u{2581}')
        .all(|c| {
            matches!(c as u32,
                0x00..=0x7f
                | 0x2000..=0x206f // general punctuation
                | 0x2190..=0x21ff // arrows
                | 0x2600..=0x27bf // symbols, dingbats
                | 0x3000..=0x303f // CJK symbols and punctuation
                | 0x3400..=0x4dbf // CJK extension A
                | 0x4e00..=0x9fff // CJK unified ideographs
                | 0xff00..=0xffef // fullwidth forms
                | 0x1f000..=0x1faff) // emoji
        })
}

/// A vector per token, and the tokenizer that finds a text's tokens.
pub struct TokenVectors {
    tokenizer: Tokenizer,
    /// Token id → row in `vectors`, [`NONE`] for tokens never distilled.
    rows: Vec<u32>,
    /// Row-major, `dimension` values per row, centred and weighted.
    vectors: Vec<f32>,
    dimension: usize,
}

impl TokenVectors {
    /// Runs each token `keep` accepts through `encoder` (minutes for a
    /// large vocabulary); `progress(done, total)` is called after each pass.
    pub fn distill(
        encoder: &Encoder,
        keep: impl Fn(&str) -> bool,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self, ModelError> {
        let tokenizer = encoder.tokenizer();
        let special = tokenizer.get_added_vocabulary();
        let mut ids: Vec<u32> = tokenizer
            .get_vocab(false)
            .into_iter()
            .filter(|(token, _)| !special.is_special_token(token) && keep(token))
            .map(|(_, id)| id)
            .collect();
        ids.sort_unstable();
        let (before, after) = encoder.frame()?;
        let mut vectors = Vec::with_capacity(ids.len() * encoder.dimension());
        for (done, chunk) in ids.chunks(DISTILL_CHUNK).enumerate() {
            let sequences: Vec<Vec<u32>> = chunk
                .iter()
                .map(|&id| [before.as_slice(), &[id], after.as_slice()].concat())
                .collect();
            let sequences: Vec<&[u32]> = sequences.iter().map(Vec::as_slice).collect();
            for vector in encoder.embed_ids(&sequences)? {
                vectors.extend(vector);
            }
            progress(
                (done * DISTILL_CHUNK + chunk.len()).min(ids.len()),
                ids.len(),
            );
        }
        centre(&mut vectors, encoder.dimension());
        let vocabulary = tokenizer.get_vocab_size(true);
        for (row, &id) in ids.iter().enumerate() {
            let weight = sif_weight(id as usize, vocabulary);
            let start = row * encoder.dimension();
            for value in &mut vectors[start..start + encoder.dimension()] {
                *value *= weight;
            }
        }
        Ok(TokenVectors::from_rows(
            tokenizer.clone(),
            &ids,
            vectors,
            encoder.dimension(),
        ))
    }

    fn from_rows(tokenizer: Tokenizer, ids: &[u32], vectors: Vec<f32>, dimension: usize) -> Self {
        let size = ids
            .iter()
            .map(|&id| id as usize + 1)
            .max()
            .unwrap_or(0)
            .max(tokenizer.get_vocab_size(true));
        let mut rows = vec![NONE; size];
        for (row, &id) in ids.iter().enumerate() {
            rows[id as usize] = row as u32;
        }
        TokenVectors {
            tokenizer,
            rows,
            vectors,
            dimension,
        }
    }

    /// How many tokens have a vector.
    pub fn tokens(&self) -> usize {
        self.vectors.len() / self.dimension.max(1)
    }

    /// Writes the vectors (f16) and `fingerprint` to `path`, through a
    /// temporary file renamed into place.
    pub fn save(&self, path: &Path, fingerprint: &str) -> Result<(), ModelError> {
        let device = Device::Cpu;
        let ids: Vec<u32> = (0..self.rows.len() as u32)
            .filter(|&id| self.rows[id as usize] != NONE)
            .collect();
        let mut vectors = Vec::with_capacity(self.vectors.len());
        for &id in &ids {
            vectors.extend_from_slice(self.row(id).unwrap_or_default());
        }
        let tensors = HashMap::from([
            ("token_ids", Tensor::new(ids.as_slice(), &device)?),
            (
                "vectors",
                Tensor::from_vec(vectors, (ids.len(), self.dimension), &device)?
                    .to_dtype(DType::F16)?,
            ),
            ("fingerprint", Tensor::new(fingerprint.as_bytes(), &device)?),
        ]);
        let partial = path.with_extension("partial");
        candle_core::safetensors::save(&tensors, &partial)?;
        std::fs::rename(&partial, path).map_err(|error| ModelError::Unreadable {
            path: path.to_path_buf(),
            reason: error.to_string(),
        })
    }

    /// The vectors in `path` if they were made with `fingerprint`; `None`
    /// when the file is missing or stale.
    pub fn load(
        path: &Path,
        fingerprint: &str,
        tokenizer: Tokenizer,
    ) -> Result<Option<Self>, ModelError> {
        if !path.is_file() {
            return Ok(None);
        }
        let unreadable = |reason: String| ModelError::Unreadable {
            path: path.to_path_buf(),
            reason,
        };
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)?;
        let tensor = |name: &str| {
            tensors
                .get(name)
                .ok_or_else(|| unreadable(format!("no tensor {name:?}")))
        };
        if tensor("fingerprint")?.to_vec1::<u8>()? != fingerprint.as_bytes() {
            return Ok(None);
        }
        let ids = tensor("token_ids")?.to_vec1::<u32>()?;
        let vectors = tensor("vectors")?.to_dtype(DType::F32)?;
        let (rows, dimension) = vectors.dims2()?;
        if rows != ids.len() {
            return Err(unreadable(format!("{} ids, {rows} vectors", ids.len())));
        }
        let vectors = vectors.flatten_all()?.to_vec1::<f32>()?;
        Ok(Some(TokenVectors::from_rows(
            tokenizer, &ids, vectors, dimension,
        )))
    }

    /// The vectors for the model in `dir` from [`FILE`], or distilled from
    /// `encoder` (and written there) when the file is missing or stale. A
    /// model directory that cannot be written to only costs the next start
    /// the same distillation; it is logged.
    pub fn load_or_distill(dir: &Path, encoder: &Encoder) -> Result<Self, ModelError> {
        let started = Instant::now();
        let path = dir.join(FILE);
        let fingerprint = fingerprint(dir, encoder.prefix())?;
        if let Some(vectors) = TokenVectors::load(&path, &fingerprint, encoder.tokenizer().clone())?
        {
            info!(
                message = "static token vectors loaded",
                path = %path.display(),
                tokens = vectors.tokens(),
                seconds = started.elapsed().as_secs_f64()
            );
            return Ok(vectors);
        }
        info!(
            message = "distilling static token vectors from the model (minutes; scripts/fetch-model does this ahead)",
            path = %path.display()
        );
        let mut logged = 0;
        let vectors = TokenVectors::distill(encoder, served, |done, total| {
            if done * 10 / total > logged {
                logged = done * 10 / total;
                info!(
                    message = "distilling static token vectors",
                    done,
                    total,
                    seconds = started.elapsed().as_secs_f64()
                );
            }
        })?;
        info!(
            message = "static token vectors distilled",
            tokens = vectors.tokens(),
            seconds = started.elapsed().as_secs_f64()
        );
        if let Err(error) = vectors.save(&path, &fingerprint) {
            warn!(message = "static token vectors not saved; the next start distills again", %error);
        }
        Ok(vectors)
    }

    fn row(&self, id: u32) -> Option<&[f32]> {
        let row = *self.rows.get(id as usize)?;
        (row != NONE).then(|| {
            let start = row as usize * self.dimension;
            &self.vectors[start..start + self.dimension]
        })
    }

    fn embed_one(&self, text: &str) -> Result<Vec<f32>, ModelError> {
        let encoding = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(|error| ModelError::Tokenizer(error.to_string()))?;
        let vectors = encoding.get_ids().iter().filter_map(|&id| self.row(id));
        Ok(unit_sum(vectors, self.dimension))
    }
}

/// A message's vector: its tokens' vectors summed and normalized; all zeros
/// (similar to nothing) when none of its tokens has one.
impl Embedder for TokenVectors {
    /// A batch is spread over the cores; a few texts stay on this thread,
    /// where handing them out would cost more than it saves.
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
        if texts.len() < PARALLEL_FROM {
            texts.iter().map(|text| self.embed_one(text)).collect()
        } else {
            texts.par_iter().map(|text| self.embed_one(text)).collect()
        }
    }

    fn dimension(&self) -> usize {
        self.dimension
    }
}

/// SHA-256 (hex) of the recipe, the prefix and the model files in `dir`.
pub fn fingerprint(dir: &Path, prefix: &str) -> Result<String, ModelError> {
    let mut hasher = Sha256::new();
    hasher.update(RECIPE.as_bytes());
    hasher.update([0]);
    hasher.update(prefix.as_bytes());
    for file in MODEL_FILES {
        let path: PathBuf = dir.join(file);
        let unreadable = |error: std::io::Error| ModelError::Unreadable {
            path: path.clone(),
            reason: error.to_string(),
        };
        let mut reader = std::fs::File::open(&path).map_err(unreadable)?;
        hasher.update([0]);
        std::io::copy(&mut reader, &mut hasher).map_err(unreadable)?;
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Subtracts the mean row from every row.
fn centre(vectors: &mut [f32], dimension: usize) {
    let rows = vectors.len() / dimension.max(1);
    if rows == 0 {
        return;
    }
    let mut mean = vec![0f32; dimension];
    for row in vectors.chunks(dimension) {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += v / rows as f32;
        }
    }
    for row in vectors.chunks_mut(dimension) {
        for (v, m) in row.iter_mut().zip(&mean) {
            *v -= m;
        }
    }
}

/// `a / (a + p)` with `p` the Zipf probability of rank `rank` among
/// `vocabulary` tokens (the tokenizer's id order, which for SentencePiece and
/// most WordPiece vocabularies follows frequency).
fn sif_weight(rank: usize, vocabulary: usize) -> f32 {
    let harmonic = (vocabulary.max(1) as f32).ln() + 0.5772;
    let probability = 1.0 / ((rank + 1) as f32 * harmonic);
    SIF / (SIF + probability)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::tiny_encoder;

    fn not_special(token: &str) -> bool {
        !token.starts_with('[')
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-3)
    }

    fn normalized(v: &[f32]) -> Vec<f32> {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / norm).collect()
    }

    #[test]
    fn served_tokens_are_ascii_cjk_punctuation_and_emoji() {
        for (token, expected) in [
            ("▁hello", true),
            ("##ing", true),
            ("▁", true),
            ("密码", true),
            ("，", true),
            ("…", true),
            ("🎉", true),
            ("é", false),
            ("▁привет", false),
            ("ありがとう", false),
            ("مرحبا", false),
        ] {
            assert_eq!(served(token), expected, "{token:?}");
        }
    }

    #[test]
    fn the_frame_is_the_start_and_prefix_before_and_the_end_after() {
        // tiny_encoder: [CLS] = 2, [SEP] = 3, prefix "please " = 13.
        assert_eq!(tiny_encoder().frame().unwrap(), (vec![2, 13], vec![3]));
    }

    #[test]
    fn a_token_vector_is_the_centred_transformer_embedding_of_the_framed_token() {
        let encoder = tiny_encoder();
        let vectors = TokenVectors::distill(&encoder, not_special, |_, _| {}).unwrap();
        // 18 words, 4 of them special.
        assert_eq!(vectors.tokens(), 14);
        // By hand: every kept token framed and embedded, the mean removed.
        let ids: Vec<u32> = (4..18).collect();
        let framed: Vec<Vec<u32>> = ids.iter().map(|&id| vec![2, 13, id, 3]).collect();
        let framed: Vec<&[u32]> = framed.iter().map(Vec::as_slice).collect();
        let mut by_hand: Vec<f32> = encoder.embed_ids(&framed).unwrap().concat();
        centre(&mut by_hand, encoder.dimension());
        let hello = &by_hand[0..encoder.dimension()]; // id 4
        let world = &by_hand[encoder.dimension()..2 * encoder.dimension()]; // id 5
        let got = vectors.embed(&["hello", "hello world", "zebra"]).unwrap();
        // One token: the direction of its vector, whatever its weight.
        assert!(close(&got[0], &normalized(hello)), "{got:?}");
        // Two: their weighted sum, normalized.
        let (w4, w5) = (
            sif_weight(4, vectors.rows.len()),
            sif_weight(5, vectors.rows.len()),
        );
        assert!(w4 < w5, "the more frequent (lower rank) token weighs less");
        let sum: Vec<f32> = hello
            .iter()
            .zip(world)
            .map(|(h, w)| h * w4 + w * w5)
            .collect();
        assert!(close(&got[1], &normalized(&sum)), "{got:?}");
        // No known token: zeros, similar to nothing.
        assert!(got[2].iter().all(|&v| v == 0.0), "{got:?}");
    }

    #[test]
    fn only_kept_tokens_get_vectors() {
        let encoder = tiny_encoder();
        let vectors =
            TokenVectors::distill(&encoder, |token| token == "refund", |_, _| {}).unwrap();
        assert_eq!(vectors.tokens(), 1);
        let got = vectors.embed(&["hello refund", "hello"]).unwrap();
        assert_eq!(got[0], vectors.embed(&["refund"]).unwrap()[0]);
        assert!(got[1].iter().all(|&v| v == 0.0));
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "botline-token-vectors-{name}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn saved_vectors_load_only_with_their_fingerprint() {
        let encoder = tiny_encoder();
        let mut calls = 0;
        let vectors = TokenVectors::distill(&encoder, not_special, |done, total| {
            calls += 1;
            assert!(done <= total);
        })
        .unwrap();
        assert!(calls >= 1);
        let dir = scratch("save");
        let path = dir.join(FILE);
        vectors.save(&path, "fingerprint-a").unwrap();
        let tokenizer = encoder.tokenizer().clone();
        assert!(
            TokenVectors::load(&path, "fingerprint-b", tokenizer.clone())
                .unwrap()
                .is_none()
        );
        assert!(
            TokenVectors::load(&dir.join("absent"), "fingerprint-a", tokenizer.clone())
                .unwrap()
                .is_none()
        );
        let loaded = TokenVectors::load(&path, "fingerprint-a", tokenizer)
            .unwrap()
            .expect("same fingerprint");
        assert_eq!(loaded.tokens(), vectors.tokens());
        let texts = [
            "hello world",
            "where is my order",
            "thanks",
            "nothing known",
        ];
        for (a, b) in vectors
            .embed(&texts)
            .unwrap()
            .iter()
            .zip(loaded.embed(&texts).unwrap())
        {
            // Stored as f16.
            assert!(close(a, &b), "{a:?} vs {b:?}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_fingerprint_covers_the_prefix_and_every_model_file() {
        let dir = scratch("fingerprint");
        for file in MODEL_FILES {
            std::fs::write(dir.join(file), file).unwrap();
        }
        let first = fingerprint(&dir, "query: ").unwrap();
        assert_eq!(first, fingerprint(&dir, "query: ").unwrap());
        assert_ne!(first, fingerprint(&dir, "passage: ").unwrap());
        for file in MODEL_FILES {
            std::fs::write(dir.join(file), "changed").unwrap();
            assert_ne!(first, fingerprint(&dir, "query: ").unwrap(), "{file}");
            std::fs::write(dir.join(file), file).unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(
            fingerprint(&dir, ""),
            Err(ModelError::Unreadable { .. })
        ));
    }
}
