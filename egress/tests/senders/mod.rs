//! What the platform sender tests share: egress with one platform enabled,
//! running against its own redis-server, replies put into `out:<platform>`,
//! receipts and dead letters read back, waits for a condition with a
//! deadline (never a fixed sleep), and [`StandIn`], a local stand-in of a
//! platform's API on 127.0.0.1:0 that records every request and answers
//! each as the test's script says; [`Files`] serves pictures for the
//! senders that fetch and upload them, and [`Received::multipart`] reads an
//! upload the way a platform's server does.
#![allow(dead_code)]

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use botline_egress::EgressSettings;
use botline_shared::message::{Chat, ChatKind, DeadLetter, Priority, Receipt, Reply};
use botline_shared::streams::Streams;
use botline_shared::testing::{add_entry, read_partitioned, RedisServer};
use botline_shared::{codec, now_ms, Error};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(20);

/// Wait until `check` holds, or fail naming `what`.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// There were `count` requests, each at least `gap` after the one before
/// (a rate limit kept).
pub fn assert_paced(requests: &[Received], count: usize, gap: Duration) {
    let mut arrivals: Vec<Instant> = requests.iter().map(|request| request.at).collect();
    arrivals.sort();
    assert_eq!(arrivals.len(), count, "requests");
    for pair in arrivals.windows(2) {
        let between = pair[1] - pair[0];
        assert!(between >= gap, "paced at least {gap:?} apart: {between:?}");
    }
}

pub struct Egress {
    pub redis: RedisServer,
    pub streams: Streams,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), Error>>,
}

impl Egress {
    /// Egress with the settings `overlay` (TOML: the platform's table) and
    /// the environment `env` (its secrets); fast backoff, retries and
    /// takeovers.
    pub fn start(overlay: &str, env: &[(&str, &str)]) -> Egress {
        Self::try_start(overlay, env).unwrap()
    }

    /// Like [`Egress::start`], or the error that would stop egress at start.
    pub fn try_start(overlay: &str, env: &[(&str, &str)]) -> Result<Egress, Error> {
        let redis = RedisServer::start();
        let (streams, Replica { shutdown, task }) = launch(&redis, overlay, env)?;
        Ok(Egress {
            redis,
            streams,
            shutdown,
            task,
        })
    }

    /// Another egress replica on the same Redis (and so in the same
    /// group), with the settings `overlay` and the environment `env`.
    pub fn replica(&self, overlay: &str, env: &[(&str, &str)]) -> Replica {
        launch(&self.redis, overlay, env).unwrap().1
    }

    pub async fn stop(self) {
        stop(self.shutdown, self.task).await;
    }

    /// Put `reply` into `out:<its platform>` of its chat's partition.
    pub fn send(&self, reply: &Reply) {
        let p = self.streams.partition_of(&reply.platform, &reply.chat.id);
        add_entry(
            &mut self.redis.connection(),
            &self.streams.outbound(p, &reply.platform),
            &codec::encode(reply),
        );
    }

    /// The receipts of every partition.
    pub fn receipts(&self) -> Vec<Receipt> {
        read_partitioned(&mut self.redis.connection(), "delivered")
    }

    /// The receipts once there are at least `count`.
    pub async fn delivered(&self, count: usize) -> Vec<Receipt> {
        eventually(&format!("{count} receipts"), || async {
            self.receipts().len() >= count
        })
        .await;
        self.receipts()
    }

    /// The dead letters of every partition.
    pub fn dead(&self) -> Vec<DeadLetter> {
        read_partitioned(&mut self.redis.connection(), "dead")
    }
}

/// An egress replica besides an [`Egress`], until stopped.
pub struct Replica {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), Error>>,
}

impl Replica {
    pub async fn stop(self) {
        stop(self.shutdown, self.task).await;
    }
}

/// Egress on `redis` with fast backoff, retries and takeovers and the settings
/// `overlay`: its streams and its running stage.
fn launch(
    redis: &RedisServer,
    overlay: &str,
    env: &[(&str, &str)],
) -> Result<(Streams, Replica), Error> {
    let (settings, plumbing) = redis.plumbing(&format!(
        "[runner]\nblock_ms = 100\nretry_ms = 1000\nlease_ttl_ms = 3000\n\
         [egress]\nbackoff_base_ms = 10\nbackoff_cap_ms = 50\n{overlay}"
    ));
    let egress = EgressSettings::from_settings(&settings)?;
    let shutdown = CancellationToken::new();
    let stage = botline_egress::build(egress, &env.to_vec(), &plumbing, shutdown.clone())?;
    let streams = plumbing.streams.clone();
    let task = tokio::spawn(botline_egress::run(stage, plumbing, shutdown.clone()));
    Ok((streams, Replica { shutdown, task }))
}

async fn stop(shutdown: CancellationToken, task: JoinHandle<Result<(), Error>>) {
    shutdown.cancel();
    tokio::time::timeout(WAIT, task)
        .await
        .expect("egress stops")
        .unwrap()
        .unwrap();
}

/// A reply as respond writes it, to `chat` on `platform`.
pub fn reply(id: &str, platform: &str, chat: Chat, text: &str) -> Reply {
    Reply {
        id: id.into(),
        in_reply_to: format!("m-{id}"),
        platform: platform.into(),
        bot: "bot".into(),
        chat,
        thread: None,
        reply_to: None,
        text: text.into(),
        mentions: Vec::new(),
        attachments: Vec::new(),
        platform_data: Default::default(),
        priority: Priority::Normal,
        received_at_ms: now_ms() - 50,
        created_at_ms: now_ms() - 10,
        trace_id: format!("trace-{id}"),
        replay: false,
    }
}

pub fn chat(id: &str, kind: ChatKind) -> Chat {
    Chat {
        id: id.into(),
        kind,
    }
}

/// One request the stand-in received.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub method: Method,
    /// Path and query.
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// The path, without the query.
    pub fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or_default()
    }

    /// A query parameter, percent-decoded.
    pub fn query(&self, name: &str) -> Option<String> {
        let url = reqwest::Url::parse(&format!("http://stand-in{}", self.uri)).unwrap();
        url.query_pairs()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.into_owned())
    }
}

/// The stand-in's answer: status, headers, body (sent as JSON).
pub type Answer = (u16, Vec<(&'static str, String)>, String);

/// An answer of `status` with `body` and no particular headers.
pub fn answer(status: u16, body: serde_json::Value) -> Answer {
    (status, Vec::new(), body.to_string())
}

/// How the stand-in answers a request, given how many came before it.
type Script = dyn Fn(usize, &Received) -> Answer + Send + Sync;

#[derive(Clone)]
pub struct StandIn {
    pub url: String,
    received: Arc<Mutex<Vec<Received>>>,
    script: Arc<Script>,
}

impl StandIn {
    /// A server on 127.0.0.1:0 answering every request with `script`.
    pub async fn start(
        script: impl Fn(usize, &Received) -> Answer + Send + Sync + 'static,
    ) -> StandIn {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stand_in = StandIn {
            url: format!("http://{}", listener.local_addr().unwrap()),
            received: Arc::default(),
            script: Arc::new(script),
        };
        let app = Router::new().fallback(respond).with_state(stand_in.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        stand_in
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

async fn respond(
    State(stand_in): State<StandIn>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received = Received {
        at: Instant::now(),
        method,
        uri: uri.to_string(),
        headers,
        body,
    };
    let nth = {
        let mut all = stand_in.received.lock().unwrap();
        all.push(received.clone());
        all.len() - 1
    };
    let (status, headers, body) = (stand_in.script)(nth, &received);
    let mut response = (StatusCode::from_u16(status).unwrap(), body).into_response();
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    for (name, value) in headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}

/// One part of a `multipart/form-data` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormPart {
    pub name: String,
    pub file_name: Option<String>,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

impl Received {
    /// The parts of a `multipart/form-data` body (RFC 7578), or `None`
    /// when the request is not one or is malformed.
    pub fn multipart(&self) -> Option<Vec<FormPart>> {
        let content_type = self.header("content-type")?;
        let boundary = content_type
            .strip_prefix("multipart/form-data")?
            .split(';')
            .find_map(|param| param.trim().strip_prefix("boundary="))?
            .trim_matches('"');
        let delimiter = format!("--{boundary}").into_bytes();
        let body = self.body.as_ref();
        let mut starts = Vec::new();
        let mut from = 0;
        while let Some(at) = find(&body[from..], &delimiter) {
            starts.push(from + at);
            from += at + delimiter.len();
        }
        let last = *starts.last()?;
        if !body[last + delimiter.len()..].starts_with(b"--") {
            return None;
        }
        let mut parts = Vec::new();
        for pair in starts.windows(2) {
            let raw = body[pair[0] + delimiter.len()..pair[1]]
                .strip_prefix(b"\r\n")?
                .strip_suffix(b"\r\n")?;
            let split = find(raw, b"\r\n\r\n")?;
            let headers = std::str::from_utf8(&raw[..split]).ok()?;
            let mut part = FormPart {
                name: String::new(),
                file_name: None,
                content_type: None,
                body: raw[split + 4..].to_vec(),
            };
            for line in headers.split("\r\n") {
                let (header, value) = line.split_once(':')?;
                match header.trim().to_ascii_lowercase().as_str() {
                    "content-disposition" => {
                        for param in value.split(';').skip(1) {
                            let (key, value) = param.trim().split_once('=')?;
                            let value = value.trim_matches('"').to_string();
                            match key {
                                "name" => part.name = value,
                                "filename" => part.file_name = Some(value),
                                _ => {}
                            }
                        }
                    }
                    "content-type" => part.content_type = Some(value.trim().to_string()),
                    _ => {}
                }
            }
            parts.push(part);
        }
        Some(parts)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Bytes that start like a PNG file, `size` long.
pub fn png(size: usize) -> Vec<u8> {
    let mut bytes = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    bytes.resize(size.max(bytes.len()), 7);
    bytes
}

/// A web server on 127.0.0.1:0 serving fixed files by path (404 for any
/// other), counting the requests.
#[derive(Clone)]
pub struct Files {
    pub url: String,
    hits: Arc<Mutex<Vec<String>>>,
}

impl Files {
    pub async fn start(files: Vec<(&'static str, &'static str, Vec<u8>)>) -> Files {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let served = Files {
            url: format!("http://{}", listener.local_addr().unwrap()),
            hits: Arc::default(),
        };
        let hits = served.hits.clone();
        let files = Arc::new(files);
        let app = Router::new().fallback(move |uri: Uri| {
            let files = files.clone();
            let hits = hits.clone();
            async move {
                hits.lock().unwrap().push(uri.path().to_string());
                match files.iter().find(|(path, _, _)| *path == uri.path()) {
                    Some((_, content_type, bytes)) => {
                        ([("content-type", *content_type)], bytes.clone()).into_response()
                    }
                    None => (StatusCode::NOT_FOUND, "no such file").into_response(),
                }
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        served
    }

    /// The paths asked for, in order.
    pub fn hits(&self) -> Vec<String> {
        self.hits.lock().unwrap().clone()
    }
}
