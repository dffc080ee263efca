//! A throwaway `redis-server` for tests: its own port and folder, stopped
//! (and its folder removed) on drop, its log printed if the test failed.
//! It can be secured like a production one: ACL users with the default user
//! off, TLS only with a private CA made for the test ([`TestCa`]).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Child,
    port: u16,
    dir: PathBuf,
    /// The extra arguments it was started with, to start it again alike.
    extra: Vec<String>,
    security: Security,
}

/// How a test server is secured; the default is not at all (no password,
/// plain TCP), as most tests want.
#[derive(Clone, Default)]
pub struct Security {
    /// Lines of redis.conf (`user …` ACL rules, comments) the server
    /// includes: with them, only the users they define can connect.
    pub acl: Option<String>,
    /// The user and password the tests (and the binaries, through
    /// [`RedisServer::env`]) connect as.
    pub login: Option<(String, String)>,
    /// TLS only (`--port 0 --tls-port …`), with a server certificate of this
    /// CA; clients must show one of its client certificates too.
    pub tls: Option<Arc<TestCa>>,
}

impl Security {
    /// The `redis-server` arguments for this, its files written into `dir`.
    fn arguments(&self, dir: &Path) -> Vec<String> {
        let mut arguments = Vec::new();
        if let Some(acl) = &self.acl {
            let path = dir.join("acl.conf");
            std::fs::write(&path, acl).expect("ACL file");
            arguments.extend(["--include".to_string(), path.display().to_string()]);
        }
        if let Some(ca) = &self.tls {
            for (flag, path) in [
                ("--tls-cert-file", ca.server_cert()),
                ("--tls-key-file", ca.server_key()),
                ("--tls-ca-cert-file", ca.ca_file()),
            ] {
                arguments.extend([flag.to_string(), path.display().to_string()]);
            }
            arguments.extend(["--tls-auth-clients".to_string(), "yes".to_string()]);
        }
        arguments
    }
}

/// A private certificate authority made for one test, and the certificates
/// it signed, as PEM files in a folder removed on drop: a server
/// certificate for `127.0.0.1` and `localhost`, and a client certificate.
pub struct TestCa {
    dir: PathBuf,
}

impl TestCa {
    pub fn new() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let dir = std::env::temp_dir().join(format!(
            "botline-ca-{}-{}",
            std::process::id(),
            ulid::Ulid::new()
        ));
        std::fs::create_dir_all(&dir).expect("CA folder");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(DnType::CommonName, "botline test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");
        let write = |name: &str, text: String| {
            std::fs::write(dir.join(name), text).expect("PEM file");
        };
        write("ca.pem", ca.pem());
        for (name, names, usage) in [
            (
                "server",
                vec!["127.0.0.1".to_string(), "localhost".to_string()],
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            (
                "client",
                vec!["botline".to_string()],
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
        ] {
            let mut params = CertificateParams::new(names).expect("params");
            params
                .distinguished_name
                .push(DnType::CommonName, format!("botline test {name}"));
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().expect("key");
            let certificate = params.signed_by(&key, &*ca).expect("certificate");
            write(&format!("{name}.pem"), certificate.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        }
        TestCa { dir }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client.pem")
    }

    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client.key")
    }

    /// What a client of this CA's server is given: the CA, its certificate and key.
    pub fn certificates(&self) -> redis::TlsCertificates {
        let read = |path: PathBuf| std::fs::read(path).expect("PEM file");
        redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: read(self.client_cert()),
                client_key: read(self.client_key()),
            }),
            root_cert: Some(read(self.ca_file())),
        }
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port on loopback")
}

impl RedisServer {
    /// Start a server with no persistence.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Start a server with extra `redis-server` arguments (`--appendonly yes`, …).
    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_secured(Security::default(), extra)
    }

    /// Start a server secured as `security` says, with extra arguments.
    pub fn start_secured(security: Security, extra: &[&str]) -> Self {
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port();
            let dir =
                std::env::temp_dir().join(format!("botline-redis-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("redis folder");
            let mut extra: Vec<String> = extra.iter().map(|arg| arg.to_string()).collect();
            extra.extend(security.arguments(&dir));
            match Self::spawn(port, &dir, &extra, security.tls.is_some()) {
                Ok(child) => {
                    let mut server = RedisServer {
                        child,
                        port,
                        dir,
                        extra,
                        security: security.clone(),
                    };
                    match server.wait_ready(Duration::from_secs(10)) {
                        Ok(()) => return server,
                        Err(error) => last_error = error,
                    }
                }
                Err(error) => last_error = error.to_string(),
            }
        }
        panic!("could not start redis-server (is it installed? scripts/test installs it): {last_error}");
    }

    fn spawn(port: u16, dir: &Path, extra: &[String], tls: bool) -> std::io::Result<Child> {
        let port_arguments = if tls {
            vec![
                "--port".into(),
                "0".into(),
                "--tls-port".into(),
                port.to_string(),
            ]
        } else {
            vec!["--port".into(), port.to_string()]
        };
        Command::new("redis-server")
            .args(port_arguments)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--maxmemory-policy", "noeviction"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
    }

    fn wait_ready(&mut self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "redis-server exited: {status}; log: {}",
                    self.log()
                ));
            }
            if let Ok(mut connection) = self.try_client().and_then(|c| c.get_connection()) {
                if redis::cmd("PING").query::<String>(&mut connection).is_ok() {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "redis-server did not answer within {within:?}; log: {}",
            self.log()
        ))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `kill -9` the server and wait for it to be gone (its folder stays).
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start a killed server again on the same port, folder and arguments,
    /// so it loads what it persisted there (its AOF, when started with
    /// `--appendonly yes`).
    pub fn start_again(&mut self) {
        assert!(
            matches!(self.child.try_wait(), Ok(Some(_))),
            "redis-server is still running"
        );
        self.child = Self::spawn(
            self.port,
            &self.dir,
            &self.extra,
            self.security.tls.is_some(),
        )
        .expect("redis-server starts again");
        if let Err(error) = self.wait_ready(Duration::from_secs(30)) {
            panic!("redis-server did not come back: {error}");
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `redis://127.0.0.1:<port>`, with the login when there is one, and
    /// `rediss://` when the server speaks TLS only.
    pub fn url(&self) -> String {
        let scheme = if self.security.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let login = match &self.security.login {
            Some((user, password)) => format!("{user}:{password}@"),
            None => String::new(),
        };
        format!("{scheme}://{login}127.0.0.1:{}", self.port)
    }

    /// The environment a binary needs to use this server: `BOTLINE_REDIS_URL`,
    /// and for TLS the CA and the client certificate and key.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![("BOTLINE_REDIS_URL".to_string(), self.url())];
        if let Some(ca) = &self.security.tls {
            for (name, path) in [
                (crate::config::RedisTls::CA_FILE, ca.ca_file()),
                (crate::config::RedisTls::CERT_FILE, ca.client_cert()),
                (crate::config::RedisTls::KEY_FILE, ca.client_key()),
            ] {
                env.push((name.to_string(), path.display().to_string()));
            }
        }
        env
    }

    fn try_client(&self) -> redis::RedisResult<redis::Client> {
        match &self.security.tls {
            None => redis::Client::open(self.url()),
            Some(ca) => {
                let _ = rustls::crypto::ring::default_provider().install_default();
                redis::Client::build_with_tls(self.url(), ca.certificates())
            }
        }
    }

    pub fn client(&self) -> redis::Client {
        self.try_client().expect("client")
    }

    pub fn connection(&self) -> redis::Connection {
        self.client().get_connection().expect("connection")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- redis-server log (port {}) ---\n{}",
                self.port,
                self.log()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Wait until `done` holds, checking every 20 ms; panic naming `what` after `within`.
pub async fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every record in `stream`, oldest first, decoded.
pub fn read_stream<R: crate::codec::Record>(
    connection: &mut redis::Connection,
    stream: &str,
) -> Vec<R> {
    let entries: redis::Value = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query(connection)
        .expect("XRANGE");
    crate::redis_conn::parse_entries(stream, entries)
        .expect("entries")
        .into_iter()
        .map(|entry| {
            let fields = entry.fields.expect("entry has fields");
            crate::codec::decode(fields.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .expect("entry decodes")
        })
        .collect()
}

/// The keys of stream `name` (`in`, `q`, `out:web`, `delivered`, `dead`)
/// in every partition of the default layout.
pub fn partitioned(name: &str) -> Vec<String> {
    let streams = crate::streams::Streams::default();
    streams
        .all()
        .map(|p| format!("{{{}:p{p}}}:{name}", streams.prefix()))
        .collect()
}

/// Every record of stream `name` over every partition, in entry id order
/// (arrival order across partitions, within a millisecond by partition).
pub fn read_partitioned<R: crate::codec::Record>(
    connection: &mut redis::Connection,
    name: &str,
) -> Vec<R> {
    let mut entries = Vec::new();
    for key in partitioned(name) {
        let reply: redis::Value = redis::cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .query(connection)
            .expect("XRANGE");
        entries.extend(crate::redis_conn::parse_entries(&key, reply).expect("entries"));
    }
    entries.sort_by_key(|entry| crate::redis_conn::id_order(&entry.id));
    entries
        .into_iter()
        .map(|entry| {
            let fields = entry.fields.expect("entry has fields");
            crate::codec::decode(fields.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .expect("entry decodes")
        })
        .collect()
}

/// How many entries stream `name` holds over every partition.
pub fn partitioned_len(connection: &mut redis::Connection, name: &str) -> usize {
    partitioned(name)
        .iter()
        .map(|key| {
            redis::cmd("XLEN")
                .arg(key)
                .query::<usize>(connection)
                .expect("XLEN")
        })
        .sum()
}

/// `XADD stream * fields`.
pub fn add_entry(
    connection: &mut redis::Connection,
    stream: &str,
    fields: &[(String, Vec<u8>)],
) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (name, value) in fields {
        cmd.arg(name).arg(value.as_slice());
    }
    cmd.query(connection).expect("XADD")
}

/// A plain direct-chat message from a person, for tests.
pub fn sample_message(n: usize, text: &str) -> crate::message::UnifiedMessage {
    use crate::message::*;
    UnifiedMessage {
        id: format!("m{n}"),
        platform: "web".into(),
        bot: "botline".into(),
        chat: Chat {
            id: format!("c{}", n % 3),
            kind: ChatKind::Direct,
        },
        thread: None,
        sender: Sender {
            id: format!("u{}", n % 3),
            name: "Ada".into(),
            is_bot: false,
        },
        text: text.into(),
        mentions: Mentions::default(),
        attachments: vec![],
        reply_to: None,
        platform_message_id: None,
        platform_data: Default::default(),
        platform_ts_ms: None,
        received_at_ms: crate::now_ms(),
        trace_id: format!("t{n}"),
        origin: Origin::User,
        replay: false,
        raw: None,
    }
}

impl RedisServer {
    /// Settings (the defaults with `overlay` over them) and a stage's
    /// plumbing on this server, as a binary would build them.
    pub fn plumbing(&self, overlay: &str) -> (crate::config::Settings, crate::runner::Plumbing) {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let process =
            crate::config::ProcessConfig::from_env(&env, "127.0.0.1:0").expect("process settings");
        let settings = crate::config::Settings::from_overlay(Some(overlay)).expect("settings");
        let plumbing = crate::runner::Plumbing::connect(
            &process,
            &settings,
            crate::telemetry::Health::default(),
        )
        .expect("plumbing");
        (settings, plumbing)
    }
}
#[path = "cluster_testing.rs"]
mod cluster;
pub use cluster::RedisCluster;
