//! `[egress]`: how replies are delivered. Every default lives in
//! `shared/defaults.toml`, documented key by key.

use botline_shared::config::Settings;
use botline_shared::Error;
use serde::Deserialize;
use std::time::Duration;

/// `[egress]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressSettings {
    /// Attempts at one reply within one delivery of its entry.
    pub max_attempts: u32,
    /// First backoff ceiling; doubles per attempt.
    pub backoff_base_ms: u64,
    /// Largest backoff ceiling.
    pub backoff_cap_ms: u64,
    /// All attempts at one reply, waits included, end within this long.
    pub send_budget_ms: u64,
    /// Replies being sent at once, over all chats.
    pub max_in_flight: usize,
    /// How long a delivered reply's id is remembered.
    pub sent_ttl_ms: u64,
    /// Whether replies marked `replay` are sent (otherwise acknowledged unsent).
    pub send_replays: bool,
    pub web: WebSettings,
    pub webhook: WebhookSettings,
    /// `[egress.platforms.<name>]`: each platform's sender settings, read by
    /// its module in [`crate::senders`].
    pub platforms: toml::Table,
}

/// `[egress.web]`: the browser chat served by ingest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSettings {
    /// Whether `out:web` is read.
    pub enabled: bool,
    /// Shown beside the bot's replies.
    pub bot_name: String,
}

/// `[egress.webhook]`: replies POSTed to one URL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// Empty: the webhook sender is off.
    pub url: String,
    /// One request's timeout.
    pub timeout_ms: u64,
}

impl EgressSettings {
    /// `[egress]` from the behaviour settings, checked.
    pub fn from_settings(settings: &Settings) -> Result<Self, Error> {
        let egress: EgressSettings = settings.section("egress")?;
        egress.validate()?;
        Ok(egress)
    }

    /// The shipped defaults with `overlay` (TOML text) laid over them.
    pub fn from_overlay(overlay: &str) -> Result<Self, Error> {
        Self::from_settings(&Settings::from_overlay(Some(overlay))?)
    }

    pub fn validate(&self) -> Result<(), Error> {
        let positive = [
            ("egress.max_attempts", u64::from(self.max_attempts)),
            ("egress.backoff_base_ms", self.backoff_base_ms),
            ("egress.backoff_cap_ms", self.backoff_cap_ms),
            ("egress.send_budget_ms", self.send_budget_ms),
            ("egress.max_in_flight", self.max_in_flight as u64),
            ("egress.sent_ttl_ms", self.sent_ttl_ms),
            ("egress.webhook.timeout_ms", self.webhook.timeout_ms),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::config(name, "must be greater than 0"));
            }
        }
        if self.backoff_base_ms > self.backoff_cap_ms {
            return Err(Error::config(
                "egress.backoff_base_ms",
                "must not be greater than egress.backoff_cap_ms",
            ));
        }
        if !self.webhook.url.is_empty() {
            let url = reqwest::Url::parse(&self.webhook.url)
                .map_err(|error| Error::config("egress.webhook.url", error))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(Error::config(
                    "egress.webhook.url",
                    format!("{:?} is not an http(s) URL", self.webhook.url),
                ));
            }
        }
        Ok(())
    }

    pub fn send_budget(&self) -> Duration {
        Duration::from_millis(self.send_budget_ms)
    }

    pub fn backoff_base(&self) -> Duration {
        Duration::from_millis(self.backoff_base_ms)
    }

    pub fn backoff_cap(&self) -> Duration {
        Duration::from_millis(self.backoff_cap_ms)
    }

    pub fn sent_ttl(&self) -> Duration {
        Duration::from_millis(self.sent_ttl_ms)
    }

    /// The settings worth logging at start (no secrets among them).
    pub fn summary(&self) -> String {
        format!(
            "max_attempts={} backoff={}..{}ms budget={}ms in_flight={} send_replays={} web={} webhook={}",
            self.max_attempts,
            self.backoff_base_ms,
            self.backoff_cap_ms,
            self.send_budget_ms,
            self.max_in_flight,
            self.send_replays,
            self.web.enabled,
            webhook_origin(&self.webhook.url),
        )
    }
}

/// The scheme and host of a webhook URL: its path or query may hold a token.
fn webhook_origin(url: &str) -> String {
    match reqwest::Url::parse(url) {
        _ if url.is_empty() => "(off)".into(),
        Ok(url) => format!("{}://{}/…", url.scheme(), url.authority()),
        Err(_) => "(invalid)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_validate() {
        let egress = EgressSettings::from_settings(&Settings::from_overlay(None).unwrap()).unwrap();
        assert!(egress.webhook.url.is_empty());
        assert_eq!(egress.web.bot_name, "botline");
    }

    fn check_error(overlay: &str, expected: &str) {
        let error = EgressSettings::from_overlay(overlay).unwrap_err();
        assert_eq!(error.to_string(), expected);
    }

    #[test]
    fn bad_settings_are_named() {
        check_error(
            "[egress]\nmax_attempts = 0\n",
            "setting egress.max_attempts: must be greater than 0",
        );
        check_error(
            "[egress]\nmax_attempts = \"x\"\n",
            "setting egress.max_attempts: invalid type: string \"x\", expected u32",
        );
        check_error(
            "[egress.webhook]\nurll = \"x\"\n",
            "setting egress.webhook.urll: unknown field `urll`, expected `url` or `timeout_ms`",
        );
        check_error(
            "[egress.webhook]\nurl = \"ftp://example.com/\"\n",
            "setting egress.webhook.url: \"ftp://example.com/\" is not an http(s) URL",
        );
        check_error(
            "[egress]\nbackoff_base_ms = 5\nbackoff_cap_ms = 4\n",
            "setting egress.backoff_base_ms: must not be greater than egress.backoff_cap_ms",
        );
    }

    #[test]
    fn the_summary_hides_the_webhook_path() {
        let egress = EgressSettings::from_overlay(
            "[egress.webhook]\nurl = \"https://h:8/hooks/T0K3N?k=s\"\n",
        )
        .unwrap();
        assert!(
            egress.summary().ends_with("webhook=https://h:8/…"),
            "{}",
            egress.summary()
        );
        assert!(!egress.summary().contains("T0K3N"));
    }

    #[test]
    fn overlay_replaces_only_what_it_names() {
        let egress =
            EgressSettings::from_overlay("[egress.webhook]\nurl = \"http://h/x\"\n").unwrap();
        assert_eq!(egress.webhook.url, "http://h/x");
        assert_eq!(egress.webhook.timeout_ms, 10000);
        assert_eq!(egress.max_attempts, 5);
    }
}
