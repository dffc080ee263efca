//! Ingest's settings: the `[ingest]` section of the behaviour TOML (limits,
//! back-pressure, the scheduler's entries) and two environment variables
//! (where to listen, the generic API's JWT secret). A bad value stops the
//! binary at start with an error naming it.

use botline_shared::config::{parse_env, Env, Settings};
use botline_shared::message::ChatKind;
use botline_shared::Error;
use chrono::FixedOffset;
use croner::Cron;
use serde::Deserialize;
use std::net::SocketAddr;
use std::time::Duration;

/// A JWT secret shorter than this is refused at start: HS256 with a guessable
/// secret is no authentication.
pub const MIN_JWT_SECRET_BYTES: usize = 16;

/// `[ingest]`; every field is documented in `defaults.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSettings {
    /// Largest request body or WebSocket frame, in bytes (413 above).
    pub max_body_bytes: usize,
    /// Longest message text, in characters.
    pub max_text_chars: usize,
    /// How long a platform event id is remembered for deduplication.
    pub dedup_ttl_ms: u64,
    /// Backlog of `in` above which requests are pushed back (429).
    pub in_max_backlog: u64,
    /// How often the backlog is read.
    pub backlog_poll_ms: u64,
    /// `Retry-After` of 429 and 503 answers, in seconds.
    pub retry_after_secs: u64,
    /// Most chats one broadcast may name.
    pub broadcast_max_chats: usize,
    /// Required `aud` of generic API tokens; empty: not checked.
    pub jwt_audience: String,
    /// Requests (and web chat messages) one client address may make per
    /// second on average, over every route; 0: no limit.
    pub per_source_per_second: u32,
    /// How many a client address may make at once above that average.
    pub per_source_burst: u32,
    /// The header a trusted proxy puts the client's address in
    /// (`X-Forwarded-For`: its last entry); empty: the connection's peer.
    pub client_ip_header: String,
    /// Scheduled messages.
    pub schedule: Vec<ScheduleEntry>,
    /// `[ingest.platforms.<name>]`: each platform webhook's settings, read
    /// by its module in [`crate::platforms`].
    pub platforms: toml::Table,
}

/// One `[[ingest.schedule]]` entry, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleEntry {
    /// Unique name; part of each tick's event id and the message's origin.
    pub name: String,
    /// Cron pattern: 5 fields (a leading 6th seconds field is allowed).
    pub cron: String,
    /// The offset the pattern's times are read in, `+08:00`.
    #[serde(default = "utc")]
    pub utc_offset: String,
    pub platform: String,
    pub chat: String,
    #[serde(default = "direct")]
    pub chat_kind: ChatKind,
    pub text: String,
}

fn utc() -> String {
    "+00:00".into()
}

fn direct() -> ChatKind {
    ChatKind::Direct
}

/// A schedule entry with its pattern and offset parsed.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub entry: ScheduleEntry,
    pub cron: Cron,
    pub offset: FixedOffset,
}

impl IngestSettings {
    /// The `[ingest]` section of `settings`, validated.
    pub fn load(settings: &Settings) -> Result<Self, Error> {
        let settings: IngestSettings = settings.section("ingest")?;
        settings.validate()?;
        Ok(settings)
    }

    /// The `[ingest]` section of the defaults with `text` (TOML) laid over them, unvalidated.
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        Settings::from_overlay(Some(text))?.section("ingest")
    }

    /// Limits that must be positive, and every schedule entry parses.
    pub fn validate(&self) -> Result<(), Error> {
        let positive = [
            ("ingest.max_body_bytes", self.max_body_bytes as u64),
            ("ingest.max_text_chars", self.max_text_chars as u64),
            ("ingest.dedup_ttl_ms", self.dedup_ttl_ms),
            ("ingest.backlog_poll_ms", self.backlog_poll_ms),
            ("ingest.retry_after_secs", self.retry_after_secs),
            (
                "ingest.broadcast_max_chats",
                self.broadcast_max_chats as u64,
            ),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::config(name, "must be greater than 0"));
            }
        }
        self.schedules().map(|_| ())
    }

    /// The schedule entries, parsed; an error names the entry's field.
    pub fn schedules(&self) -> Result<Vec<Schedule>, Error> {
        let mut seen = std::collections::HashSet::new();
        self.schedule
            .iter()
            .enumerate()
            .map(|(index, entry)| {
                let field = |name: &str| format!("ingest.schedule[{index}].{name}");
                if entry.name.is_empty() || !seen.insert(entry.name.clone()) {
                    return Err(Error::config(field("name"), "must be non-empty and unique"));
                }
                if !crate::generic::is_platform_name(&entry.platform) {
                    return Err(Error::config(field("platform"), "must match [a-z0-9_]+"));
                }
                if entry.chat.is_empty() {
                    return Err(Error::config(field("chat"), "must not be empty"));
                }
                let cron = parse_cron(&entry.cron)
                    .map_err(|reason| Error::config(field("cron"), reason))?;
                let offset = parse_offset(&entry.utc_offset)
                    .map_err(|reason| Error::config(field("utc_offset"), reason))?;
                Ok(Schedule {
                    entry: entry.clone(),
                    cron,
                    offset,
                })
            })
            .collect()
    }

    pub fn backlog_poll(&self) -> Duration {
        Duration::from_millis(self.backlog_poll_ms)
    }

    pub fn audience(&self) -> Option<&str> {
        Some(self.jwt_audience.as_str()).filter(|audience| !audience.is_empty())
    }
}

/// A crontab pattern: 5 fields, or 6 with leading seconds.
fn parse_cron(pattern: &str) -> Result<Cron, String> {
    let fields = pattern.split_whitespace().count();
    if !(5..=6).contains(&fields) {
        return Err(format!(
            "{pattern:?} has {fields} fields; expected 5 (minute hour day month weekday)"
        ));
    }
    pattern
        .parse::<Cron>()
        .map_err(|error| format!("{pattern:?}: {error}"))
}

/// `+08:00`, `-05:30`, `+00:00`.
fn parse_offset(text: &str) -> Result<FixedOffset, String> {
    let bad = || format!("{text:?} is not an offset like +08:00");
    let bytes = text.as_bytes();
    if bytes.len() != 6 || bytes[3] != b':' {
        return Err(bad());
    }
    let sign = match bytes[0] {
        b'+' => 1,
        b'-' => -1,
        _ => return Err(bad()),
    };
    let hours: i32 = text[1..3].parse().map_err(|_| bad())?;
    let minutes: i32 = text[4..6].parse().map_err(|_| bad())?;
    if hours > 14 || minutes > 59 {
        return Err(bad());
    }
    FixedOffset::east_opt(sign * (hours * 3600 + minutes * 60)).ok_or_else(bad)
}

/// Ingest's environment variables.
#[derive(Clone)]
pub struct HttpConfig {
    /// `BOTLINE_HTTP_ADDR`: where the generic API and the web chat listen.
    /// Default `127.0.0.1:8080`.
    pub http_addr: SocketAddr,
    /// `BOTLINE_JWT_SECRET`: HS256 secret of generic API tokens. Unset: the
    /// `/v1` routes answer 401.
    pub jwt_secret: Option<String>,
}

impl HttpConfig {
    pub fn from_env(env: &impl Env) -> Result<Self, Error> {
        let http_addr = parse_env(env, "BOTLINE_HTTP_ADDR", "127.0.0.1:8080")?;
        let jwt_secret = env.get("BOTLINE_JWT_SECRET");
        if let Some(secret) = &jwt_secret {
            if secret.len() < MIN_JWT_SECRET_BYTES {
                return Err(Error::config(
                    "BOTLINE_JWT_SECRET",
                    format!("must be at least {MIN_JWT_SECRET_BYTES} bytes long"),
                ));
            }
        }
        Ok(HttpConfig {
            http_addr,
            jwt_secret,
        })
    }

    /// For the start-up log line: the secret is never shown.
    pub fn redacted(&self) -> String {
        format!(
            "http={} jwt_secret={}",
            self.http_addr,
            if self.jwt_secret.is_some() {
                "set"
            } else {
                "unset (generic API disabled)"
            }
        )
    }
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use botline_shared::config::DEFAULTS;

    #[test]
    fn shipped_defaults_load() {
        let settings = IngestSettings::from_toml(DEFAULTS).unwrap();
        settings.validate().unwrap();
        assert_eq!(settings.max_text_chars, 4000);
        assert!(settings.schedule.is_empty());
        assert_eq!(settings.audience(), None);
    }

    fn check_error(overlay: &str, expected: &str) {
        let error = IngestSettings::from_toml(overlay)
            .and_then(|settings| settings.validate())
            .unwrap_err();
        assert_eq!(error.to_string(), expected, "{overlay}");
    }

    fn with(extra: &str) -> String {
        let defaults = DEFAULTS.replace("schedule = []\n", "");
        format!("{defaults}\n{extra}")
    }

    const GOOD: &str = "[[ingest.schedule]]\nname = \"a\"\ncron = \"0 9 * * *\"\nplatform = \"web\"\nchat = \"c\"\ntext = \"hi\"\n";

    #[test]
    fn bad_settings_are_named() {
        check_error(
            &with(&format!("{GOOD}[[ingest.schedule]]\nname = \"b\"\ncron = \"61 * * * *\"\nplatform = \"web\"\nchat = \"c\"\ntext = \"hi\"\n")),
            "setting ingest.schedule[1].cron: \"61 * * * *\": Component error: Number out of bounds.",
        );
        check_error(
            &with("[[ingest.schedule]]\nname = \"a\"\ncron = \"* * *\"\nplatform = \"web\"\nchat = \"c\"\ntext = \"hi\"\n"),
            "setting ingest.schedule[0].cron: \"* * *\" has 3 fields; expected 5 (minute hour day month weekday)",
        );
        check_error(
            &with(&format!("{GOOD}utc_offset = \"8\"\n")),
            "setting ingest.schedule[0].utc_offset: \"8\" is not an offset like +08:00",
        );
        check_error(
            &with(&format!("{GOOD}chat_kind = \"room\"\n")),
            "setting ingest.schedule[0].chat_kind: unknown variant `room`, expected one of `direct`, `group`, `channel`",
        );
        check_error(
            &with(&format!("{GOOD}{GOOD}")),
            "setting ingest.schedule[1].name: must be non-empty and unique",
        );
        check_error(
            &DEFAULTS.replace("max_text_chars = 4000", "max_text_chars = 0"),
            "setting ingest.max_text_chars: must be greater than 0",
        );
        check_error(
            &DEFAULTS.replace("max_text_chars", "max_text_char"),
            "setting ingest.max_text_char: unknown field `max_text_char`, expected one of `max_body_bytes`, `max_text_chars`, `dedup_ttl_ms`, `in_max_backlog`, `backlog_poll_ms`, `retry_after_secs`, `broadcast_max_chats`, `jwt_audience`, `per_source_per_second`, `per_source_burst`, `client_ip_header`, `schedule`, `platforms`",
        );
    }

    #[test]
    fn schedules_parse_with_their_offset() {
        let settings = IngestSettings::from_toml(&with(&format!(
            "{GOOD}utc_offset = \"-05:30\"\nchat_kind = \"group\"\n"
        )))
        .unwrap();
        let schedules = settings.schedules().unwrap();
        assert_eq!(schedules[0].offset.local_minus_utc(), -(5 * 3600 + 30 * 60));
        assert_eq!(schedules[0].entry.chat_kind, ChatKind::Group);
    }

    #[test]
    fn environment_is_read_and_named() {
        let config = HttpConfig::from_env(&[("BOTLINE_JWT_SECRET", "0123456789abcdef")]).unwrap();
        assert_eq!(config.http_addr.to_string(), "127.0.0.1:8080");
        assert!(!format!("{config:?}").contains("0123456789"));
        let error = HttpConfig::from_env(&[("BOTLINE_JWT_SECRET", "short")]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "setting BOTLINE_JWT_SECRET: must be at least 16 bytes long"
        );
        let error = HttpConfig::from_env(&[("BOTLINE_HTTP_ADDR", "here")]).unwrap_err();
        assert!(
            error.to_string().starts_with("setting BOTLINE_HTTP_ADDR"),
            "{error}"
        );
    }
}
