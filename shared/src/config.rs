//! Settings come from two places. Process settings and secrets are
//! environment variables (`BOTLINE_*`), so compose and Kubernetes can set
//! them per container. Behaviour (rules, templates, limits, schedules) is
//! one TOML file: the shipped [`DEFAULTS`] with the file named by
//! `BOTLINE_CONFIG` laid over it, table by table. A bad setting stops the
//! binary at start with an error that names it.

use crate::streams::{Streams, DEFAULT_PREFIX};
use crate::Error;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The shipped behaviour settings, every one documented in place.
pub const DEFAULTS: &str = include_str!("../defaults.toml");

/// Where a binary's process settings come from: the real environment in
/// `main`, a map in tests.
pub trait Env {
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|value| !value.is_empty())
    }
}

impl<const N: usize> Env for [(&str, &str); N] {
    fn get(&self, name: &str) -> Option<String> {
        lookup(self, name)
    }
}

impl Env for Vec<(&str, &str)> {
    fn get(&self, name: &str) -> Option<String> {
        lookup(self, name)
    }
}

fn lookup(pairs: &[(&str, &str)], name: &str) -> Option<String> {
    pairs
        .iter()
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Settings every binary reads from its environment.
#[derive(Clone)]
pub struct ProcessConfig {
    /// `BOTLINE_REDIS_URL`: where the streams live. Default `redis://127.0.0.1:6379`.
    /// `redis://user:password@host:port/` for an ACL user, `rediss://…` for TLS.
    pub redis_url: String,
    /// The TLS files of a `rediss://` URL (`BOTLINE_REDIS_CA_FILE`, …).
    pub redis_tls: RedisTls,
    /// `BOTLINE_PREFIX`: the name in every key's hash tag (`{botline:p7}:in`,
    /// `{botline}:members:…`). Default `botline`.
    pub prefix: String,
    /// `BOTLINE_CONSUMER`: this replica's consumer name, used as is.
    /// Default: stage + host name + the lowest free number on this host.
    pub consumer: Option<String>,
    /// `BOTLINE_METRICS_ADDR`: where `/metrics`, `/healthz`, `/readyz` are served.
    pub metrics_addr: SocketAddr,
    /// `BOTLINE_LOG_FORMAT`: `text` (default) or `json`.
    pub log_format: LogFormat,
    /// `BOTLINE_CONFIG`: the behaviour TOML laid over the defaults.
    pub config_path: Option<PathBuf>,
}

impl ProcessConfig {
    pub fn from_env(env: &impl Env, default_metrics_addr: &str) -> Result<Self, Error> {
        let redis_url = env
            .get("BOTLINE_REDIS_URL")
            .unwrap_or_else(|| "redis://127.0.0.1:6379".into());
        let redis_tls = RedisTls {
            ca_file: env.get(RedisTls::CA_FILE).map(PathBuf::from),
            cert_file: env.get(RedisTls::CERT_FILE).map(PathBuf::from),
            key_file: env.get(RedisTls::KEY_FILE).map(PathBuf::from),
        };
        let prefix = env
            .get("BOTLINE_PREFIX")
            .unwrap_or_else(|| DEFAULT_PREFIX.into());
        if prefix.is_empty()
            || prefix
                .chars()
                .any(|c| c.is_whitespace() || matches!(c, '{' | '}' | ':'))
        {
            return Err(Error::config(
                "BOTLINE_PREFIX",
                "must be a plain name, without spaces, braces or colons (the hash tags are made from it)",
            ));
        }
        let metrics_addr = parse_env(env, "BOTLINE_METRICS_ADDR", default_metrics_addr)?;
        let log_format = match env.get("BOTLINE_LOG_FORMAT").as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(Error::config(
                    "BOTLINE_LOG_FORMAT",
                    format!("{other:?} is neither `text` nor `json`"),
                ))
            }
        };
        let process = ProcessConfig {
            redis_url,
            redis_tls,
            prefix,
            consumer: env.get("BOTLINE_CONSUMER"),
            metrics_addr,
            log_format,
            config_path: env.get("BOTLINE_CONFIG").map(PathBuf::from),
        };
        // The URL parses, and the TLS files are there and hold what they should.
        crate::redis_conn::client(&process)?;
        Ok(process)
    }

    /// The key names, with `[streams] partitions` from the settings.
    pub fn streams(&self, settings: &Settings) -> Result<Streams, Error> {
        let stream_settings: StreamSettings = settings.section("streams")?;
        stream_settings.validate()?;
        Ok(Streams::new(
            self.prefix.clone(),
            stream_settings.partitions,
        ))
    }

    /// The behaviour settings: defaults with `BOTLINE_CONFIG` laid over them.
    pub fn settings(&self) -> Result<Settings, Error> {
        Settings::load(self.config_path.as_deref())
    }

    /// The settings worth logging at start; secrets are never among them.
    pub fn redacted(&self) -> String {
        format!(
            "redis={}{} prefix={} metrics={} config={}",
            redact_url(&self.redis_url),
            self.redis_tls.summary(),
            self.prefix,
            self.metrics_addr,
            self.config_path
                .as_deref()
                .map(|path| path.display().to_string())
                .unwrap_or_else(|| "(defaults)".into()),
        )
    }
}

/// Never shows the Redis password: the URL is redacted.
impl std::fmt::Debug for ProcessConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// The files of a TLS connection to Redis, each a PEM file named by its
/// variable. They apply only to a `rediss://` URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// `BOTLINE_REDIS_CA_FILE`: the CA certificate(s) that signed Redis's
    /// certificate (a private CA). Unset: the system's trusted roots.
    pub ca_file: Option<PathBuf>,
    /// `BOTLINE_REDIS_CERT_FILE`: this client's certificate chain, for a
    /// Redis that asks clients for one (`tls-auth-clients yes`).
    pub cert_file: Option<PathBuf>,
    /// `BOTLINE_REDIS_KEY_FILE`: the private key of that certificate.
    pub key_file: Option<PathBuf>,
}

impl RedisTls {
    pub const CA_FILE: &str = "BOTLINE_REDIS_CA_FILE";
    pub const CERT_FILE: &str = "BOTLINE_REDIS_CERT_FILE";
    pub const KEY_FILE: &str = "BOTLINE_REDIS_KEY_FILE";

    /// The first variable set, for "only with rediss://".
    pub fn first_set(&self) -> Option<&'static str> {
        [
            (Self::CA_FILE, &self.ca_file),
            (Self::CERT_FILE, &self.cert_file),
            (Self::KEY_FILE, &self.key_file),
        ]
        .into_iter()
        .find_map(|(name, value)| value.is_some().then_some(name))
    }

    /// The certificates redis's TLS takes, each file read and checked:
    /// an error names the variable whose file is missing or malformed.
    pub fn certificates(&self) -> Result<redis::TlsCertificates, Error> {
        let root_cert = match &self.ca_file {
            None => None,
            Some(path) => {
                let pem = read_file(Self::CA_FILE, path)?;
                let mut roots = rustls::RootCertStore::empty();
                for certificate in pem_certificates(Self::CA_FILE, path, &pem)? {
                    roots.add(certificate).map_err(|error| {
                        Error::config(
                            Self::CA_FILE,
                            format!("{}: not a CA certificate: {error}", path.display()),
                        )
                    })?;
                }
                Some(pem)
            }
        };
        let client_tls = match (&self.cert_file, &self.key_file) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(Error::config(
                    Self::KEY_FILE,
                    format!("is not set, but {} is", Self::CERT_FILE),
                ))
            }
            (None, Some(_)) => {
                return Err(Error::config(
                    Self::CERT_FILE,
                    format!("is not set, but {} is", Self::KEY_FILE),
                ))
            }
            (Some(cert_path), Some(key_path)) => {
                let client_cert = read_file(Self::CERT_FILE, cert_path)?;
                pem_certificates(Self::CERT_FILE, cert_path, &client_cert)?;
                let client_key = read_file(Self::KEY_FILE, key_path)?;
                PrivateKeyDer::from_pem_slice(&client_key).map_err(|error| {
                    Error::config(
                        Self::KEY_FILE,
                        format!("{}: no PEM private key: {error}", key_path.display()),
                    )
                })?;
                Some(redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                })
            }
        };
        Ok(redis::TlsCertificates {
            client_tls,
            root_cert,
        })
    }

    /// ` redis_ca=<path> …` for the start line: paths only, never contents.
    fn summary(&self) -> String {
        [
            ("ca", &self.ca_file),
            ("cert", &self.cert_file),
            ("key", &self.key_file),
        ]
        .into_iter()
        .filter_map(|(label, path)| {
            path.as_ref()
                .map(|path| format!(" redis_{label}={}", path.display()))
        })
        .collect()
    }
}

/// The certificates of a PEM file: at least one.
fn pem_certificates(
    name: &str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| Error::config(name, format!("{}: not PEM: {error}", path.display())))?;
    if certificates.is_empty() {
        return Err(Error::config(
            name,
            format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                path.display()
            ),
        ));
    }
    Ok(certificates)
}

fn read_file(name: &str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|error| Error::config(name, format!("{}: {error}", path.display())))
}

/// Parse an environment variable, naming it in the error.
pub fn parse_env<T: std::str::FromStr>(
    env: &(impl Env + ?Sized),
    name: &str,
    default: &str,
) -> Result<T, Error>
where
    T::Err: std::fmt::Display,
{
    let value = env.get(name).unwrap_or_else(|| default.into());
    value
        .parse()
        .map_err(|error| Error::config(name, format!("{value:?}: {error}")))
}

/// A secret from the environment, required to be present and non-trivial.
pub fn secret_env(env: &(impl Env + ?Sized), name: &str, min_len: usize) -> Result<String, Error> {
    let value = env
        .get(name)
        .ok_or_else(|| Error::config(name, "is not set"))?;
    if value.len() < min_len {
        return Err(Error::config(
            name,
            format!("must be at least {min_len} bytes long"),
        ));
    }
    Ok(value)
}

/// `redis://user:password@host` shown as `redis://user:***@host`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{}{}:***{}", &url[..scheme_end + 3], user, &url[at..])
        }
        _ => url.to_string(),
    }
}

/// The behaviour settings as one TOML table: defaults, then the user's file.
#[derive(Debug, Clone)]
pub struct Settings {
    table: toml::Table,
}

impl Settings {
    pub fn load(path: Option<&Path>) -> Result<Self, Error> {
        let overlay = match path {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| {
                    Error::config("BOTLINE_CONFIG", format!("{}: {error}", path.display()))
                })?;
                Some(text)
            }
        };
        Self::from_overlay(overlay.as_deref())
    }

    /// Defaults with `overlay` (TOML text) laid over them.
    pub fn from_overlay(overlay: Option<&str>) -> Result<Self, Error> {
        let mut table: toml::Table = DEFAULTS.parse().expect("shipped defaults parse");
        if let Some(text) = overlay {
            let user: toml::Table = text.parse().map_err(|error: toml::de::Error| {
                let line = error
                    .span()
                    .map_or(0, |span| text[..span.start].matches('\n').count() + 1);
                Error::config(
                    "BOTLINE_CONFIG",
                    format!("line {line}: {}", error.message()),
                )
            })?;
            for section in user.keys() {
                if !table.contains_key(section) {
                    return Err(Error::config(
                        section.as_str(),
                        format!(
                            "unknown section; known: {}",
                            table.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    ));
                }
            }
            merge(&mut table, user);
        }
        Ok(Settings { table })
    }

    /// One section, deserialized; an error names the setting by its path.
    pub fn section<T: DeserializeOwned>(&self, name: &str) -> Result<T, Error> {
        let value = self
            .table
            .get(name)
            .cloned()
            .unwrap_or(toml::Value::Table(toml::Table::new()));
        deserialize_setting(name, value)
    }
}

/// `value` deserialized; an error names the setting: `name` and the path inside it.
pub fn deserialize_setting<T: DeserializeOwned>(
    name: &str,
    value: toml::Value,
) -> Result<T, Error> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let setting = if path == "." {
            name.to_string()
        } else {
            format!("{name}.{path}")
        };
        Error::config(setting, error.into_inner().message())
    })
}

/// The tables of `[<section>.platforms]` whose `enabled` is true, with their
/// names; a table for a platform not in `known`, or an `enabled` that is not
/// a boolean, is an error naming it. Each platform module reads its own table.
pub fn enabled_platforms<'a>(
    section: &str,
    platforms: &'a toml::Table,
    known: &[&str],
) -> Result<Vec<(&'a str, &'a toml::Value)>, Error> {
    let mut enabled = Vec::new();
    for (name, table) in platforms {
        let setting = format!("{section}.platforms.{name}");
        if !known.contains(&name.as_str()) {
            return Err(Error::config(
                setting,
                format!("unknown platform; known: {}", known.join(", ")),
            ));
        }
        match table.get("enabled") {
            None | Some(toml::Value::Boolean(false)) => {}
            Some(toml::Value::Boolean(true)) => enabled.push((name.as_str(), table)),
            Some(other) => {
                return Err(Error::config(
                    format!("{setting}.enabled"),
                    format!("must be true or false, not {other}"),
                ))
            }
        }
    }
    Ok(enabled)
}

/// Lay `overlay` over `base`: tables merge key by key, anything else replaces.
fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(base_table)), toml::Value::Table(overlay_table)) => {
                merge(base_table, overlay_table)
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// `[runner]`: how every stage reads, retries and gives up.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunnerSettings {
    pub batch_size: usize,
    pub block_ms: u64,
    pub retry_ms: u64,
    pub window: usize,
    pub max_deliveries: u64,
    pub shutdown_deadline_ms: u64,
    pub lease_ttl_ms: u64,
}

impl RunnerSettings {
    pub fn block(&self) -> Duration {
        Duration::from_millis(self.block_ms)
    }
    pub fn retry(&self) -> Duration {
        Duration::from_millis(self.retry_ms)
    }
    pub fn shutdown_deadline(&self) -> Duration {
        Duration::from_millis(self.shutdown_deadline_ms)
    }
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }

    pub fn validate(&self) -> Result<(), Error> {
        let positive = [
            ("runner.batch_size", self.batch_size as u64),
            ("runner.block_ms", self.block_ms),
            ("runner.retry_ms", self.retry_ms),
            ("runner.window", self.window as u64),
            ("runner.max_deliveries", self.max_deliveries),
            ("runner.lease_ttl_ms", self.lease_ttl_ms),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::config(name, "must be greater than 0"));
            }
        }
        if self.window < self.batch_size {
            return Err(Error::config(
                "runner.window",
                "must be at least runner.batch_size: a batch is read within the window",
            ));
        }
        if self.lease_ttl_ms < 3 * self.block_ms {
            return Err(Error::config(
                "runner.lease_ttl_ms",
                "must be at least 3 × runner.block_ms: a partition's lease is renewed while its reads block",
            ));
        }
        Ok(())
    }
}

/// `[streams]`: how long streams may grow.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSettings {
    pub partitions: u32,
    pub retention_ms: u64,
    pub trim_interval_ms: u64,
    pub dead_max_len: usize,
    pub delivered_max_len: usize,
    pub metrics_interval_ms: u64,
    pub transcript_max_len: usize,
    pub transcript_ttl_ms: u64,
}

/// The most partitions a deployment may have: each is a stream (and group)
/// per input of every stage, read by its owner.
pub const MAX_PARTITIONS: u32 = 1024;

impl StreamSettings {
    pub fn validate(&self) -> Result<(), Error> {
        if !(1..=MAX_PARTITIONS).contains(&self.partitions) {
            return Err(Error::config(
                "streams.partitions",
                format!("must be between 1 and {MAX_PARTITIONS}"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_validate() {
        let settings = Settings::from_overlay(None).unwrap();
        let runner: RunnerSettings = settings.section("runner").unwrap();
        runner.validate().unwrap();
        let _: StreamSettings = settings.section("streams").unwrap();
    }

    #[test]
    fn overlay_replaces_only_what_it_names() {
        let settings = Settings::from_overlay(Some("[runner]\nbatch_size = 7\n")).unwrap();
        let runner: RunnerSettings = settings.section("runner").unwrap();
        assert_eq!(runner.batch_size, 7);
        let defaults: RunnerSettings = Settings::from_overlay(None)
            .unwrap()
            .section("runner")
            .unwrap();
        assert_eq!(runner.block_ms, defaults.block_ms);
    }

    fn check_error(overlay: &str, expected: &str) {
        let error = Settings::from_overlay(Some(overlay))
            .and_then(|settings| {
                let runner: RunnerSettings = settings.section("runner")?;
                runner.validate()
            })
            .unwrap_err();
        assert_eq!(error.to_string(), expected);
    }

    #[test]
    fn bad_settings_are_named() {
        check_error(
            "[runner]\nbatch_size = \"many\"\n",
            "setting runner.batch_size: invalid type: string \"many\", expected usize",
        );
        check_error(
            "[runner]\nbatch_sise = 3\n",
            "setting runner.batch_sise: unknown field `batch_sise`, expected one of `batch_size`, `block_ms`, `retry_ms`, `window`, `max_deliveries`, `shutdown_deadline_ms`, `lease_ttl_ms`",
        );
        check_error(
            "[runer]\n",
            &format!(
                "setting runer: unknown section; known: {}",
                known_sections()
            ),
        );
        check_error(
            "[runner]\nmax_deliveries = 0\n",
            "setting runner.max_deliveries: must be greater than 0",
        );
        check_error(
            "[runner]\n[runner\n",
            "setting BOTLINE_CONFIG: line 2: unclosed table, expected `]`",
        );
    }

    fn known_sections() -> String {
        let table: toml::Table = DEFAULTS.parse().unwrap();
        table.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    #[test]
    fn process_settings_are_named_when_bad() {
        let error = ProcessConfig::from_env(&[("BOTLINE_METRICS_ADDR", "nowhere")], "127.0.0.1:0")
            .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("setting BOTLINE_METRICS_ADDR: \"nowhere\""),
            "{error}"
        );
        let error = ProcessConfig::from_env(&[("BOTLINE_REDIS_URL", "http://x")], "127.0.0.1:0")
            .unwrap_err();
        assert!(
            error.to_string().starts_with("setting BOTLINE_REDIS_URL"),
            "{error}"
        );
        let error =
            ProcessConfig::from_env(&[("BOTLINE_LOG_FORMAT", "xml")], "127.0.0.1:0").unwrap_err();
        assert_eq!(
            error.to_string(),
            "setting BOTLINE_LOG_FORMAT: \"xml\" is neither `text` nor `json`"
        );
        let ok =
            ProcessConfig::from_env(&[("BOTLINE_REDIS_URL", "redis://u:pw@h:1")], "127.0.0.1:0")
                .unwrap();
        assert!(ok.redacted().contains("redis://u:***@h:1"));
        assert!(!ok.redacted().contains("pw"));
        assert!(!format!("{ok:?}").contains("pw"));
    }

    #[test]
    fn redis_tls_files_are_read_at_start_and_named() {
        let ca = crate::testing::TestCa::new();
        let ca_file = ca.ca_file().display().to_string();
        let cert_file = ca.client_cert().display().to_string();
        let key_file = ca.client_key().display().to_string();
        let error = |env: Vec<(&str, &str)>| match ProcessConfig::from_env(&env, "127.0.0.1:0") {
            Ok(_) => String::from("accepted"),
            Err(error) => error.to_string(),
        };
        fn with<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
            let mut env = vec![(
                "BOTLINE_REDIS_URL",
                "rediss://botline:hunter2-secret@localhost:6380/",
            )];
            env.extend_from_slice(extra);
            env
        }
        let all = [
            (RedisTls::CA_FILE, ca_file.as_str()),
            (RedisTls::CERT_FILE, cert_file.as_str()),
            (RedisTls::KEY_FILE, key_file.as_str()),
        ];
        assert_eq!(error(with(&all)), "accepted");
        assert_eq!(error(with(&[])), "accepted", "the system's roots");
        let process = ProcessConfig::from_env(&with(&all), "127.0.0.1:0").unwrap();
        let shown = format!("{process:?}");
        assert!(
            shown.contains("rediss://botline:***@localhost:6380/"),
            "{shown}"
        );
        assert!(shown.contains(&format!("redis_ca={ca_file}")), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");

        let check = |env: Vec<(&str, &str)>, expected: &str| {
            let error = error(env);
            assert!(error.starts_with(expected), "{error}");
            assert!(!error.contains("hunter2"), "{error}");
        };
        check(
            with(&[(RedisTls::CA_FILE, "/nonexistent/ca.pem")]),
            "setting BOTLINE_REDIS_CA_FILE: /nonexistent/ca.pem: No such file",
        );
        check(
            with(&[(RedisTls::CA_FILE, key_file.as_str())]),
            &format!("setting BOTLINE_REDIS_CA_FILE: {key_file} holds no PEM certificate"),
        );
        check(
            with(&[(RedisTls::CERT_FILE, cert_file.as_str())]),
            "setting BOTLINE_REDIS_KEY_FILE: is not set, but BOTLINE_REDIS_CERT_FILE is",
        );
        check(
            with(&[(RedisTls::KEY_FILE, key_file.as_str())]),
            "setting BOTLINE_REDIS_CERT_FILE: is not set, but BOTLINE_REDIS_KEY_FILE is",
        );
        check(
            with(&[
                (RedisTls::CERT_FILE, cert_file.as_str()),
                (RedisTls::KEY_FILE, cert_file.as_str()),
            ]),
            &format!("setting BOTLINE_REDIS_KEY_FILE: {cert_file}: no PEM private key"),
        );
        check(
            vec![
                ("BOTLINE_REDIS_URL", "redis://botline:hunter2-secret@localhost:6379/"),
                (RedisTls::CA_FILE, ca_file.as_str()),
            ],
            "setting BOTLINE_REDIS_CA_FILE: is for TLS, but BOTLINE_REDIS_URL is not a rediss:// URL",
        );
    }
}
