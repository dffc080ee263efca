//! classify reads normalized messages from `in` (group `classify`), decides
//! each one's priority, intent and sensitive-word hits, and writes it to
//! `q:urgent`, `q:normal` or `q:batch` for respond. It owns no state: every
//! replica is interchangeable. The intent comes from an [`rules::IntentModel`]
//! (keyword rules for now), run off the async threads a batch at a time.

pub mod rules;

use botline_shared::config::Settings;
use botline_shared::message::{ClassifiedMessage, Intent, Priority, UnifiedMessage};
use botline_shared::runner::{self, Envelope, Input, Outcome, Plumbing, Stage, Write};
use botline_shared::streams::{group, Streams};
use botline_shared::Error;
use rules::{Audit, IntentModel, KeywordIntents, UrgentRules};
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

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
    /// Intent name → its keywords. Ties go to the name first in sort order.
    pub intents: BTreeMap<String, IntentRule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntentRule {
    pub keywords: Vec<String>,
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

pub struct ClassifyStage {
    classifier: Classifier,
    model: Arc<dyn IntentModel>,
    streams: Streams,
}

impl ClassifyStage {
    pub fn new(
        settings: &ClassifySettings,
        model: Arc<dyn IntentModel>,
        streams: Streams,
    ) -> Result<Self, Error> {
        Ok(ClassifyStage {
            classifier: Classifier::new(settings)?,
            model,
            streams,
        })
    }
}

impl Stage for ClassifyStage {
    type In = UnifiedMessage;

    fn group(&self) -> &'static str {
        group::CLASSIFY
    }

    fn inputs(&self) -> Vec<Input> {
        vec![Input {
            stream: self.streams.inbound(),
            weight: 1,
        }]
    }

    async fn handle(&self, batch: Vec<Envelope<UnifiedMessage>>) -> Vec<Outcome> {
        let texts: Vec<String> = batch.iter().map(|e| e.record.text.clone()).collect();
        let model = self.model.clone();
        let started = Instant::now();
        let intents = tokio::task::spawn_blocking(move || {
            let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
            model.classify(&texts)
        })
        .await;
        metrics::histogram!("botline_classify_model_seconds")
            .record(started.elapsed().as_secs_f64());
        let intents = match intents {
            Ok(intents) if intents.len() == batch.len() => intents,
            Ok(_) => {
                return retry_all(
                    batch.len(),
                    "intent model returned the wrong number of intents",
                )
            }
            Err(error) => return retry_all(batch.len(), &format!("intent model failed: {error}")),
        };
        batch
            .into_iter()
            .zip(intents)
            .map(|(envelope, intent)| {
                let classified = self.classifier.classify(envelope.record, intent);
                metrics::counter!("botline_classify_intents_total", "intent" => classified.intent.name.clone()).increment(1);
                metrics::counter!("botline_classify_priorities_total", "priority" => classified.priority.as_str()).increment(1);
                if !classified.audit.is_empty() {
                    metrics::counter!("botline_classify_audit_hits_total").increment(classified.audit.len() as u64);
                }
                Outcome::Done(vec![Write::add(self.streams.queue(classified.priority), &classified)])
            })
            .collect()
    }
}

fn retry_all(count: usize, reason: &str) -> Vec<Outcome> {
    vec![Outcome::Retry(reason.to_string()); count]
}

/// Run classify until `shutdown`.
pub async fn run(
    settings: Settings,
    plumbing: Plumbing,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let classify: ClassifySettings = settings.section("classify")?;
    let model = Arc::new(keyword_model(&classify)?);
    let stage = ClassifyStage::new(&classify, model, plumbing.streams.clone())?;
    runner::run(stage, plumbing, shutdown).await
}
