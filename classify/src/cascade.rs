//! Who decides a message's intent: the exact-text cache first, then — by
//! [`Mode`] — the static token vectors, the transformer, or the static
//! vectors with the transformer only for what they are not sure of. Each
//! message is counted by the path that decided it
//! (`botline_classify_path_total{path}`) and the time of each model path is
//! measured (`botline_classify_path_seconds{path}`), here and nowhere else.

use crate::cache::{self, TextCache};
use crate::embedding::{EmbeddingIntents, Verdict};
use crate::model::ModelError;
use crate::rules::{IntentModel, Understanding};
use serde::Deserialize;
use std::time::Instant;

/// `[classify] embedding_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The transformer for every message.
    Precise,
    /// The static token vectors for every message.
    Fast,
    /// The static vectors, and the transformer where they are not sure.
    Cascade,
}

/// When a static verdict stands without the transformer.
#[derive(Debug, Clone, Copy)]
pub struct Sureness {
    /// Similarity to the closest intent at least this…
    pub min_score: f32,
    /// …and at least this much above the next intent.
    pub min_margin: f32,
}

impl Sureness {
    pub fn accepts(&self, verdict: &Verdict) -> bool {
        verdict.score >= self.min_score && verdict.margin >= self.min_margin
    }
}

/// The models behind the cache, by mode. Each [`EmbeddingIntents`] has its
/// examples embedded by its own embedder.
pub enum Paths {
    Precise(EmbeddingIntents),
    Fast(EmbeddingIntents),
    Cascade {
        fast: EmbeddingIntents,
        precise: EmbeddingIntents,
        sure: Sureness,
    },
}

/// Which path decided a message; the `path` label of the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decider {
    Cache,
    Static,
    Transformer,
    /// The static verdict, not sure, kept because a backlog left the
    /// transformer no time for it (`cascade_backlog_share`).
    StaticBehind,
}

impl Decider {
    const ALL: [Decider; 4] = [
        Decider::Cache,
        Decider::Static,
        Decider::Transformer,
        Decider::StaticBehind,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Decider::Cache => "cache",
            Decider::Static => "static",
            Decider::Transformer => "transformer",
            Decider::StaticBehind => "static_behind",
        }
    }
}

pub struct Cascade {
    paths: Paths,
    cache: TextCache,
    /// Behind a backlog, the transformer sees at most this share of a
    /// batch (the least sure first); 1: all the unsure, as always.
    backlog_share: f32,
}

impl Cascade {
    /// `cache_size` entries of exact-text cache (0: none) in front of `paths`.
    pub fn new(paths: Paths, cache_size: usize) -> Self {
        Cascade {
            paths,
            cache: TextCache::new(cache_size),
            backlog_share: 1.0,
        }
    }

    /// Behind a backlog ([`Cascade::decide_behind`]), send the transformer
    /// at most `share` of a batch (rounded up).
    pub fn with_backlog_share(mut self, share: f32) -> Self {
        self.backlog_share = share;
        self
    }

    /// Each text's understanding and the path that decided it, in order.
    pub fn decide(&self, texts: &[&str]) -> Result<Vec<(Understanding, Decider)>, ModelError> {
        self.decide_with(texts, texts.len())
    }

    /// [`Cascade::decide`] with more waiting behind `texts`: in `cascade`
    /// mode only the least sure `backlog_share` of them go to the
    /// transformer, the others keep their static verdict
    /// ([`Decider::StaticBehind`]), so the stage catches up.
    pub fn decide_behind(
        &self,
        texts: &[&str],
    ) -> Result<Vec<(Understanding, Decider)>, ModelError> {
        let most = (self.backlog_share.clamp(0.0, 1.0) * texts.len() as f32).ceil() as usize;
        self.decide_with(texts, most)
    }

    /// At most `most` texts go to the transformer in `cascade` mode.
    fn decide_with(
        &self,
        texts: &[&str],
        most: usize,
    ) -> Result<Vec<(Understanding, Decider)>, ModelError> {
        let keys: Vec<Option<String>> = texts.iter().map(|text| cache::key(text)).collect();
        let mut decided: Vec<Option<(Understanding, Decider)>> = keys
            .iter()
            .map(|key| {
                let cached = key.as_deref().and_then(|key| self.cache.get(key));
                cached.map(|understanding| (understanding, Decider::Cache))
            })
            .collect();
        let open: Vec<usize> = (0..texts.len()).filter(|&i| decided[i].is_none()).collect();
        let open = match &self.paths {
            Paths::Precise(_) => open,
            Paths::Fast(fast) => {
                run(fast, Decider::Static, texts, open, &mut decided, |_| true)?;
                Vec::new()
            }
            Paths::Cascade { fast, sure, .. } => {
                let mut unsure = run(
                    fast,
                    Decider::Static,
                    texts,
                    open,
                    &mut decided,
                    |verdict| sure.accepts(verdict),
                )?;
                // The least sure first; those beyond `most` stay static.
                unsure.sort_by(|(_, a), (_, b)| a.score.total_cmp(&b.score));
                for (i, verdict) in unsure.drain(most.min(unsure.len())..) {
                    decided[i] = Some((verdict.understanding, Decider::StaticBehind));
                }
                unsure.into_iter().map(|(i, _)| i).collect()
            }
        };
        match &self.paths {
            Paths::Precise(precise) | Paths::Cascade { precise, .. } => {
                run(
                    precise,
                    Decider::Transformer,
                    texts,
                    open,
                    &mut decided,
                    |_| true,
                )?;
            }
            Paths::Fast(_) => {}
        }
        let decided: Vec<(Understanding, Decider)> = decided.into_iter().flatten().collect();
        for (key, (understanding, decider)) in keys.into_iter().zip(&decided) {
            // A verdict kept only for want of time is not remembered.
            let fresh = matches!(decider, Decider::Static | Decider::Transformer);
            if let (Some(key), true) = (key, fresh) {
                self.cache.put(key, understanding.clone());
            }
        }
        for decider in Decider::ALL {
            let count = decided.iter().filter(|(_, d)| *d == decider).count();
            if count > 0 {
                metrics::counter!("botline_classify_path_total", "path" => decider.as_str())
                    .increment(count as u64);
            }
        }
        Ok(decided)
    }
}

/// Judges the texts at `open` with `intents`; those whose verdict `accept`s
/// are decided by `decider`, the others are returned with their verdicts
/// for the next path.
fn run(
    intents: &EmbeddingIntents,
    decider: Decider,
    texts: &[&str],
    open: Vec<usize>,
    decided: &mut [Option<(Understanding, Decider)>],
    accept: impl Fn(&Verdict) -> bool,
) -> Result<Vec<(usize, Verdict)>, ModelError> {
    if open.is_empty() {
        return Ok(Vec::new());
    }
    let started = Instant::now();
    let batch: Vec<&str> = open.iter().map(|&i| texts[i]).collect();
    let verdicts = intents.verdicts(&batch)?;
    metrics::histogram!("botline_classify_path_seconds", "path" => decider.as_str())
        .record(started.elapsed().as_secs_f64());
    let mut rest = Vec::new();
    for (i, verdict) in open.into_iter().zip(verdicts) {
        if accept(&verdict) {
            decided[i] = Some((verdict.understanding, decider));
        } else {
            rest.push((i, verdict));
        }
    }
    Ok(rest)
}

/// The understandings alone, errors as text.
fn understood(
    decided: Result<Vec<(Understanding, Decider)>, ModelError>,
) -> Result<Vec<Understanding>, String> {
    Ok(decided
        .map_err(|error| error.to_string())?
        .into_iter()
        .map(|(understanding, _)| understanding)
        .collect())
}

impl IntentModel for Cascade {
    fn understand(&self, texts: &[&str]) -> Result<Vec<Understanding>, String> {
        understood(self.decide(texts))
    }

    fn understand_behind(&self, texts: &[&str]) -> Result<Vec<Understanding>, String> {
        understood(self.decide_behind(texts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedding::{FaqEntry, IntentExamples, Matching, Thresholds};
    use crate::model::{Embedder, ModelError};
    use botline_shared::message::Intent;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    /// Each text's vector from a table; remembers what it was asked.
    struct Table {
        vectors: HashMap<&'static str, [f32; 2]>,
        asked: Mutex<Vec<String>>,
    }

    impl Table {
        fn new(rows: &[(&'static str, [f32; 2])]) -> Arc<Self> {
            Arc::new(Table {
                vectors: rows.iter().copied().collect(),
                asked: Mutex::new(Vec::new()),
            })
        }

        fn asked(&self) -> Vec<String> {
            std::mem::take(&mut self.asked.lock().unwrap())
        }
    }

    impl Embedder for Table {
        fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
            texts
                .iter()
                .map(|text| {
                    self.asked.lock().unwrap().push(text.to_string());
                    let [x, y] = *self
                        .vectors
                        .get(cache::key(text).unwrap().as_str())
                        .ok_or_else(|| ModelError::Tokenizer(format!("no vector for {text}")))?;
                    let norm = (x * x + y * y).sqrt();
                    Ok(vec![x / norm, y / norm])
                })
                .collect()
        }

        fn dimension(&self) -> usize {
            2
        }
    }

    fn intents(embedder: Arc<Table>) -> EmbeddingIntents {
        let intent = |name: &str, example: &str| IntentExamples {
            name: name.into(),
            examples: vec![example.into()],
        };
        EmbeddingIntents::new(
            embedder,
            &[intent("east", "e"), intent("north", "n")],
            &[] as &[FaqEntry],
            Thresholds {
                matching: Matching::Centroid,
                unknown: 0.5,
                faq: 0.9,
            },
        )
        .unwrap()
    }

    /// The static table is sure of "sure east", unsure of "unsure"; the
    /// transformer's table sees both as north, so who decided shows.
    fn tables() -> (Arc<Table>, Arc<Table>) {
        let fast = Table::new(&[
            ("e", [1.0, 0.0]),
            ("n", [0.0, 1.0]),
            ("sure east", [1.0, 0.05]),
            // east 0.74, north 0.67: a margin of 0.07.
            ("unsure", [1.0, 0.9]),
        ]);
        let precise = Table::new(&[
            ("e", [1.0, 0.0]),
            ("n", [0.0, 1.0]),
            ("sure east", [0.0, 1.0]),
            ("unsure", [0.1, 1.0]),
        ]);
        fast.asked();
        precise.asked();
        (fast, precise)
    }

    /// The cascade of the two tables with [`sure`] and `cache_size`.
    fn cascade_of(fast: Arc<Table>, precise: Arc<Table>, cache_size: usize) -> Cascade {
        Cascade::new(
            Paths::Cascade {
                fast: intents(fast),
                precise: intents(precise),
                sure: sure(),
            },
            cache_size,
        )
    }

    fn sure() -> Sureness {
        Sureness {
            min_score: 0.8,
            min_margin: 0.1,
        }
    }

    fn names(decided: &[(Understanding, Decider)]) -> Vec<(&str, Decider)> {
        decided
            .iter()
            .map(|(u, decider)| (u.intent.name.as_str(), *decider))
            .collect()
    }

    #[test]
    fn the_transformer_sees_only_what_the_static_path_is_unsure_of() {
        let (fast, precise) = tables();
        let cascade = cascade_of(fast.clone(), precise.clone(), 10);
        fast.asked();
        precise.asked();
        let decided = cascade.decide(&["sure east", "unsure"]).unwrap();
        assert_eq!(
            names(&decided),
            [("east", Decider::Static), ("north", Decider::Transformer)]
        );
        assert_eq!(fast.asked(), ["sure east", "unsure"]);
        assert_eq!(precise.asked(), ["unsure"]);
        // Again, in other case and spacing: the cache answers, no model runs.
        let decided = cascade.decide(&["UNSURE ", "Sure  east"]).unwrap();
        assert_eq!(
            names(&decided),
            [("north", Decider::Cache), ("east", Decider::Cache)]
        );
        assert!(fast.asked().is_empty() && precise.asked().is_empty());
    }

    #[test]
    fn behind_a_backlog_the_transformer_sees_only_the_least_sure_share() {
        let fast = Table::new(&[
            ("e", [1.0, 0.0]),
            ("n", [0.0, 1.0]),
            ("sure east", [1.0, 0.05]),
            // All unsure of east: "least" the least (0.71), "less" next.
            ("least", [1.0, 0.99]),
            ("less", [1.0, 0.9]),
            ("unsure", [1.0, 0.8]),
        ]);
        let precise = Table::new(&[
            ("e", [1.0, 0.0]),
            ("n", [0.0, 1.0]),
            ("least", [0.1, 1.0]),
            ("less", [0.1, 1.0]),
            ("unsure", [0.1, 1.0]),
        ]);
        let cascade = cascade_of(fast.clone(), precise.clone(), 10).with_backlog_share(0.4);
        precise.asked();
        let texts = ["unsure", "sure east", "least", "less", "unsure"];
        // 40% of 5: two, the least sure.
        let decided = cascade.decide_behind(&texts).unwrap();
        assert_eq!(
            names(&decided),
            [
                ("east", Decider::StaticBehind),
                ("east", Decider::Static),
                ("north", Decider::Transformer),
                ("north", Decider::Transformer),
                ("east", Decider::StaticBehind),
            ]
        );
        assert_eq!(precise.asked(), ["least", "less"]);
        // Verdicts kept for want of time are not cached: without a backlog
        // the transformer has them.
        let decided = cascade.decide(&["unsure", "least"]).unwrap();
        assert_eq!(
            names(&decided),
            [("north", Decider::Transformer), ("north", Decider::Cache)]
        );
        assert_eq!(precise.asked(), ["unsure"]);
        // A share of 1 is the cascade as always; of 0, the static path alone.
        let all = cascade_of(fast.clone(), precise.clone(), 0);
        assert!(all
            .decide_behind(&texts)
            .unwrap()
            .iter()
            .all(|(_, decider)| *decider != Decider::StaticBehind));
        let none = all.with_backlog_share(0.0);
        precise.asked();
        assert_eq!(
            none.decide_behind(&texts).unwrap()[2].1,
            Decider::StaticBehind
        );
        assert!(precise.asked().is_empty());
    }

    #[test]
    fn precise_and_fast_use_one_path_and_a_cache_of_zero_keeps_nothing() {
        let (fast, precise) = tables();
        let only_precise = Cascade::new(Paths::Precise(intents(precise.clone())), 0);
        let only_fast = Cascade::new(Paths::Fast(intents(fast.clone())), 0);
        // The examples were embedded; only what follows counts.
        fast.asked();
        precise.asked();
        for _ in 0..2 {
            assert_eq!(
                names(&only_precise.decide(&["sure east", "unsure"]).unwrap()),
                [
                    ("north", Decider::Transformer),
                    ("north", Decider::Transformer)
                ]
            );
            assert_eq!(
                names(&only_fast.decide(&["sure east", "unsure"]).unwrap()),
                [("east", Decider::Static), ("east", Decider::Static)]
            );
        }
        assert_eq!(precise.asked().len(), 4);
        assert_eq!(fast.asked().len(), 4);
    }

    #[test]
    fn sureness_needs_both_score_and_margin() {
        let verdict = |score, margin| Verdict {
            understanding: Understanding {
                intent: Intent {
                    name: "east".into(),
                    confidence: score,
                },
                faq: None,
            },
            score,
            margin,
        };
        let sure = sure();
        assert!(sure.accepts(&verdict(0.9, 0.2)));
        assert!(sure.accepts(&verdict(0.8, 0.1)));
        assert!(!sure.accepts(&verdict(0.79, 0.5)));
        assert!(!sure.accepts(&verdict(0.95, 0.09)));
    }

    #[test]
    fn a_model_error_is_reported_and_nothing_is_cached() {
        let (fast, precise) = tables();
        let cascade = cascade_of(fast, precise, 10);
        let error = cascade
            .understand(&["sure east", "no such text"])
            .unwrap_err();
        assert!(error.contains("no such text"), "{error}");
        assert_eq!(
            cascade.classify(&["no such text"])[0].name,
            crate::rules::UNKNOWN_INTENT
        );
        assert_eq!(cascade.cache.len(), 0);
    }
}

#[cfg(test)]
mod tiny_model_tests {
    use super::*;
    use crate::embedding::{IntentExamples, Matching, Thresholds};
    use crate::model::tests::tiny_encoder;
    use crate::token_vectors::TokenVectors;
    use std::sync::Arc;

    fn intents(embedder: Arc<dyn crate::model::Embedder>) -> EmbeddingIntents {
        let intent = |name: &str, examples: &[&str]| IntentExamples {
            name: name.into(),
            examples: examples.iter().map(|e| e.to_string()).collect(),
        };
        EmbeddingIntents::new(
            embedder,
            &[
                intent("greeting", &["hello", "hello world"]),
                intent("refund_request", &["refund my order", "refund"]),
                intent("account_password", &["reset my password", "password"]),
            ],
            &[],
            Thresholds {
                matching: Matching::NearestExample,
                unknown: 0.0,
                faq: 1.0,
            },
        )
        .unwrap()
    }

    /// The cascade with a real (tiny) transformer and its distilled vectors:
    /// never sure, it is the transformer; always sure, the static vectors.
    #[test]
    fn the_cascade_between_a_tiny_bert_and_its_static_vectors() {
        let encoder = Arc::new(tiny_encoder());
        let vectors = Arc::new(
            TokenVectors::distill(&encoder, |token| !token.starts_with('['), |_, _| {}).unwrap(),
        );
        let texts = [
            "hello",
            "refund please",
            "where is my order",
            "reset password",
            "thanks a b c",
        ];
        let run = |paths: Paths| -> Vec<(Understanding, Decider)> {
            Cascade::new(paths, 0).decide(&texts).unwrap()
        };
        let precise = run(Paths::Precise(intents(encoder.clone())));
        let fast = run(Paths::Fast(intents(vectors.clone())));
        let cascade = |min: f32| {
            run(Paths::Cascade {
                fast: intents(vectors.clone()),
                precise: intents(encoder.clone()),
                sure: Sureness {
                    min_score: min,
                    min_margin: min,
                },
            })
        };
        assert_eq!(cascade(3.0), precise);
        assert_eq!(cascade(-3.0), fast);
        assert!(precise.iter().all(|(_, d)| *d == Decider::Transformer));
        assert!(fast.iter().all(|(_, d)| *d == Decider::Static));
        // An example is its own nearest example on either path.
        for decided in [&precise, &fast] {
            assert_eq!(decided[0].0.intent.name, "greeting");
        }
    }
}
