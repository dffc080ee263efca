//! classify reads normalized messages from `in` (group `classify`), decides
//! each one's priority, intent and sensitive-word hits, and writes it to
//! its partition's `q` for respond (every priority in one stream, so a
//! chat's messages stay in order; respond serves urgent chats first). It owns no state: every
//! replica is interchangeable. The intent comes from an [`rules::IntentModel`]
//! run off the async threads a batch at a time: keyword rules, or a sentence
//! encoder ([`model`]) whose embeddings are matched against each intent's
//! example utterances and the FAQ questions ([`embedding`]); the FAQ entry
//! found rides along to respond. The encoder is costly, so by default
//! ([`cascade`]) an exact-text cache ([`cache`]) and static token vectors
//! distilled from it ([`token_vectors`]) decide what they can, and the
//! transformer sees only the rest.

pub mod bert;
pub mod cache;
pub mod cascade;
pub mod embedding;
pub mod head;
pub mod model;
pub mod rules;
pub mod token_vectors;

use botline_shared::config::Settings;
use botline_shared::message::{ClassifiedMessage, Intent, Priority, UnifiedMessage};
use botline_shared::runner::{self, Envelope, Fence, Outcome, Plumbing, Stage, Write};
use botline_shared::streams::{group, Partition, Streams};
use botline_shared::Error;
use cascade::{Cascade, Mode, Paths, Sureness};
use embedding::{EmbeddingIntents, FaqEntry, IntentExamples, Matching, Thresholds};
use model::{Embedder, Encoder};
use rules::{Audit, IntentModel, KeywordIntents, Understanding, UrgentRules};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use token_vectors::TokenVectors;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Where the sentence encoder is when `BOTLINE_MODEL_PATH` does not say.
pub const DEFAULT_MODEL_PATH: &str = "models/e5-small";

/// `[classify]`: the rules. Every default is in the shipped defaults.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifySettings {
    /// Words that make a message urgent (English and Chinese by default).
    pub urgent_keywords: Vec<String>,
    /// Regular expressions that make a message urgent.
    pub urgent_patterns: Vec<String>,
    /// Intents whose messages are urgent whatever their words.
    pub urgent_intents: Vec<String>,
    /// Words the audit looks for; hits are counted and marked on the message.
    pub sensitive_words: Vec<String>,
    /// Intent name → its keywords and example utterances. Keyword ties go to
    /// the name first in sort order.
    pub intents: BTreeMap<String, IntentRule>,
    /// `keywords` or `embedding` (the model in `BOTLINE_MODEL_PATH`).
    pub intent_model: IntentModelKind,
    /// Put before each text given to the model; when unset, the
    /// `query_prefix` of the model's config.json (e5: `query: `), or none.
    #[serde(default)]
    pub model_prefix: Option<String>,
    /// Longer texts are cut to this many tokens before the model sees them.
    pub model_max_tokens: usize,
    /// `centroid` (mean of an intent's examples) or `nearest_example`.
    pub intent_matching: Matching,
    /// Cosine similarity below which a message is `unknown`.
    pub unknown_threshold: f32,
    /// Cosine similarity an FAQ question needs to be attached.
    pub faq_threshold: f32,
    /// `precise` (transformer), `fast` (static token vectors) or `cascade`
    /// (static, transformer where the static verdict is not sure).
    pub embedding_mode: Mode,
    /// `unknown_threshold` for the static token vectors.
    pub static_unknown_threshold: f32,
    /// `faq_threshold` for the static token vectors.
    pub static_faq_threshold: f32,
    /// In `cascade`, a static verdict stands when its similarity is at least
    /// this…
    pub cascade_min_score: f32,
    /// …and at least this much above the next intent's.
    pub cascade_min_margin: f32,
    /// When a read comes back full (a backlog), the transformer sees at
    /// most this share of it, the least sure first; 1: all the unsure.
    pub cascade_backlog_share: f32,
    /// Entries of the exact-text cache in front of the model; 0 turns it off.
    pub intent_cache_size: usize,
    /// Questions and answers; the closest one (embedding model only) is
    /// attached to the message for respond.
    #[serde(default)]
    pub faq: Vec<FaqEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntentRule {
    pub keywords: Vec<String>,
    /// Utterances that mean this intent, any language; the embedding model
    /// needs a few (ten or so, in each language served).
    #[serde(default)]
    pub examples: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IntentModelKind {
    Keywords,
    Embedding,
}

/// The pure part: priority and audit for one message whose intent is known.
pub struct Classifier {
    urgent: UrgentRules,
    urgent_intents: HashSet<String>,
    audit: Audit,
}

impl Classifier {
    pub fn new(settings: &ClassifySettings) -> Result<Self, Error> {
        Ok(Classifier {
            urgent: UrgentRules::new(&settings.urgent_keywords, &settings.urgent_patterns)
                .map_err(|(setting, reason)| Error::config(setting, reason))?,
            urgent_intents: settings.urgent_intents.iter().cloned().collect(),
            audit: Audit::new(&settings.sensitive_words)
                .map_err(|reason| Error::config("classify.sensitive_words", reason))?,
        })
    }

    pub fn classify(&self, message: UnifiedMessage, intent: Intent) -> ClassifiedMessage {
        let priority = if message.origin.is_announcement() {
            Priority::Batch
        } else if self.urgent_intents.contains(&intent.name) || self.urgent.is_urgent(&message.text)
        {
            Priority::Urgent
        } else {
            Priority::Normal
        };
        let audit = self.audit.hits(&message.text);
        ClassifiedMessage {
            message,
            priority,
            intent,
            audit,
            faq: None,
        }
    }
}

/// The keyword intent model described by the settings.
pub fn keyword_model(settings: &ClassifySettings) -> Result<KeywordIntents, Error> {
    let intents: Vec<(String, Vec<String>)> = settings
        .intents
        .iter()
        .map(|(name, rule)| (name.clone(), rule.keywords.clone()))
        .collect();
    KeywordIntents::new(&intents).map_err(|reason| Error::config("classify.intents", reason))
}

/// The encoder in `model_path` with the settings' prefix and length.
pub fn load_encoder(settings: &ClassifySettings, model_path: &Path) -> Result<Encoder, Error> {
    Encoder::load(
        model_path,
        settings.model_prefix.as_deref(),
        settings.model_max_tokens,
    )
    .map_err(|error| Error::config("BOTLINE_MODEL_PATH", error))
}

/// The intents and FAQ of the settings, embedded by `embedder`, judged with
/// these thresholds (`unknown`, `faq`: settings named for errors).
fn intents_with(
    settings: &ClassifySettings,
    embedder: Arc<dyn Embedder>,
    (unknown_setting, unknown): (&str, f32),
    (faq_setting, faq): (&str, f32),
) -> Result<EmbeddingIntents, Error> {
    let intents: Vec<IntentExamples> = settings
        .intents
        .iter()
        .map(|(name, rule)| IntentExamples {
            name: name.clone(),
            examples: rule.examples.clone(),
        })
        .collect();
    if let Some(bare) = intents.iter().find(|intent| intent.examples.is_empty()) {
        return Err(Error::config(
            format!("classify.intents.{}.examples", bare.name),
            "the embedding model needs example utterances for every intent",
        ));
    }
    for (setting, value) in [(unknown_setting, unknown), (faq_setting, faq)] {
        if !(-1.0..=1.0).contains(&value) {
            return Err(Error::config(
                setting,
                "a cosine similarity or probability, -1 to 1",
            ));
        }
    }
    EmbeddingIntents::new(
        embedder,
        &intents,
        &settings.faq,
        Thresholds {
            matching: settings.intent_matching,
            unknown,
            faq,
        },
    )
    .map_err(|error| Error::config("BOTLINE_MODEL_PATH", error))
}

/// The transformer intents: `encoder` with `unknown_threshold` and `faq_threshold`.
pub fn transformer_intents(
    settings: &ClassifySettings,
    encoder: Arc<Encoder>,
) -> Result<EmbeddingIntents, Error> {
    intents_with(
        settings,
        encoder,
        ("classify.unknown_threshold", settings.unknown_threshold),
        ("classify.faq_threshold", settings.faq_threshold),
    )
}

/// The static intents: token vectors distilled from `encoder` (cached in
/// `model_path`), with the `static_` thresholds. Minutes when the vectors
/// must be distilled.
pub fn static_intents(
    settings: &ClassifySettings,
    model_path: &Path,
    encoder: &Encoder,
) -> Result<EmbeddingIntents, Error> {
    let vectors = TokenVectors::load_or_distill(model_path, encoder)
        .map_err(|error| Error::config("BOTLINE_MODEL_PATH", error))?;
    intents_with(
        settings,
        Arc::new(vectors),
        (
            "classify.static_unknown_threshold",
            settings.static_unknown_threshold,
        ),
        (
            "classify.static_faq_threshold",
            settings.static_faq_threshold,
        ),
    )
}

/// The transformer intents of the settings, with the encoder in
/// `model_path`. Slow (seconds): call it off the async threads.
pub fn embedding_model(
    settings: &ClassifySettings,
    model_path: &Path,
) -> Result<EmbeddingIntents, Error> {
    transformer_intents(settings, Arc::new(load_encoder(settings, model_path)?))
}

/// The embedding model in the settings' `embedding_mode`, behind the
/// exact-text cache. Slow (seconds; minutes when the static vectors must be
/// distilled): call it off the async threads.
pub fn cascade_model(settings: &ClassifySettings, model_path: &Path) -> Result<Cascade, Error> {
    if !(0.0..=1.0).contains(&settings.cascade_backlog_share) {
        return Err(Error::config(
            "classify.cascade_backlog_share",
            "a share of a batch, 0 to 1",
        ));
    }
    let encoder = load_encoder(settings, model_path)?;
    let paths = match settings.embedding_mode {
        Mode::Precise => Paths::Precise(transformer_intents(settings, Arc::new(encoder))?),
        Mode::Fast => Paths::Fast(static_intents(settings, model_path, &encoder)?),
        Mode::Cascade => {
            for (setting, value) in [
                ("classify.cascade_min_score", settings.cascade_min_score),
                ("classify.cascade_min_margin", settings.cascade_min_margin),
            ] {
                if !(-2.0..=2.0).contains(&value) {
                    return Err(Error::config(
                        setting,
                        "a cosine similarity (difference), -2 to 2",
                    ));
                }
            }
            Paths::Cascade {
                fast: static_intents(settings, model_path, &encoder)?,
                precise: transformer_intents(settings, Arc::new(encoder))?,
                sure: Sureness {
                    min_score: settings.cascade_min_score,
                    min_margin: settings.cascade_min_margin,
                },
            }
        }
    };
    Ok(Cascade::new(paths, settings.intent_cache_size)
        .with_backlog_share(settings.cascade_backlog_share))
}

/// The intent model the settings choose.
pub fn intent_model(
    settings: &ClassifySettings,
    model_path: &Path,
) -> Result<Arc<dyn IntentModel>, Error> {
    Ok(match settings.intent_model {
        IntentModelKind::Keywords => Arc::new(keyword_model(settings)?),
        IntentModelKind::Embedding => Arc::new(cascade_model(settings, model_path)?),
    })
}

/// `BOTLINE_MODEL_PATH`, or else [`DEFAULT_MODEL_PATH`] under the current
/// directory or the nearest parent holding one (a binary started from a
/// crate's folder, as `cargo test` does, finds the workspace's `models/`).
pub fn model_path_from_env() -> PathBuf {
    if let Some(path) = std::env::var_os("BOTLINE_MODEL_PATH") {
        return PathBuf::from(path);
    }
    std::env::current_dir()
        .ok()
        .and_then(|dir| {
            dir.ancestors()
                .map(|parent| parent.join(DEFAULT_MODEL_PATH))
                .find(|path| path.is_dir())
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL_PATH))
}

pub struct ClassifyStage {
    classifier: Classifier,
    model: Arc<dyn IntentModel>,
    streams: Streams,
    /// `runner.batch_size`: a read this long means more is waiting.
    full_read: usize,
}

impl ClassifyStage {
    pub fn new(
        settings: &ClassifySettings,
        model: Arc<dyn IntentModel>,
        streams: Streams,
        full_read: usize,
    ) -> Result<Self, Error> {
        Ok(ClassifyStage {
            classifier: Classifier::new(settings)?,
            model,
            streams,
            full_read,
        })
    }
}

impl Stage for ClassifyStage {
    type In = UnifiedMessage;
    /// Each message's intent, by entry id, or why the model failed.
    type Prepared = Result<HashMap<String, Understanding>, String>;

    fn group(&self) -> &'static str {
        group::CLASSIFY
    }

    fn inputs(&self, streams: &Streams, p: Partition) -> Vec<String> {
        vec![streams.inbound(p)]
    }

    fn chat(&self, message: &UnifiedMessage) -> String {
        format!("{}:{}", message.platform, message.chat.id)
    }

    /// Two batches at once: one in the model while the other is read and written.
    fn max_in_flight(&self) -> usize {
        self.full_read * 2
    }

    async fn prepare(&self, _fence: &Fence, batch: &[Envelope<UnifiedMessage>]) -> Self::Prepared {
        let texts: Vec<String> = batch.iter().map(|e| e.record.text.clone()).collect();
        let model = self.model.clone();
        let behind = batch.len() >= self.full_read;
        let started = Instant::now();
        let intents = tokio::task::spawn_blocking(move || {
            let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
            match behind {
                true => model.understand_behind(&texts),
                false => model.understand(&texts),
            }
        })
        .await;
        metrics::histogram!("botline_classify_model_seconds")
            .record(started.elapsed().as_secs_f64());
        match intents {
            Ok(Ok(intents)) if intents.len() == batch.len() => Ok(batch
                .iter()
                .map(|envelope| envelope.entry_id.clone())
                .zip(intents)
                .collect()),
            Ok(Ok(_)) => Err("intent model returned the wrong number of intents".into()),
            Ok(Err(error)) => Err(format!("intent model failed: {error}")),
            Err(error) => Err(format!("intent model failed: {error}")),
        }
    }

    /// Into its partition's queue, in the chat's order.
    async fn handle_chat(
        &self,
        prepared: &Self::Prepared,
        run: &[Envelope<UnifiedMessage>],
    ) -> Vec<Outcome> {
        let intents = match prepared {
            Ok(intents) => intents,
            Err(reason) => return vec![Outcome::Retry(reason.clone()); run.len()],
        };
        run.iter()
            .map(|envelope| {
                let Some(understood) = intents.get(&envelope.entry_id) else {
                    return Outcome::Retry("no intent for this message".into());
                };
                let mut classified = self
                    .classifier
                    .classify(envelope.record.clone(), understood.intent.clone());
                classified.faq = understood.faq.clone();
                metrics::counter!("botline_classify_intents_total", "intent" => classified.intent.name.clone()).increment(1);
                metrics::counter!("botline_classify_priorities_total", "priority" => classified.priority.as_str()).increment(1);
                if !classified.audit.is_empty() {
                    metrics::counter!("botline_classify_audit_hits_total").increment(classified.audit.len() as u64);
                }
                Outcome::Done(vec![Write::add(
                    self.streams.queue(envelope.partition),
                    &classified,
                )])
            })
            .collect()
    }
}

/// Run classify until `shutdown`, the model (if any) in `BOTLINE_MODEL_PATH`.
pub async fn run(
    settings: Settings,
    plumbing: Plumbing,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    run_with_model(settings, model_path_from_env(), plumbing, shutdown).await
}

/// Run classify until `shutdown` with the model in `model_path`. Not ready
/// (`/readyz`) until the model is loaded.
pub async fn run_with_model(
    settings: Settings,
    model_path: PathBuf,
    plumbing: Plumbing,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let classify: ClassifySettings = settings.section("classify")?;
    plumbing.health.set("intent_model", false);
    let started = Instant::now();
    let loading = classify.clone();
    let path = model_path.clone();
    let model = tokio::task::spawn_blocking(move || intent_model(&loading, &path))
        .await
        .map_err(|error| Error::config("classify.intent_model", error))??;
    let seconds = started.elapsed().as_secs_f64();
    info!(
        message = "intent model ready",
        kind = ?classify.intent_model,
        mode = ?classify.embedding_mode,
        model_path = %model_path.display(),
        threads = model::threads(),
        seconds
    );
    metrics::gauge!("botline_classify_model_load_seconds").set(seconds);
    plumbing.health.set("intent_model", true);
    let stage = ClassifyStage::new(
        &classify,
        model,
        plumbing.streams.clone(),
        plumbing.runner.batch_size,
    )?;
    runner::run(stage, plumbing, shutdown).await
}
