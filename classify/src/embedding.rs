//! Intents and FAQ entries from sentence embeddings. Each intent is known by
//! its example utterances, each FAQ entry by its question; all are embedded
//! once at start. A message goes to the intent whose examples it is closest
//! to (cosine), or to `unknown` when even the best is below the threshold;
//! the best FAQ entry above its own threshold rides along. With
//! `intent_matching = "linear"` a small softmax regression trained on the
//! examples at start ([`LinearHead`]) scores the intents instead. Either
//! way adding an intent is adding examples: no training step for a user.
//!
//! The classifier only sees vectors, so any [`Embedder`] serves: the
//! transformer, or the static token vectors of the fast path; each set of
//! intents is embedded by the embedder that will judge against it.

use crate::head::LinearHead;
use crate::model::{cosine, Embedder, ModelError};
use crate::rules::{Understanding, UNKNOWN_INTENT};
use botline_shared::message::{FaqMatch, Intent};
use serde::Deserialize;
use std::sync::Arc;

/// How a message is compared with an intent's examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Matching {
    /// With the normalized mean of the examples: one vector per intent.
    Centroid,
    /// With the closest single example.
    NearestExample,
    /// By a softmax regression trained on the examples at start
    /// ([`LinearHead`]); the confidence is its probability.
    Linear,
}

/// How an embedding is scored against the intents.
enum Scorer {
    Cosine(Index),
    Linear(LinearHead),
}

impl Scorer {
    fn new(groups: Vec<Vec<Vec<f32>>>, matching: Matching) -> Result<Scorer, ModelError> {
        Ok(match matching {
            Matching::Linear => Scorer::Linear(LinearHead::train(&groups)?),
            cosine => Scorer::Cosine(Index::new(groups, cosine)),
        })
    }

    fn best(&self, query: &[f32]) -> Option<Best> {
        match self {
            Scorer::Cosine(index) => index.best(query),
            Scorer::Linear(head) => head.best(query),
        }
    }
}

/// Labelled unit vectors searched by cosine similarity.
pub struct Index {
    vectors: Vec<Vec<f32>>,
    labels: Vec<usize>,
}

impl Index {
    /// `groups[label]` are the vectors of one label. (`Linear` is scored by
    /// a [`LinearHead`]; given here, it means centroids.)
    pub fn new(groups: Vec<Vec<Vec<f32>>>, matching: Matching) -> Index {
        let mut vectors = Vec::new();
        let mut labels = Vec::new();
        for (label, group) in groups.into_iter().enumerate() {
            match matching {
                Matching::NearestExample => {
                    labels.extend(std::iter::repeat_n(label, group.len()));
                    vectors.extend(group);
                }
                Matching::Centroid | Matching::Linear => {
                    if let Some(centroid) = centroid(&group) {
                        labels.push(label);
                        vectors.push(centroid);
                    }
                }
            }
        }
        Index { vectors, labels }
    }

    /// The closest label, its similarity, and how much closer it is than
    /// the closest vector of any other label (its whole similarity when no
    /// other label has one).
    pub fn best(&self, query: &[f32]) -> Option<Best> {
        let labels = self.labels.iter().max()? + 1;
        let mut per_label = vec![f32::NEG_INFINITY; labels];
        for (vector, &label) in self.vectors.iter().zip(&self.labels) {
            per_label[label] = per_label[label].max(cosine(vector, query));
        }
        let (label, score) = per_label
            .iter()
            .copied()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(&b.1))?;
        let runner_up = per_label
            .iter()
            .enumerate()
            .filter(|&(other, _)| other != label)
            .map(|(_, &score)| score)
            .fold(f32::NEG_INFINITY, f32::max);
        Some(Best {
            label,
            score,
            margin: score
                - if runner_up.is_finite() {
                    runner_up
                } else {
                    0.0
                },
        })
    }
}

/// The label closest to a query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Best {
    pub label: usize,
    pub score: f32,
    pub margin: f32,
}

fn centroid(group: &[Vec<f32>]) -> Option<Vec<f32>> {
    let first = group.first()?;
    let mut sum = vec![0f32; first.len()];
    for vector in group {
        for (s, v) in sum.iter_mut().zip(vector) {
            *s += v;
        }
    }
    let norm = sum.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    Some(sum.into_iter().map(|v| v / norm).collect())
}

/// An intent and the utterances that show it.
#[derive(Debug, Clone)]
pub struct IntentExamples {
    pub name: String,
    pub examples: Vec<String>,
}

/// `[[classify.faq]]`: a question people ask and the answer respond gives.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaqEntry {
    pub question: String,
    pub answer: String,
    /// A picture sent with the answer: read (and checked) by respond, not here.
    #[serde(default)]
    pub image: Option<String>,
}

/// What is compared with what, and how close is close enough.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    pub matching: Matching,
    /// Below this similarity to every intent a message is `unknown`.
    pub unknown: f32,
    /// Below this similarity to every FAQ question no entry is attached.
    pub faq: f32,
}

/// What the intents make of one embedding, and how sure they are.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub understanding: Understanding,
    /// Similarity to the closest intent, whether or not above the threshold.
    pub score: f32,
    /// How much closer the closest intent is than the next one.
    pub margin: f32,
}

pub struct EmbeddingIntents {
    embedder: Arc<dyn Embedder>,
    names: Vec<String>,
    intents: Scorer,
    faq: Vec<FaqEntry>,
    questions: Index,
    thresholds: Thresholds,
}

impl EmbeddingIntents {
    /// Embeds every example and question (once, here).
    pub fn new(
        embedder: Arc<dyn Embedder>,
        intents: &[IntentExamples],
        faq: &[FaqEntry],
        thresholds: Thresholds,
    ) -> Result<Self, ModelError> {
        let groups = intents
            .iter()
            .map(|intent| {
                let texts: Vec<&str> = intent.examples.iter().map(String::as_str).collect();
                embedder.embed(&texts)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let questions: Vec<&str> = faq.iter().map(|entry| entry.question.as_str()).collect();
        let questions = embedder
            .embed(&questions)?
            .into_iter()
            .map(|vector| vec![vector])
            .collect();
        Ok(EmbeddingIntents {
            embedder,
            names: intents.iter().map(|intent| intent.name.clone()).collect(),
            intents: Scorer::new(groups, thresholds.matching)?,
            faq: faq.to_vec(),
            questions: Index::new(questions, Matching::NearestExample),
            thresholds,
        })
    }

    /// The verdict on one embedding.
    pub fn judge(&self, embedding: &[f32]) -> Verdict {
        let best = self.intents.best(embedding);
        let intent = match best {
            Some(best) if best.score >= self.thresholds.unknown => Intent {
                name: self.names[best.label].clone(),
                confidence: best.score.clamp(0.0, 1.0),
            },
            _ => Intent {
                name: UNKNOWN_INTENT.into(),
                // How sure it is that none fits.
                confidence: (1.0 - best.map_or(0.0, |best| best.score)).clamp(0.0, 1.0),
            },
        };
        let faq = match self.questions.best(embedding) {
            Some(Best { label, score, .. }) if score >= self.thresholds.faq => Some(FaqMatch {
                question: self.faq[label].question.clone(),
                answer: self.faq[label].answer.clone(),
                score: score.clamp(0.0, 1.0),
            }),
            _ => None,
        };
        Verdict {
            understanding: Understanding { intent, faq },
            score: best.map_or(0.0, |best| best.score),
            margin: best.map_or(0.0, |best| best.margin),
        }
    }

    /// The closest intent and its similarity, whatever the threshold (for calibration).
    pub fn closest(&self, embedding: &[f32]) -> Option<(&str, f32)> {
        self.intents
            .best(embedding)
            .map(|best| (self.names[best.label].as_str(), best.score))
    }

    /// One verdict per text, in order.
    pub fn verdicts(&self, texts: &[&str]) -> Result<Vec<Verdict>, ModelError> {
        Ok(self
            .embedder
            .embed(texts)?
            .iter()
            .map(|embedding| self.judge(embedding))
            .collect())
    }

    pub fn embedder(&self) -> &Arc<dyn Embedder> {
        &self.embedder
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Texts are vectors already: "x,y" → the unit vector (x, y).
    struct Literal;

    impl Embedder for Literal {
        fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
            Ok(texts
                .iter()
                .map(|text| {
                    let v: Vec<f32> = text.split(',').map(|x| x.parse().unwrap()).collect();
                    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                    v.into_iter().map(|x| x / norm).collect()
                })
                .collect())
        }

        fn dimension(&self) -> usize {
            2
        }
    }

    fn model(matching: Matching) -> EmbeddingIntents {
        let intent = |name: &str, examples: &[&str]| IntentExamples {
            name: name.into(),
            examples: examples.iter().map(|e| e.to_string()).collect(),
        };
        EmbeddingIntents::new(
            Arc::new(Literal),
            &[
                // east: one example far off the others, pulling the centroid.
                intent("east", &["1,0", "1,0.1", "1,-0.1", "0.2,1"]),
                intent("north", &["0,1", "-0.1,1"]),
            ],
            &[FaqEntry {
                question: "-1,0".into(),
                answer: "west".into(),
                image: None,
            }],
            Thresholds {
                matching,
                unknown: 0.8,
                faq: 0.9,
            },
        )
        .unwrap()
    }

    #[test]
    fn centroids_nearest_examples_thresholds_and_faq() {
        let check = |matching: Matching, text: &str, intent: &str, faq: Option<&str>| {
            let understood = model(matching)
                .verdicts(&[text])
                .unwrap()
                .remove(0)
                .understanding;
            let got = understood.intent.clone();
            assert_eq!(
                (
                    got.name.as_str(),
                    understood.faq.as_ref().map(|f| f.answer.as_str())
                ),
                (intent, faq),
                "{matching:?} {text:?}"
            );
            assert!((0.0..=1.0).contains(&got.confidence), "{got:?}");
        };
        check(Matching::Centroid, "1,0", "east", None);
        check(Matching::Centroid, "0,1", "north", None);
        // Nearer the odd east example than any north one, but nearer the
        // north centroid than the east one.
        check(Matching::NearestExample, "0.25,1", "east", None);
        check(Matching::Centroid, "0.25,1", "north", None);
        // Far from everything: unknown, and the west FAQ entry.
        check(Matching::Centroid, "-1,0", UNKNOWN_INTENT, Some("west"));
        check(
            Matching::NearestExample,
            "-1,-0.1",
            UNKNOWN_INTENT,
            Some("west"),
        );
        check(Matching::Centroid, "-1,-1", UNKNOWN_INTENT, None);
    }

    #[test]
    fn confidence_is_the_similarity() {
        let got = model(Matching::NearestExample)
            .verdicts(&["1,0"])
            .unwrap()
            .remove(0)
            .understanding
            .intent;
        assert_eq!(got.name, "east");
        assert!((got.confidence - 1.0).abs() < 1e-6, "{got:?}");
    }
}

#[cfg(test)]
mod tiny_model_tests {
    use super::*;
    use crate::model::tests::tiny_encoder;

    #[test]
    fn a_tiny_bert_classifies_its_own_examples() {
        let intent = |name: &str, examples: &[&str]| IntentExamples {
            name: name.into(),
            examples: examples.iter().map(|e| e.to_string()).collect(),
        };
        let intents = [
            intent("greeting", &["hello", "hello world"]),
            intent("refund_request", &["refund my order", "refund"]),
            intent("account_password", &["reset my password", "password"]),
        ];
        let faq = [FaqEntry {
            question: "where is my order".into(),
            answer: "on its way".into(),
            image: Some("https://x.test/parcel.png".into()),
        }];
        for matching in [Matching::Centroid, Matching::NearestExample] {
            let model = EmbeddingIntents::new(
                Arc::new(tiny_encoder()),
                &intents,
                &faq,
                Thresholds {
                    matching,
                    unknown: 0.5,
                    faq: 0.999,
                },
            )
            .unwrap();
            let understood: Vec<Understanding> = model
                .verdicts(&["refund", "where is my order", "hello"])
                .unwrap()
                .into_iter()
                .map(|verdict| verdict.understanding)
                .collect();
            assert_eq!(
                understood[1].faq.as_ref().map(|f| f.answer.as_str()),
                Some("on its way")
            );
            assert!(understood[1].faq.as_ref().unwrap().score > 0.999);
            if matching == Matching::NearestExample {
                // An example is its own nearest example, similarity 1.
                assert_eq!(understood[0].intent.name, "refund_request");
                assert!(understood[0].intent.confidence > 0.999);
                assert_eq!(understood[2].intent.name, "greeting");
            }
            assert_eq!(understood[0].faq, None);
        }
    }
}
