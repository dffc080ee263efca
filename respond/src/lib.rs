//! respond reads classified messages from each partition's `q` (group
//! `respond`; urgent chats first without starving the others),
//! keeps each conversation's turns in `ctx:<platform>:<chat>` (capped,
//! expiring after the last turn), and writes replies to `out:<platform>`.
//! Replies come from [`backend::ReplyBackend`]s in order, then a fallback
//! that always answers. In group chats it answers only when mentioned;
//! it never answers bots; scheduled and broadcast messages are said as they are.

pub mod backend;
pub mod faq;
pub mod llm;
pub mod local;
pub mod markdown;
pub mod templates;

use backend::{Draft, ReplyBackend, ReplyRequest};
use botline_shared::codec;
use botline_shared::config::{Env, ProcessEnv, Settings};
use botline_shared::keywords::Audit;
use botline_shared::message::{ChatKind, ClassifiedMessage, Priority, Reply, Role, Turn};
use botline_shared::now_ms;
use botline_shared::redis_conn::{self, Pool};
use botline_shared::runner::{self, Envelope, Fence, Outcome, Plumbing, Stage, Write};
use botline_shared::streams::{group, Partition, Streams};
use botline_shared::Error;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use templates::{Template, Templates};
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

/// `[respond]`. Every default is in the shipped defaults.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RespondSettings {
    /// How the bot names itself in replies and in the context.
    pub bot_name: String,
    /// Turns kept per chat (both sides counted).
    pub context_max_turns: usize,
    /// A chat's context is forgotten this long after its last turn.
    pub context_ttl_ms: u64,
    /// In group chats, answer only messages that mention the bot.
    pub group_requires_mention: bool,
    /// Share of each read given to urgent, normal and batch.
    pub weights: Weights,
    /// Backends tried in order for an intent without a route of its own.
    pub backends: Vec<String>,
    /// Intent → the backends tried in order for it.
    pub routes: BTreeMap<String, Vec<String>>,
    /// The FAQ backend answers when classify's match scores at least this.
    pub faq_min_score: f32,
    /// Texts that clear a chat's context (compared trimmed, case-insensitively).
    pub reset_commands: Vec<String>,
    /// What to do with an LLM reply holding a sensitive word
    /// (`classify.sensitive_words`): send it, mask the words, or replace it.
    pub output_audit: OutputAudit,
    /// The reply sent instead, with `output_audit = "replace"`.
    pub output_replacement: String,
    pub llm: llm::LlmSettings,
    pub local: local::LocalSettings,
    /// Per-intent replies; `unknown` is the fallback and must exist.
    pub templates: BTreeMap<String, Template>,
}

impl RespondSettings {
    /// Whether `backend` is named in `backends` or any route.
    pub fn names_backend(&self, backend: &str) -> bool {
        self.backends
            .iter()
            .chain(self.routes.values().flatten())
            .any(|name| name == backend)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputAudit {
    Send,
    Mask,
    Replace,
}

/// What respond reads of `[classify]`: the words to audit LLM output for,
/// and the FAQ entries' images.
#[derive(Deserialize)]
struct ClassifyShared {
    sensitive_words: Vec<String>,
    #[serde(default)]
    faq: Vec<faq::FaqImage>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weights {
    pub urgent: usize,
    pub normal: usize,
    pub batch: usize,
}

pub struct RespondStage {
    settings: RespondSettings,
    /// The backends of intents without a route of their own.
    backends: Vec<Arc<dyn ReplyBackend>>,
    routes: HashMap<String, Vec<Arc<dyn ReplyBackend>>>,
    templates: Arc<Templates>,
    audit: Audit,
    streams: Streams,
    pool: Pool,
    /// How many messages may be answered at once (the LLM's in-flight cap
    /// when a backend generates, else the runner's batch twice over).
    max_in_flight: usize,
}

/// Why a backend named in the settings is not there.
fn unavailable(name: &str) -> String {
    match name {
        "llm" => "names `llm`, but respond.llm.base_url is empty".into(),
        "local" => "names `local`, but no local model was loaded".into(),
        _ => format!("unknown backend {name:?}; known: templates, faq, llm, local"),
    }
}

/// What became of one message, before it is written.
enum Answer {
    Reply {
        draft: Draft,
        backend: &'static str,
    },
    /// `/reset`: the chat's context goes, and this says so.
    Reset {
        draft: Draft,
    },
    Silent(&'static str),
}

impl RespondStage {
    /// `local_model` is the `local` backend's model, loaded when the
    /// settings name it ([`RespondSettings::names_backend`], [`load_local_model`]);
    /// `faq_images` are what `[[classify.faq]]` entries name as their images.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: RespondSettings,
        sensitive_words: &[String],
        faq_images: &[faq::FaqImage],
        env: &impl Env,
        local_model: Option<local::LocalModel>,
        streams: Streams,
        pool: Pool,
        batch_size: usize,
    ) -> Result<Self, Error> {
        for (name, weight) in [
            ("respond.weights.urgent", settings.weights.urgent),
            ("respond.weights.normal", settings.weights.normal),
            ("respond.weights.batch", settings.weights.batch),
        ] {
            if weight == 0 {
                return Err(Error::config(
                    name,
                    "must be greater than 0, or that queue starves",
                ));
            }
        }
        if settings.context_max_turns == 0 {
            return Err(Error::config(
                "respond.context_max_turns",
                "must be greater than 0",
            ));
        }
        let templates = Arc::new(Templates::new(settings.templates.clone())?);
        let mut available: HashMap<&str, Arc<dyn ReplyBackend>> = HashMap::new();
        available.insert("templates", templates.clone());
        available.insert(
            "faq",
            Arc::new(faq::FaqBackend::new(settings.faq_min_score, faq_images)?),
        );
        if settings.llm.enabled() {
            available.insert(
                "llm",
                Arc::new(llm::LlmBackend::new(
                    settings.llm.clone(),
                    &settings.bot_name,
                    env,
                )?),
            );
        }
        if let Some(model) = local_model {
            let system_prompt = if settings.local.system_prompt.is_empty() {
                &settings.llm.system_prompt
            } else {
                &settings.local.system_prompt
            };
            available.insert(
                "local",
                Arc::new(local::LocalBackend::new(
                    &settings.local,
                    system_prompt.replace("{bot_name}", &settings.bot_name),
                    model,
                )),
            );
        }
        let pick =
            |setting: String, names: &[String]| -> Result<Vec<Arc<dyn ReplyBackend>>, Error> {
                names
                    .iter()
                    .map(|name| {
                        available
                            .get(name.as_str())
                            .cloned()
                            .ok_or_else(|| Error::config(setting.clone(), unavailable(name)))
                    })
                    .collect()
            };
        let backends = pick("respond.backends".into(), &settings.backends)?;
        let routes = settings
            .routes
            .iter()
            .map(|(intent, names)| {
                Ok((
                    intent.clone(),
                    pick(format!("respond.routes.{intent}"), names)?,
                ))
            })
            .collect::<Result<HashMap<_, _>, Error>>()?;
        let audit = Audit::new(sensitive_words)
            .map_err(|reason| Error::config("classify.sensitive_words", reason))?;
        let generates = backends
            .iter()
            .chain(routes.values().flatten())
            .any(|backend| backend.generates());
        let max_in_flight = if generates {
            settings.llm.max_in_flight.max(1)
        } else {
            batch_size * 2
        };
        Ok(RespondStage {
            settings,
            backends,
            routes,
            audit,
            templates,
            streams,
            pool,
            max_in_flight,
        })
    }

    /// Whether any backend in use writes its own text (an LLM).
    fn generates(&self) -> bool {
        self.backends
            .iter()
            .chain(self.routes.values().flatten())
            .any(|backend| backend.generates())
    }

    /// Whether any backend in use reads the chat's earlier turns.
    fn wants_context(&self) -> bool {
        self.backends
            .iter()
            .chain(self.routes.values().flatten())
            .any(|backend| backend.wants_context())
    }

    fn context_ttl(&self) -> Duration {
        Duration::from_millis(self.settings.context_ttl_ms)
    }

    /// The last `context_max_turns` turns of each chat, oldest first; none
    /// read when no backend wants them.
    async fn contexts(&self, keys: &[String]) -> Result<HashMap<String, Vec<Turn>>, Error> {
        if !self.wants_context() {
            return Ok(HashMap::new());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("XREVRANGE")
                .arg(key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(self.settings.context_max_turns);
        }
        let mut connection = self.pool.get().await?;
        let replies: Vec<redis::Value> = pipe.query_async(&mut connection).await?;
        let mut contexts = HashMap::new();
        for (key, reply) in keys.iter().zip(replies) {
            let mut turns = Vec::new();
            for entry in redis_conn::parse_entries(key, reply)?.into_iter().rev() {
                let Some(fields) = entry.fields else { continue };
                match codec::decode::<Turn>(fields.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                {
                    Ok(turn) => turns.push(turn),
                    Err(error) => {
                        warn!(message = "context turn skipped", stream = %key, id = %entry.id, %error)
                    }
                }
            }
            contexts.insert(key.clone(), turns);
        }
        Ok(contexts)
    }

    async fn answer(&self, classified: &ClassifiedMessage, context: &[Turn]) -> Answer {
        let message = &classified.message;
        if message.origin.is_announcement() {
            return Answer::Reply {
                draft: Draft::from(message.text.clone()),
                backend: "announcement",
            };
        }
        if message.sender.is_bot {
            return Answer::Silent("from_bot");
        }
        if message.chat.kind != ChatKind::Direct
            && self.settings.group_requires_mention
            && !message.mentions.bot
        {
            return Answer::Silent("not_mentioned");
        }
        let request = ReplyRequest {
            message: classified,
            context,
            bot_name: &self.settings.bot_name,
        };
        let command = message.text.trim().to_lowercase();
        if self
            .settings
            .reset_commands
            .iter()
            .any(|reset| reset.to_lowercase() == command)
        {
            let draft = self
                .templates
                .answer(&request, templates::RESET_INTENT)
                .unwrap_or_else(|| self.templates.fallback(&request));
            return Answer::Reset { draft };
        }
        let backends = self
            .routes
            .get(&classified.intent.name)
            .unwrap_or(&self.backends);
        for backend in backends {
            match backend.reply(&request).await {
                Ok(Some(draft)) => {
                    let draft = if backend.generates() {
                        self.audited(draft)
                    } else {
                        draft
                    };
                    return Answer::Reply {
                        draft,
                        backend: backend.name(),
                    };
                }
                Ok(None) => {}
                Err(error) => {
                    warn!(message = "reply backend failed; trying the next", backend = backend.name(), %error, trace_id = %message.trace_id)
                }
            }
        }
        Answer::Reply {
            draft: self.templates.fallback(&request),
            backend: "fallback",
        }
    }

    /// A generated reply after the sensitive-word audit, as the policy says
    /// (a replaced reply keeps none of its images).
    /// (Templates and FAQ answers are the operator's own words: not audited.)
    fn audited(&self, draft: Draft) -> Draft {
        let hits = self.audit.hits(&draft.text);
        if hits.is_empty() {
            return draft;
        }
        let policy = self.settings.output_audit;
        let label = match policy {
            OutputAudit::Send => "send",
            OutputAudit::Mask => "mask",
            OutputAudit::Replace => "replace",
        };
        metrics::counter!("botline_respond_output_audit_hits_total", "policy" => label)
            .increment(hits.len() as u64);
        match policy {
            OutputAudit::Send => draft,
            OutputAudit::Mask => Draft {
                text: self.audit.mask(&draft.text),
                ..draft
            },
            OutputAudit::Replace => Draft::from(self.settings.output_replacement.clone()),
        }
    }

    /// One chat's messages, in order: each sees the turns before it.
    async fn answer_chat(
        &self,
        mut context: Vec<Turn>,
        run: &[Envelope<ClassifiedMessage>],
    ) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(run.len());
        for envelope in run {
            let classified = &envelope.record;
            let partition = envelope.partition;
            let message = &classified.message;
            let ctx_key = self.streams.context(&message.platform, &message.chat.id);
            let cap = self.settings.context_max_turns;
            let mut writes = Vec::new();
            let span = info_span!("message", trace_id = %message.trace_id, chat = %message.chat.id);
            let answer = self.answer(classified, &context).instrument(span).await;
            if let Answer::Reset { .. } = answer {
                writes.push(Write::Delete {
                    key: ctx_key.clone(),
                });
                context.clear();
            } else if !message.origin.is_announcement() {
                let turn = Turn::from_user(message);
                writes.push(Write::add_capped(&ctx_key, &turn, cap, self.context_ttl()));
                context.push(turn);
            }
            let (draft, backend) = match answer {
                Answer::Silent(reason) => {
                    metrics::counter!("botline_respond_silent_total", "reason" => reason)
                        .increment(1);
                    (None, "")
                }
                Answer::Reset { draft } => (Some(draft), "reset"),
                Answer::Reply { draft, backend } => (Some(draft), backend),
            };
            if let Some(Draft { text, attachments }) = draft {
                metrics::counter!("botline_respond_replies_total", "backend" => backend)
                    .increment(1);
                let reply = Reply {
                    id: ulid::Ulid::new().to_string(),
                    in_reply_to: message.id.clone(),
                    platform: message.platform.clone(),
                    bot: message.bot.clone(),
                    chat: message.chat.clone(),
                    thread: message.thread.clone(),
                    reply_to: message.platform_message_id.clone(),
                    mentions: if message.chat.kind == ChatKind::Direct
                        || message.origin.is_announcement()
                    {
                        Vec::new()
                    } else {
                        vec![message.sender.id.clone()]
                    },
                    text,
                    attachments,
                    platform_data: message.platform_data.clone(),
                    priority: classified.priority,
                    received_at_ms: message.received_at_ms,
                    created_at_ms: now_ms(),
                    trace_id: message.trace_id.clone(),
                    replay: message.replay,
                };
                let turn = Turn {
                    role: Role::Bot,
                    speaker_id: message.bot.clone(),
                    speaker_name: self.settings.bot_name.clone(),
                    text: reply.text.clone(),
                    message_id: reply.id.clone(),
                    at_ms: reply.created_at_ms,
                    attachments: reply.attachments.clone(),
                };
                writes.push(Write::add(
                    self.streams.outbound(partition, &reply.platform),
                    &reply,
                ));
                if backend != "reset" {
                    writes.push(Write::add_capped(&ctx_key, &turn, cap, self.context_ttl()));
                    context.push(turn);
                }
            }
            outcomes.push(Outcome::Done(writes));
        }
        outcomes
    }
}

impl Stage for RespondStage {
    type In = ClassifiedMessage;
    /// The context of every chat of the batch, by context key, or why it
    /// could not be read.
    type Prepared = Result<HashMap<String, Vec<Turn>>, String>;

    fn group(&self) -> &'static str {
        group::RESPOND
    }

    fn inputs(&self, streams: &Streams, p: Partition) -> Vec<String> {
        vec![streams.queue(p)]
    }

    fn chat(&self, classified: &ClassifiedMessage) -> String {
        let message = &classified.message;
        format!("{}:{}", message.platform, message.chat.id)
    }

    fn priority(&self, classified: &ClassifiedMessage) -> Priority {
        classified.priority
    }

    fn weights(&self) -> [usize; 3] {
        let weights = &self.settings.weights;
        [weights.urgent, weights.normal, weights.batch]
    }

    /// A generated answer takes seconds: a chat's next message should not
    /// wait in the same batch for it, so one message per chat at a time.
    fn max_run(&self, _head: &ClassifiedMessage) -> usize {
        if self.generates() {
            1
        } else {
            usize::MAX
        }
    }

    fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    async fn prepare(
        &self,
        _fence: &Fence,
        batch: &[Envelope<ClassifiedMessage>],
    ) -> Self::Prepared {
        let mut keys: Vec<String> = batch
            .iter()
            .map(|envelope| {
                let message = &envelope.record.message;
                self.streams.context(&message.platform, &message.chat.id)
            })
            .collect();
        keys.dedup();
        self.contexts(&keys)
            .await
            .map_err(|error| format!("reading context: {error}"))
    }

    async fn handle_chat(
        &self,
        prepared: &Self::Prepared,
        run: &[Envelope<ClassifiedMessage>],
    ) -> Vec<Outcome> {
        let contexts = match prepared {
            Ok(contexts) => contexts,
            Err(reason) => return vec![Outcome::Retry(reason.clone()); run.len()],
        };
        let message = &run[0].record.message;
        let context = contexts
            .get(&self.streams.context(&message.platform, &message.chat.id))
            .cloned()
            .unwrap_or_default();
        self.answer_chat(context, run).await
    }
}

/// Run respond until `shutdown`.
pub async fn run(
    settings: Settings,
    plumbing: Plumbing,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    run_with_env(settings, &ProcessEnv, plumbing, shutdown).await
}

/// [`run`], with the environment (the LLM's API key) given.
pub async fn run_with_env(
    settings: Settings,
    env: &impl Env,
    plumbing: Plumbing,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let respond: RespondSettings = settings.section("respond")?;
    let classify: ClassifyShared = settings.section("classify")?;
    let local_model = if respond.names_backend("local") {
        plumbing.health.set("local_model", false);
        let model = load_local_model(&respond.local).await?;
        plumbing.health.set("local_model", true);
        Some(model)
    } else {
        None
    };
    let stage = RespondStage::new(
        respond,
        &classify.sensitive_words,
        &classify.faq,
        env,
        local_model,
        plumbing.streams.clone(),
        plumbing.pool.clone(),
        plumbing.runner.batch_size,
    )?;
    runner::run(stage, plumbing, shutdown).await
}

/// The `local` backend's model from `settings.model_path`, off the async
/// threads; a bad setting or a missing model is a config error naming it.
pub async fn load_local_model(settings: &local::LocalSettings) -> Result<local::LocalModel, Error> {
    settings.validate()?;
    let dir = settings.model_dir();
    let started = std::time::Instant::now();
    let (loading, dequantize) = (dir.clone(), settings.dequantize);
    let model = tokio::task::spawn_blocking(move || local::LocalModel::load(&loading, dequantize))
        .await
        .map_err(|error| Error::config("respond.local.model_path", error))?
        .map_err(|error| Error::config("respond.local.model_path", error))?;
    let seconds = started.elapsed().as_secs_f64();
    info!(
        message = "local model ready",
        model_path = %dir.display(),
        dequantize,
        threads = candle_core::utils::get_num_threads(),
        seconds
    );
    metrics::gauge!("botline_respond_local_model_load_seconds").set(seconds);
    Ok(model)
}
