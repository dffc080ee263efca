//! A throwaway `redis-server` for tests: its own port and folder, stopped
//! (and its folder removed) on drop, its log printed if the test failed.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Child,
    port: u16,
    dir: PathBuf,
    /// The extra arguments it was started with, to start it again alike.
    extra: Vec<String>,
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
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port();
            let dir =
                std::env::temp_dir().join(format!("botline-redis-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("redis folder");
            match Self::spawn(port, &dir, extra) {
                Ok(child) => {
                    let mut server = RedisServer {
                        child,
                        port,
                        dir,
                        extra: extra.iter().map(|arg| arg.to_string()).collect(),
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

    fn spawn(port: u16, dir: &Path, extra: &[&str]) -> std::io::Result<Child> {
        Command::new("redis-server")
            .arg("--port")
            .arg(port.to_string())
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
            if let Ok(mut connection) =
                redis::Client::open(self.url()).and_then(|c| c.get_connection())
            {
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
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        self.child = Self::spawn(self.port, &self.dir, &extra).expect("redis-server starts again");
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

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("client")
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
        let url = self.url();
        let process = crate::config::ProcessConfig::from_env(
            &[("BOTLINE_REDIS_URL", url.as_str())],
            "127.0.0.1:0",
        )
        .expect("process settings");
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
