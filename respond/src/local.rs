//! Replies from a small instruction-tuned model run in-process, for
//! installations with no LLM endpoint at all: SmolLM2-135M-Instruct
//! (Apache-2.0, English only) in GGUF, run by candle's quantized llama on
//! the CPU. The prompt is the llm backend's ([`llm::prompt_messages`]:
//! system prompt, FAQ grounding, the chat's turns trimmed to a budget, the
//! message) in the model's chat template, ChatML. One generation at a time
//! per process, off the async threads, within a time budget that includes
//! the wait for the model: a reply that runs out of time is given up and the
//! next backend or the fallback answers. Nothing is downloaded:
//! `scripts/fetch-llm` puts the model in `models/smollm2/`.

use crate::backend::{BackendError, Generator, ReplyRequest};
use crate::llm::{self, PromptMessage};
use botline_shared::Error;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::quantized_llama::{ModelWeights, MAX_SEQ_LEN};
use futures_util::future::BoxFuture;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenizers::Tokenizer;
use tokio::sync::Mutex;

/// The files a model directory must hold.
pub const MODEL_FILES: [&str; 2] = ["model.gguf", "tokenizer.json"];

/// ChatML's control tokens, and the end of text some models stop with.
const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";
const END_OF_TEXT: &str = "<|endoftext|>";

/// How many of the latest tokens `repeat_penalty` looks back on.
const REPEAT_LAST_N: usize = 64;

/// Most new tokens a reply may ask for: the model's positions are shared
/// by the prompt and the answer.
const MAX_NEW_TOKENS: usize = 1024;

/// `[respond.local]`. Every default is in the shipped defaults.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalSettings {
    /// The directory with `model.gguf` and `tokenizer.json`; relative: looked
    /// for in the current directory and then its parents.
    pub model_path: String,
    /// Empty: `[respond.llm] system_prompt`. `{bot_name}` is replaced.
    pub system_prompt: String,
    /// Tokens generated at most per reply.
    pub max_new_tokens: usize,
    /// 0: greedy; above: sampled with `top_p` from `seed`.
    pub temperature: f64,
    pub top_p: f64,
    /// Above 1, tokens among the latest 64 are made less likely.
    pub repeat_penalty: f32,
    pub seed: u64,
    /// One reply, the wait for the model included, ends within this long.
    pub budget_ms: u64,
    /// Characters of earlier turns in the prompt; the oldest go first.
    pub context_budget_chars: usize,
    /// Run the model with f32 weights ([`read_weights`]): faster, more memory.
    pub dequantize: bool,
}

impl LocalSettings {
    pub fn validate(&self) -> Result<(), Error> {
        if self.model_path.trim().is_empty() {
            return Err(Error::config(
                "respond.local.model_path",
                "is empty; the default is models/smollm2 (scripts/fetch-llm puts the model there)",
            ));
        }
        if !(1..=MAX_NEW_TOKENS).contains(&self.max_new_tokens) {
            return Err(Error::config(
                "respond.local.max_new_tokens",
                format!("must be 1 to {MAX_NEW_TOKENS}"),
            ));
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::config(
                "respond.local.temperature",
                "must be 0 (greedy) or more",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::config(
                "respond.local.top_p",
                "must be above 0 and at most 1",
            ));
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty >= 1.0) {
            return Err(Error::config(
                "respond.local.repeat_penalty",
                "must be 1 (none) or more",
            ));
        }
        if self.budget_ms == 0 {
            return Err(Error::config(
                "respond.local.budget_ms",
                "must be greater than 0",
            ));
        }
        Ok(())
    }

    /// `model_path` as a directory: an absolute path as it is; a relative
    /// one under the current directory or the nearest parent holding it (a
    /// binary started from a crate's folder, as `cargo test` does, finds the
    /// workspace's `models/`), else as it is (and the error names it).
    pub fn model_dir(&self) -> PathBuf {
        let path = Path::new(&self.model_path);
        if path.is_absolute() {
            return path.to_path_buf();
        }
        std::env::current_dir()
            .ok()
            .and_then(|dir| {
                dir.ancestors()
                    .map(|parent| parent.join(path))
                    .find(|candidate| candidate.is_dir())
            })
            .unwrap_or_else(|| path.to_path_buf())
    }

    pub fn generate(&self) -> Generate {
        Generate {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            repeat_penalty: self.repeat_penalty,
            seed: self.seed,
        }
    }
}

/// How one answer is generated.
#[derive(Debug, Clone)]
pub struct Generate {
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub repeat_penalty: f32,
    pub seed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// A model file is not there: the model was never fetched, or the path is wrong.
    #[error("{} is missing: run scripts/fetch-llm, or set respond.local.model_path to a directory with {}", .0.display(), MODEL_FILES.join(" and "))]
    Missing(PathBuf),
    /// A model file is there but unusable.
    #[error("{}: {reason}", path.display())]
    Unreadable { path: PathBuf, reason: String },
    /// The prompt and the answer would not fit in the model's positions.
    #[error("the prompt is {tokens} tokens; with max_new_tokens it must stay within {limit}")]
    PromptTooLong { tokens: usize, limit: usize },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("inference: {0}")]
    Inference(#[from] candle_core::Error),
}

/// One piece of a prompt in the ChatML template: a control token (never
/// made from text, so a user typing `<|im_end|>` types text), or text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Start,
    End,
    Text(String),
}

/// `messages` in ChatML, as SmolLM2's chat template writes them
/// (`<|im_start|>role\ncontent<|im_end|>\n` each), ending where the
/// assistant's answer begins.
pub fn chatml(messages: &[PromptMessage]) -> Vec<Piece> {
    let mut pieces = Vec::with_capacity(messages.len() * 4 + 2);
    for message in messages {
        pieces.push(Piece::Start);
        pieces.push(Piece::Text(format!(
            "{}\n{}",
            message.role.as_str(),
            message.content
        )));
        pieces.push(Piece::End);
        pieces.push(Piece::Text("\n".into()));
    }
    pieces.push(Piece::Start);
    pieces.push(Piece::Text("assistant\n".into()));
    pieces
}

/// The prompt for `request` in ChatML: what the llm backend would send.
pub fn prompt(
    system_prompt: &str,
    request: &ReplyRequest<'_>,
    context_budget_chars: usize,
) -> Vec<Piece> {
    chatml(&llm::prompt_messages(
        system_prompt,
        request,
        context_budget_chars,
    ))
}

/// The pieces as the template's text (for reading, tests and logs).
pub fn render(pieces: &[Piece]) -> String {
    pieces
        .iter()
        .map(|piece| match piece {
            Piece::Start => IM_START,
            Piece::End => IM_END,
            Piece::Text(text) => text,
        })
        .collect()
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The model ended its answer (`<|im_end|>` or `<|endoftext|>`).
    EndToken,
    /// `max_new_tokens` were generated.
    MaxTokens,
    /// The deadline passed first.
    Deadline,
}

/// One answer and what it took.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The answer, control tokens left out, trimmed.
    pub text: String,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub stop: Stop,
    /// The prompt's pass, then one pass per further token.
    pub prompt_seconds: f64,
    pub generation_seconds: f64,
}

/// The model and its tokenizer, ready to answer one prompt at a time.
pub struct LocalModel {
    weights: ModelWeights,
    tokenizer: Tokenizer,
    im_start: u32,
    im_end: u32,
    end_of_text: Option<u32>,
}

impl LocalModel {
    /// Load `model.gguf` and `tokenizer.json` from `dir`, the weights as
    /// f32 with `dequantize` ([`read_weights`]). Slow (a second or so): call
    /// it off the async threads.
    pub fn load(dir: &Path, dequantize: bool) -> Result<Self, LocalError> {
        for file in MODEL_FILES {
            if !dir.join(file).is_file() {
                return Err(LocalError::Missing(dir.join(file)));
            }
        }
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(|error| LocalError::Unreadable {
                path: tokenizer_path.clone(),
                reason: error.to_string(),
            })?;
        let weights_path = dir.join("model.gguf");
        let unreadable = |reason: String| LocalError::Unreadable {
            path: weights_path.clone(),
            reason,
        };
        let mut file = std::fs::File::open(&weights_path).map_err(|e| unreadable(e.to_string()))?;
        let weights = read_weights(&mut file, dequantize).map_err(unreadable)?;
        LocalModel::new(weights, tokenizer).map_err(|reason| LocalError::Unreadable {
            path: tokenizer_path,
            reason,
        })
    }

    /// A model from parts already in memory; the tokenizer must know ChatML's
    /// control tokens.
    pub fn new(weights: ModelWeights, mut tokenizer: Tokenizer) -> Result<Self, String> {
        let id = |token: &str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| format!("has no {token} token: not a ChatML model"))
        };
        let (im_start, im_end) = (id(IM_START)?, id(IM_END)?);
        let end_of_text = tokenizer.token_to_id(END_OF_TEXT);
        // Control tokens come only from `Piece`s: in text they are text.
        tokenizer.set_encode_special_tokens(true);
        Ok(LocalModel {
            weights,
            tokenizer,
            im_start,
            im_end,
            end_of_text,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The ids of `pieces`: control tokens by id, each text on its own, as
    /// a tokenizer splits a template's text at its control tokens.
    pub fn prompt_ids(&self, pieces: &[Piece]) -> Result<Vec<u32>, LocalError> {
        let mut ids = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Start => ids.push(self.im_start),
                Piece::End => ids.push(self.im_end),
                Piece::Text(text) => {
                    let encoding = self
                        .tokenizer
                        .encode(text.as_str(), false)
                        .map_err(|error| LocalError::Tokenizer(error.to_string()))?;
                    ids.extend_from_slice(encoding.get_ids());
                }
            }
        }
        Ok(ids)
    }

    /// Whether `id` ends an answer.
    pub fn is_stop(&self, id: u32) -> bool {
        id == self.im_end || Some(id) == self.end_of_text
    }

    /// The answer to `prompt` (ids from [`LocalModel::prompt_ids`]), up to
    /// `generate.max_new_tokens`, given up at `deadline` (checked before
    /// each pass of the model).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        generate: &Generate,
        deadline: Instant,
    ) -> Result<Generation, LocalError> {
        let limit = MAX_SEQ_LEN;
        if prompt.is_empty() || prompt.len() + generate.max_new_tokens > limit {
            return Err(LocalError::PromptTooLong {
                tokens: prompt.len(),
                limit,
            });
        }
        let top_p = (generate.top_p < 1.0).then_some(generate.top_p);
        let sampling = if generate.temperature <= 0.0 {
            Sampling::ArgMax
        } else {
            match top_p {
                Some(p) => Sampling::TopP {
                    p,
                    temperature: generate.temperature,
                },
                None => Sampling::All {
                    temperature: generate.temperature,
                },
            }
        };
        let mut sampler = LogitsProcessor::from_sampling(generate.seed, sampling);
        let mut tokens = prompt.to_vec();
        let mut answer: Vec<u32> = Vec::new();
        let started = Instant::now();
        let mut prompt_seconds = 0.0;
        let mut stop = Stop::MaxTokens;
        while answer.len() < generate.max_new_tokens {
            if Instant::now() >= deadline {
                stop = Stop::Deadline;
                break;
            }
            // The whole prompt first (which also clears the key/value cache
            // of the previous answer), then one token at a time.
            let (input, position) = if answer.is_empty() {
                (prompt, 0)
            } else {
                (&tokens[tokens.len() - 1..], tokens.len() - 1)
            };
            let input = Tensor::new(input, &Device::Cpu)?.unsqueeze(0)?;
            let logits = self.weights.forward(&input, position)?.squeeze(0)?;
            if answer.is_empty() {
                prompt_seconds = started.elapsed().as_secs_f64();
            }
            let logits = if generate.repeat_penalty > 1.0 {
                let recent = &tokens[tokens.len().saturating_sub(REPEAT_LAST_N)..];
                candle_transformers::utils::apply_repeat_penalty(
                    &logits,
                    generate.repeat_penalty,
                    recent,
                )?
            } else {
                logits
            };
            let next = sampler.sample(&logits)?;
            if self.is_stop(next) {
                stop = Stop::EndToken;
                break;
            }
            tokens.push(next);
            answer.push(next);
        }
        let text = self
            .tokenizer
            .decode(&answer, true)
            .map_err(|error| LocalError::Tokenizer(error.to_string()))?;
        let text = match stop {
            Stop::MaxTokens => whole_sentences(&text),
            _ => text.as_str(),
        };
        Ok(Generation {
            text: text.trim().to_string(),
            prompt_tokens: prompt.len(),
            new_tokens: answer.len(),
            stop,
            prompt_seconds,
            generation_seconds: started.elapsed().as_secs_f64() - prompt_seconds,
        })
    }
}

/// A llama-architecture model's weights from GGUF; with `dequantize`, as
/// f32. candle multiplies f32 weights with a blocked matrix product over the
/// whole prompt at once, quantized blocks one token and one row at a time:
/// on two cores, f32 SmolLM2 reads a prompt about 20 times and writes about
/// 3 times as fast, for about 1.3 GB of memory instead of 250 MB.
pub fn read_weights<R: std::io::Read + std::io::Seek>(
    reader: &mut R,
    dequantize: bool,
) -> Result<ModelWeights, String> {
    let text = |error: candle_core::Error| error.to_string();
    let content = gguf_file::Content::read(reader).map_err(text)?;
    let architecture = content
        .metadata
        .get("general.architecture")
        .and_then(|value| value.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if architecture != "llama" {
        return Err(format!(
            "general.architecture is {architecture:?}; candle's quantized llama reads only \"llama\""
        ));
    }
    if !dequantize {
        return ModelWeights::from_gguf(content, reader, &Device::Cpu).map_err(text);
    }
    // The same model in an f32 GGUF in memory: candle's llama keeps f32
    // tensors as plain ones.
    let mut tensors = Vec::with_capacity(content.tensor_infos.len());
    for name in content.tensor_infos.keys() {
        let tensor = content.tensor(reader, name, &Device::Cpu).map_err(text)?;
        let tensor = if tensor.dtype() == GgmlDType::F32 {
            tensor
        } else {
            QTensor::quantize(
                &tensor.dequantize(&Device::Cpu).map_err(text)?,
                GgmlDType::F32,
            )
            .map_err(text)?
        };
        tensors.push((name.as_str(), tensor));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .filter(|(key, _)| key.starts_with("general.") || key.starts_with("llama."))
        .map(|(key, value)| (key.as_str(), value))
        .collect();
    let mut f32_file = std::io::Cursor::new(Vec::new());
    gguf_file::write(
        &mut f32_file,
        &metadata,
        &tensors
            .iter()
            .map(|(name, tensor)| (*name, tensor))
            .collect::<Vec<_>>(),
    )
    .map_err(text)?;
    drop(tensors);
    f32_file.set_position(0);
    let content = gguf_file::Content::read(&mut f32_file).map_err(text)?;
    ModelWeights::from_gguf(content, &mut f32_file, &Device::Cpu).map_err(text)
}

/// `text` up to its last sentence end, when it has one: an answer cut off
/// by `max_new_tokens` does not stop mid-sentence.
pub fn whole_sentences(text: &str) -> &str {
    let mut end = None;
    let mut previous = ' ';
    let mut chars = text.char_indices().peekable();
    while let Some((index, c)) = chars.next() {
        let at_boundary = chars.peek().is_none_or(|(_, next)| next.is_whitespace());
        // "7." is the number of a list item, not the end of a sentence.
        let numbering = c == '.' && previous.is_ascii_digit();
        if matches!(c, '.' | '!' | '?') && at_boundary && !numbering {
            end = Some(index + c.len_utf8());
        }
        previous = c;
    }
    end.map_or(text, |end| &text[..end])
}

/// The `local` reply backend: one [`LocalModel`] per process, one answer at
/// a time.
pub struct LocalBackend {
    model: Arc<Mutex<LocalModel>>,
    generate: Generate,
    system_prompt: String,
    context_budget_chars: usize,
    budget: Duration,
}

impl LocalBackend {
    /// `system_prompt` with `{bot_name}` replaced already.
    pub fn new(settings: &LocalSettings, system_prompt: String, model: LocalModel) -> Self {
        LocalBackend {
            model: Arc::new(Mutex::new(model)),
            generate: settings.generate(),
            system_prompt,
            context_budget_chars: settings.context_budget_chars,
            budget: Duration::from_millis(settings.budget_ms),
        }
    }

    async fn answer(&self, request: &ReplyRequest<'_>) -> Result<String, BackendError> {
        let started = Instant::now();
        let deadline = started + self.budget;
        let pieces = prompt(&self.system_prompt, request, self.context_budget_chars);
        let model = tokio::time::timeout_at(deadline.into(), self.model.clone().lock_owned())
            .await
            .map_err(|_| {
                count_error("busy");
                BackendError::Transient(format!(
                    "the local model was busy with other replies for the whole budget ({:?})",
                    self.budget
                ))
            })?;
        let generate = self.generate.clone();
        let generated = tokio::task::spawn_blocking(move || {
            let mut model = model;
            let prompt = model.prompt_ids(&pieces)?;
            model.generate(&prompt, &generate, deadline)
        })
        .await
        .map_err(|error| {
            count_error("inference");
            BackendError::Refused(format!("the local model's task failed: {error}"))
        })?;
        let generation = generated.map_err(|error| match error {
            LocalError::PromptTooLong { .. } => {
                count_error("prompt_too_long");
                BackendError::Refused(error.to_string())
            }
            other => {
                count_error("inference");
                BackendError::Refused(other.to_string())
            }
        })?;
        metrics::histogram!("botline_respond_local_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("botline_respond_local_tokens_total")
            .increment(generation.new_tokens as u64);
        match generation.stop {
            Stop::Deadline => {
                count_error("budget");
                Err(BackendError::Transient(format!(
                    "the local model did not finish within the budget ({:?}, {} tokens)",
                    self.budget, generation.new_tokens
                )))
            }
            _ if generation.text.is_empty() => {
                count_error("empty");
                Err(BackendError::Refused(
                    "the local model answered nothing".into(),
                ))
            }
            _ => Ok(generation.text),
        }
    }
}

fn count_error(reason: &'static str) {
    metrics::counter!("botline_respond_backend_errors_total", "backend" => "local", "reason" => reason).increment(1);
}

impl Generator for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    fn generate<'a>(
        &'a self,
        request: &'a ReplyRequest<'a>,
    ) -> BoxFuture<'a, Result<String, BackendError>> {
        Box::pin(self.answer(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use botline_shared::config::Settings;
    use botline_shared::message::Turn;
    use botline_shared::message::{ChatKind, ClassifiedMessage, FaqMatch, Intent, Priority, Role};
    use botline_shared::testing::sample_message;
    use candle_core::DType;
    use std::str::FromStr;

    fn classified(text: &str, kind: ChatKind, faq: Option<FaqMatch>) -> ClassifiedMessage {
        let mut message = sample_message(1, text);
        message.chat.kind = kind;
        message.sender.name = "Ann".into();
        ClassifiedMessage {
            message,
            priority: Priority::Normal,
            intent: Intent {
                name: "unknown".into(),
                confidence: 0.0,
            },
            audit: vec![],
            faq,
        }
    }

    fn turn(role: Role, speaker: &str, text: &str) -> Turn {
        Turn {
            role,
            speaker_id: speaker.to_lowercase(),
            speaker_name: speaker.into(),
            text: text.into(),
            message_id: "m".into(),
            at_ms: 0,
            attachments: vec![],
        }
    }

    /// The prompt `local` builds, as ChatML text.
    fn check(message: &ClassifiedMessage, context: &[Turn], budget: usize, expected: &str) {
        let request = ReplyRequest {
            message,
            context,
            bot_name: "botline",
        };
        assert_eq!(render(&prompt("Be brief.", &request, budget)), expected);
    }

    #[test]
    fn prompt_is_chatml_with_context_oldest_first() {
        let context = [
            turn(Role::User, "Ann", "hi"),
            turn(Role::Bot, "botline", "Hello! How can I help?"),
            turn(Role::User, "Ann", "where is my order"),
        ];
        let direct = classified("it is late", ChatKind::Direct, None);
        check(
            &direct,
            &context,
            1000,
            "<|im_start|>system\nBe brief.<|im_end|>\n\
             <|im_start|>user\nhi<|im_end|>\n\
             <|im_start|>assistant\nHello! How can I help?<|im_end|>\n\
             <|im_start|>user\nwhere is my order<|im_end|>\n\
             <|im_start|>user\nit is late<|im_end|>\n\
             <|im_start|>assistant\n",
        );
        // The budget keeps the newest turns that fit: 17 characters.
        check(
            &direct,
            &context,
            20,
            "<|im_start|>system\nBe brief.<|im_end|>\n\
             <|im_start|>user\nwhere is my order<|im_end|>\n\
             <|im_start|>user\nit is late<|im_end|>\n\
             <|im_start|>assistant\n",
        );
        check(
            &direct,
            &context,
            0,
            "<|im_start|>system\nBe brief.<|im_end|>\n\
             <|im_start|>user\nit is late<|im_end|>\n\
             <|im_start|>assistant\n",
        );
    }

    #[test]
    fn prompt_carries_faq_grounding_and_group_speakers() {
        let faq = FaqMatch {
            question: "Do you ship abroad?".into(),
            answer: "Yes, in 7 to 14 days.".into(),
            score: 0.9,
        };
        let group = classified("do you ship to Peru", ChatKind::Group, Some(faq));
        let context = [
            turn(Role::User, "Bob", "hello"),
            turn(Role::Bot, "botline", "Hi Bob."),
        ];
        check(
            &group,
            &context,
            1000,
            "<|im_start|>system\nBe brief.<|im_end|>\n\
             <|im_start|>system\nA reference answer from the FAQ (question: Do you ship abroad?): \
             Yes, in 7 to 14 days.\nUse it if it answers the user.<|im_end|>\n\
             <|im_start|>user\nBob: hello<|im_end|>\n\
             <|im_start|>assistant\nHi Bob.<|im_end|>\n\
             <|im_start|>user\nAnn: do you ship to Peru<|im_end|>\n\
             <|im_start|>assistant\n",
        );
    }

    #[test]
    fn answers_cut_off_end_at_a_whole_sentence() {
        for (text, expected) in [
            ("One. Two", "One."),
            ("Yes! Then what? And so", "Yes! Then what?"),
            ("No sentence end", "No sentence end"),
            ("Steps:\n1. Open it.\n2. Close", "Steps:\n1. Open it."),
            ("Steps:\n1. Open it\n2.", "Steps:\n1. Open it\n2."),
            ("It costs 3.50 dollars", "It costs 3.50 dollars"),
            ("Done.", "Done."),
            ("", ""),
        ] {
            assert_eq!(whole_sentences(text), expected, "{text:?}");
        }
    }

    #[test]
    fn bad_settings_are_named() {
        for (overlay, setting) in [
            ("max_new_tokens = 0", "respond.local.max_new_tokens"),
            ("max_new_tokens = 5000", "respond.local.max_new_tokens"),
            ("temperature = -1.0", "respond.local.temperature"),
            ("top_p = 0.0", "respond.local.top_p"),
            ("top_p = 1.5", "respond.local.top_p"),
            ("repeat_penalty = 0.5", "respond.local.repeat_penalty"),
            ("budget_ms = 0", "respond.local.budget_ms"),
            ("model_path = \"\"", "respond.local.model_path"),
        ] {
            let settings = Settings::from_overlay(Some(&format!("[respond.local]\n{overlay}")))
                .unwrap()
                .section::<crate::RespondSettings>("respond")
                .unwrap()
                .local;
            let error = settings.validate().unwrap_err().to_string();
            assert!(error.contains(setting), "{overlay}: {error}");
        }
        let defaults = Settings::from_overlay(None)
            .unwrap()
            .section::<crate::RespondSettings>("respond")
            .unwrap();
        defaults.local.validate().unwrap();
        assert!(!defaults.names_backend("local"), "local is off by default");
    }

    #[test]
    fn a_missing_model_says_what_to_run() {
        let error = LocalModel::load(Path::new("/nonexistent/smollm2"), true)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("scripts/fetch-llm"), "{error}");
        assert!(error.contains("/nonexistent/smollm2/model.gguf"), "{error}");
    }

    const WORDS: [&str; 8] = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "[UNK]",
        "hello",
        "user",
        "assistant",
        "system",
    ];

    /// A word-level tokenizer over [`WORDS`], ChatML's tokens special; its
    /// pre-tokenizer splits punctuation from words, so (as in a byte-level
    /// BPE) their text is never one word.
    fn tiny_tokenizer() -> Tokenizer {
        let vocab: String = WORDS
            .iter()
            .enumerate()
            .map(|(i, w)| format!("\"{w}\": {i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let added: String = WORDS[..3]
            .iter()
            .enumerate()
            .map(|(i, w)| format!("{{\"id\": {i}, \"content\": \"{w}\", \"single_word\": false, \"lstrip\": false, \"rstrip\": false, \"normalized\": false, \"special\": true}}"))
            .collect::<Vec<_>>()
            .join(", ");
        let json = format!(
            "{{\"version\": \"1.0\", \"added_tokens\": [{added}], \"pre_tokenizer\": {{\"type\": \"Whitespace\"}}, \"model\": {{\"type\": \"WordLevel\", \"vocab\": {{{vocab}}}, \"unk_token\": \"[UNK]\"}}}}"
        );
        Tokenizer::from_str(&json).unwrap()
    }

    /// A one-layer llama in GGUF whose every answer token is `answer`: the
    /// attention and MLP weights are zero, so the last hidden state is the
    /// (normalized, all ones) embedding, and only `answer`'s output row is not zero.
    fn tiny_model(answer: u32) -> LocalModel {
        let (vocab, hidden, ffn) = (WORDS.len(), 8, 16);
        let device = Device::Cpu;
        let tensor = |shape: &[usize], value: f64| {
            let tensor = (Tensor::ones(shape, DType::F32, &device).unwrap() * value).unwrap();
            QTensor::quantize(&tensor, GgmlDType::F32).unwrap()
        };
        let mut output = vec![0f32; vocab * hidden];
        output[answer as usize * hidden..(answer as usize + 1) * hidden].fill(1.0);
        let output = QTensor::quantize(
            &Tensor::from_vec(output, (vocab, hidden), &device).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        let tensors = [
            ("token_embd.weight", tensor(&[vocab, hidden], 1.0)),
            ("output_norm.weight", tensor(&[hidden], 1.0)),
            ("output.weight", output),
            ("blk.0.attn_norm.weight", tensor(&[hidden], 1.0)),
            ("blk.0.ffn_norm.weight", tensor(&[hidden], 1.0)),
            ("blk.0.attn_q.weight", tensor(&[hidden, hidden], 0.0)),
            ("blk.0.attn_k.weight", tensor(&[hidden / 2, hidden], 0.0)),
            ("blk.0.attn_v.weight", tensor(&[hidden / 2, hidden], 0.0)),
            ("blk.0.attn_output.weight", tensor(&[hidden, hidden], 0.0)),
            ("blk.0.ffn_gate.weight", tensor(&[ffn, hidden], 0.0)),
            ("blk.0.ffn_up.weight", tensor(&[ffn, hidden], 0.0)),
            ("blk.0.ffn_down.weight", tensor(&[hidden, ffn], 0.0)),
        ];
        use gguf_file::Value;
        let metadata = [
            ("general.architecture", Value::String("llama".into())),
            ("llama.attention.head_count", Value::U32(2)),
            ("llama.attention.head_count_kv", Value::U32(1)),
            ("llama.block_count", Value::U32(1)),
            ("llama.embedding_length", Value::U32(hidden as u32)),
            ("llama.rope.dimension_count", Value::U32(hidden as u32 / 2)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ];
        let mut file = std::io::Cursor::new(Vec::new());
        gguf_file::write(
            &mut file,
            &metadata.iter().map(|(k, v)| (*k, v)).collect::<Vec<_>>(),
            &tensors.iter().map(|(k, v)| (*k, v)).collect::<Vec<_>>(),
        )
        .unwrap();
        file.set_position(0);
        LocalModel::new(read_weights(&mut file, false).unwrap(), tiny_tokenizer()).unwrap()
    }

    fn generate(max_new_tokens: usize) -> Generate {
        Generate {
            max_new_tokens,
            temperature: 0.0,
            top_p: 1.0,
            repeat_penalty: 1.0,
            seed: 1,
        }
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[test]
    fn control_tokens_come_from_the_template_never_from_text() {
        let model = tiny_model(4);
        let pieces = chatml(&[PromptMessage {
            role: llm::PromptRole::User,
            content: "hello <|im_end|>".into(),
        }]);
        let ids = model.prompt_ids(&pieces).unwrap();
        // <|im_start|> user hello, then `<|`, `im_end`, `|>` as [UNK]s,
        // <|im_end|>, (the "\n" is no word) <|im_start|> assistant.
        assert_eq!(ids, [1, 5, 4, 3, 3, 3, 2, 1, 6]);
    }

    #[test]
    fn generation_stops_at_the_end_token() {
        let mut model = tiny_model(2);
        let prompt = model.prompt_ids(&chatml(&[])).unwrap();
        let answer = model.generate(&prompt, &generate(10), far()).unwrap();
        assert_eq!(answer.stop, Stop::EndToken);
        assert_eq!((answer.new_tokens, answer.text.as_str()), (0, ""));
    }

    #[test]
    fn generation_stops_at_max_new_tokens_and_at_the_deadline() {
        let mut model = tiny_model(4);
        let prompt = model.prompt_ids(&chatml(&[])).unwrap();
        let answer = model.generate(&prompt, &generate(3), far()).unwrap();
        assert_eq!(answer.stop, Stop::MaxTokens);
        assert_eq!(answer.new_tokens, 3);
        assert_eq!(answer.text, "hello hello hello");
        // The same again: each answer starts from a clean cache.
        let again = model.generate(&prompt, &generate(3), far()).unwrap();
        assert_eq!(again.text, answer.text);
        let late = model
            .generate(&prompt, &generate(3), Instant::now())
            .unwrap();
        assert_eq!((late.stop, late.new_tokens), (Stop::Deadline, 0));
        let too_long = model.generate(&vec![4; MAX_SEQ_LEN], &generate(3), far());
        assert!(matches!(too_long, Err(LocalError::PromptTooLong { .. })));
    }
}
