//! The kinds of Redis connection a stage holds: a pool for short commands,
//! one multiplexed connection for the hot path, and dedicated connections
//! for blocking reads, whose response timeout is longer than their `BLOCK`
//! so a slow reply never strands entries. All come from one [`Redis`]: the
//! URL's ACL user and password, TLS for `rediss://`, and a Redis Cluster
//! for `redis+cluster://host:port,host:port/` (the cluster client of the
//! redis crate, which follows `MOVED`/`ASK` and failovers); [`check_at_start`]
//! stops a binary whose Redis settings Redis refuses.

use crate::config::{ProcessConfig, RedisTls};
use crate::Error;
use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, IntoConnectionInfo, RedisFuture, Value,
};
use std::collections::HashMap;
use std::time::Duration;
use tracing::warn;

/// How long a short command may take before it counts as a failure.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// The scheme of a `BOTLINE_REDIS_URL` naming a Redis Cluster by some of
/// its nodes: `redis+cluster://[user:password@]host:port,host:port/`
/// (`rediss+cluster://` for TLS).
const CLUSTER_SCHEMES: [(&str, &str); 2] = [
    ("redis+cluster://", "redis://"),
    ("rediss+cluster://", "rediss://"),
];

/// The node URLs of a cluster URL, each with the user and password; `None`
/// for the URL of one server.
fn cluster_nodes(url: &str) -> Option<Vec<String>> {
    let (scheme, rest) = CLUSTER_SCHEMES
        .iter()
        .find_map(|(cluster, node)| url.strip_prefix(cluster).map(|rest| (*node, rest)))?;
    let (login, hosts) = match rest.rsplit_once('@') {
        Some((login, hosts)) => (format!("{login}@"), hosts),
        None => (String::new(), rest),
    };
    Some(
        hosts
            .trim_end_matches('/')
            .split(',')
            .filter(|host| !host.is_empty())
            .map(|host| format!("{scheme}{login}{host}/"))
            .collect(),
    )
}

/// The client of one node: `BOTLINE_REDIS_URL` (its user and password
/// included), with the TLS files for a `rediss://` URL; for a cluster URL,
/// its first node. An error names the setting at fault and never shows the
/// password.
pub fn client(process: &ProcessConfig) -> Result<Client, Error> {
    let url_error = |error| Error::config("BOTLINE_REDIS_URL", error);
    let url = match cluster_nodes(&process.redis_url) {
        Some(nodes) => nodes.into_iter().next().ok_or_else(|| {
            Error::config("BOTLINE_REDIS_URL", "a redis+cluster:// URL names no node")
        })?,
        None => process.redis_url.clone(),
    };
    let info = url.as_str().into_connection_info().map_err(url_error)?;
    // No `CLIENT SETINFO` on connecting: Redis 7.0 does not know it, and an
    // ACL user need not be allowed it.
    let redis_settings = info.redis_settings().clone().set_skip_set_lib_name();
    let info = info.set_redis_settings(redis_settings);
    if !matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
        if let Some(name) = process.redis_tls.first_set() {
            return Err(Error::config(
                name,
                "is for TLS, but BOTLINE_REDIS_URL is not a rediss:// URL",
            ));
        }
        return Client::open(info).map_err(url_error);
    }
    // redis's rustls asks for no crypto provider of its own; ring is the
    // one the rest of the workspace uses. Installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::build_with_tls(info, process.redis_tls.certificates()?).map_err(url_error)
}

/// Where the streams live: one server, or a Redis Cluster.
#[derive(Clone)]
pub struct Redis {
    /// The server, or the cluster's first node (the start check, pub/sub:
    /// a cluster delivers every message published to every node).
    pub node: Client,
    /// The cluster's nodes as `BOTLINE_REDIS_URL` names them.
    cluster: Option<Vec<redis::ConnectionInfo>>,
    tls: Option<redis::TlsCertificates>,
}

impl Redis {
    pub fn connect(process: &ProcessConfig) -> Result<Redis, Error> {
        let node = client(process)?;
        let url_error = |error| Error::config("BOTLINE_REDIS_URL", error);
        let cluster = match cluster_nodes(&process.redis_url) {
            None => None,
            Some(nodes) => Some(
                nodes
                    .iter()
                    .map(|url| {
                        let info = url.as_str().into_connection_info().map_err(url_error)?;
                        let settings = info.redis_settings().clone().set_skip_set_lib_name();
                        Ok(info.set_redis_settings(settings))
                    })
                    .collect::<Result<Vec<_>, Error>>()?,
            ),
        };
        let tls = match node.get_connection_info().addr() {
            ConnectionAddr::TcpTls { .. } if cluster.is_some() => {
                Some(process.redis_tls.certificates()?)
            }
            _ => None,
        };
        Ok(Redis { node, cluster, tls })
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    fn cluster_client(&self, response_timeout: Duration) -> Option<Result<ClusterClient, Error>> {
        let nodes = self.cluster.as_ref()?;
        let mut builder = redis::cluster::ClusterClientBuilder::new(nodes.clone())
            .connection_timeout(COMMAND_TIMEOUT)
            .response_timeout(response_timeout)
            .retries(3);
        if let Some(certificates) = &self.tls {
            builder = builder.certs(certificates.clone());
        }
        Some(
            builder
                .build()
                .map_err(|error| Error::config("BOTLINE_REDIS_URL", error)),
        )
    }

    /// A pool of connections for short commands.
    pub fn pool(&self, size: usize) -> Result<Pool, Error> {
        let config = deadpool_redis::PoolConfig {
            max_size: size,
            timeouts: deadpool_redis::Timeouts {
                wait: Some(COMMAND_TIMEOUT),
                create: Some(COMMAND_TIMEOUT),
                recycle: Some(COMMAND_TIMEOUT),
            },
            ..Default::default()
        };
        let pool_error =
            |error: &dyn std::fmt::Display| Error::config("BOTLINE_REDIS_URL", error.to_string());
        match self.cluster_client(COMMAND_TIMEOUT) {
            None => {
                let manager = deadpool_redis::Manager::new(self.node.get_connection_info().clone())
                    .map_err(|error| pool_error(&error))?;
                deadpool_redis::Pool::builder(manager)
                    .config(config)
                    .runtime(deadpool_redis::Runtime::Tokio1)
                    .build()
                    .map(Pool::Node)
                    .map_err(|error| pool_error(&error))
            }
            // The cluster client's connection is multiplexed over every node
            // and reconnects by itself: one is shared, no pool is needed
            // (deadpool-redis's cluster pool cannot take our timeouts and TLS).
            Some(client) => Ok(Pool::Cluster {
                shared: LazyCluster::new(client?),
                redis: Box::new(self.clone()),
            }),
        }
    }

    /// One multiplexed connection for the hot path's short commands (acks,
    /// claims, locks): commands from many tasks share it and are pipelined,
    /// with no checkout round trip; it reconnects by itself.
    pub fn commands(&self) -> Result<Connection, Error> {
        if let Some(client) = self.cluster_client(COMMAND_TIMEOUT) {
            return Ok(Connection::Lazy(LazyCluster::new(client?)));
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(3);
        Ok(Connection::Managed(
            ConnectionManager::new_lazy_with_config(self.node.clone(), config)?,
        ))
    }

    /// A connection of its own for `XREADGROUP … BLOCK block`.
    pub async fn blocking(&self, block: Duration) -> Result<Connection, Error> {
        if let Some(client) = self.cluster_client(block + COMMAND_TIMEOUT) {
            return Ok(Connection::Cluster(client?.get_async_connection().await?));
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(block + COMMAND_TIMEOUT));
        Ok(Connection::Node(
            self.node
                .get_multiplexed_async_connection_with_config(&config)
                .await?,
        ))
    }
}

/// A pool of connections from [`Redis::pool`], for `BOTLINE_REDIS_URL`.
pub fn pool(process: &ProcessConfig, size: usize) -> Result<Pool, Error> {
    Redis::connect(process)?.pool(size)
}

/// Connections for short commands: a pool of them to one server, or the
/// one multiplexed connection to a cluster.
#[derive(Clone)]
pub enum Pool {
    Node(deadpool_redis::Pool),
    Cluster {
        shared: LazyCluster,
        /// For connections of their own ([`detached_connection`]).
        redis: Box<Redis>,
    },
}

impl Pool {
    pub async fn get(&self) -> Result<Pooled, Error> {
        Ok(match self {
            Pool::Node(pool) => Pooled::Node(pool.get().await?),
            Pool::Cluster { shared, .. } => Pooled::Cluster(Connection::Lazy(shared.clone())),
        })
    }
}

/// A connection out of a [`Pool`] (back in it when dropped).
pub enum Pooled {
    Node(deadpool_redis::Connection),
    Cluster(Connection),
}

impl Pooled {
    /// The multiplexed connection underneath, to share among concurrent commands.
    pub fn shared(&self) -> Connection {
        match self {
            Pooled::Node(connection) => Connection::Node((**connection).clone()),
            Pooled::Cluster(connection) => connection.clone(),
        }
    }
}

impl ConnectionLike for Pooled {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Pooled::Node(connection) => connection.req_packed_command(cmd),
            Pooled::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Pooled::Node(connection) => connection.req_packed_commands(pipeline, offset, count),
            Pooled::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Pooled::Node(connection) => connection.get_db(),
            Pooled::Cluster(connection) => connection.get_db(),
        }
    }
}

/// A cluster connection made on first use (as a [`ConnectionManager`] is),
/// so a binary starts while Redis is still coming up, and made again from
/// the cluster's nodes after a command on it timed out or lost its
/// connection: after a failover, a fresh one learns the new masters at once.
#[derive(Clone)]
pub struct LazyCluster {
    client: std::sync::Arc<ClusterClient>,
    connection: std::sync::Arc<tokio::sync::Mutex<Option<ClusterConnection>>>,
}

impl LazyCluster {
    fn new(client: ClusterClient) -> Self {
        LazyCluster {
            client: std::sync::Arc::new(client),
            connection: Default::default(),
        }
    }

    async fn get(&self) -> redis::RedisResult<ClusterConnection> {
        let mut connection = self.connection.lock().await;
        if let Some(connection) = connection.as_ref() {
            return Ok(connection.clone());
        }
        let made = self.client.get_async_connection().await?;
        *connection = Some(made.clone());
        Ok(made)
    }

    /// Forget the connection if `result` says it is broken.
    async fn check<T>(&self, result: redis::RedisResult<T>) -> redis::RedisResult<T> {
        if let Err(error) = &result {
            if error.is_timeout() || error.is_io_error() || error.is_connection_dropped() {
                *self.connection.lock().await = None;
            }
        }
        result
    }
}

/// A multiplexed connection: to one server (made directly, or kept up by a
/// [`ConnectionManager`]), or to a cluster.
#[derive(Clone)]
pub enum Connection {
    Node(MultiplexedConnection),
    Managed(ConnectionManager),
    Cluster(ClusterConnection),
    Lazy(LazyCluster),
}

impl Connection {
    /// The cluster connection underneath, for commands routed to a node of
    /// one's choosing (`SCAN` of the node holding a slot); `None` for one server.
    pub async fn cluster(&self) -> Result<Option<ClusterConnection>, Error> {
        Ok(match self {
            Connection::Cluster(connection) => Some(connection.clone()),
            Connection::Lazy(lazy) => Some(lazy.get().await?),
            Connection::Node(_) | Connection::Managed(_) => None,
        })
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Node(connection) => connection.req_packed_command(cmd),
            Connection::Managed(connection) => connection.req_packed_command(cmd),
            Connection::Cluster(connection) => connection.req_packed_command(cmd),
            Connection::Lazy(lazy) => Box::pin(async move {
                let mut connection = lazy.get().await?;
                let answer = connection.req_packed_command(cmd).await;
                lazy.check(answer).await
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Node(connection) => connection.req_packed_commands(pipeline, offset, count),
            Connection::Managed(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
            Connection::Cluster(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
            Connection::Lazy(lazy) => Box::pin(async move {
                let mut connection = lazy.get().await?;
                let answers = connection
                    .req_packed_commands(pipeline, offset, count)
                    .await;
                lazy.check(answers).await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Node(connection) => connection.get_db(),
            Connection::Managed(connection) => connection.get_db(),
            Connection::Cluster(connection) => connection.get_db(),
            Connection::Lazy(_) => 0,
        }
    }
}

/// Connect once and `PING`, at start. What Redis refuses (the user or the
/// password, a certificate, TLS on one side only, an ACL without `PING`)
/// is a bad setting: the error names it, so the binary stops. Redis not
/// reachable yet (refused, timed out, no such host) is only logged: the
/// binary goes on and `/readyz` says so until Redis answers.
pub async fn check_at_start(client: &Client) -> Result<(), Error> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(COMMAND_TIMEOUT))
        .set_response_timeout(Some(COMMAND_TIMEOUT));
    let answer = async {
        let mut connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
    }
    .await;
    let Err(error) = answer else {
        return Ok(());
    };
    // TLS to a plain port waits for a server hello that never comes.
    let reason = match refusal(&error) {
        None if error.is_timeout()
            && speaks_plain_redis(client.get_connection_info().addr()).await =>
        {
            Some(
                "the port answers plain Redis, not TLS: use a redis:// URL, or Redis's TLS port"
                    .into(),
            )
        }
        reason => reason,
    };
    match reason {
        Some(reason) => Err(Error::config("BOTLINE_REDIS_URL", reason)),
        None => {
            warn!(message = "Redis does not answer yet; /readyz stays false until it does", %error);
            Ok(())
        }
    }
}

/// Why a first connection failed because of a setting, or `None` when it
/// is only unreachable for now. The reasons quote no part of the URL.
fn refusal(error: &redis::RedisError) -> Option<String> {
    use std::io::ErrorKind as Io;
    if error.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(error.code(), Some("WRONGPASS" | "NOAUTH"))
    {
        return Some(
            "Redis refused its user name and password: check them, \
             and that the ACL user is `on` (SECURITY.md)"
                .into(),
        );
    }
    if error.code() == Some("NOPERM") {
        return Some(format!(
            "its user may not run PING ({}): give it the commands of compose/redis/botline-acl.conf",
            error.detail().unwrap_or_default()
        ));
    }
    let io = io_error(error)?;
    if let Some(tls) = io
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        let hint = match tls {
            // Redis refused us: most often for want of a client certificate.
            rustls::Error::AlertReceived(_) => format!(
                "does Redis want a client certificate ({} and {}) signed by its CA?",
                RedisTls::CERT_FILE,
                RedisTls::KEY_FILE
            ),
            _ => format!(
                "is Redis's certificate signed by {} and issued for the URL's host? Is that port TLS?",
                RedisTls::CA_FILE
            ),
        };
        return Some(format!("TLS with Redis failed: {tls} ({hint})"));
    }
    match io.kind() {
        // Connected, then cut off before any answer: one side speaks TLS.
        Io::UnexpectedEof | Io::ConnectionReset | Io::BrokenPipe | Io::ConnectionAborted => {
            Some(format!(
                "Redis closed the connection before answering ({io}): a TLS port needs a rediss:// URL, a plain one redis://"
            ))
        }
        Io::InvalidData => Some(format!("TLS with Redis failed: {io}")),
        _ => None,
    }
}

/// Whether the TLS address `addr` answers a plain-text `PING` as Redis does
/// (`+PONG`, or `-NOAUTH …`): then the URL should not be `rediss://`.
async fn speaks_plain_redis(addr: &ConnectionAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ConnectionAddr::TcpTls { host, port, .. } = addr else {
        return false;
    };
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect((host.as_str(), *port))
            .await
            .ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut first = [0u8; 1];
        stream.read_exact(&mut first).await.ok()?;
        Some(matches!(first[0], b'+' | b'-'))
    };
    tokio::time::timeout(COMMAND_TIMEOUT, probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// The I/O error under a Redis error, if that is what it is (redis keeps
/// it behind an `Arc`).
fn io_error(error: &redis::RedisError) -> Option<&std::io::Error> {
    let source = std::error::Error::source(error)?;
    source.downcast_ref::<std::io::Error>().or_else(|| {
        source
            .downcast_ref::<std::sync::Arc<dyn std::error::Error + Send + Sync>>()?
            .downcast_ref::<std::io::Error>()
    })
}

/// A connection of its own for blocking commands of up to `block`
/// (`XREADGROUP … BLOCK`, `BLMOVE`), for code that has only the pool: one
/// taken out of `pool` for good (the pool makes another when it needs
/// one), or a new one to a cluster, its response timeout `block` +
/// [`COMMAND_TIMEOUT`].
pub async fn detached_connection(pool: &Pool, block: Duration) -> Result<Connection, Error> {
    match pool {
        Pool::Node(_) => match pool.get().await? {
            Pooled::Node(connection) => {
                let mut connection = deadpool_redis::Connection::take(connection);
                connection.set_response_timeout(block + COMMAND_TIMEOUT);
                Ok(Connection::Node(connection))
            }
            Pooled::Cluster(connection) => Ok(connection),
        },
        Pool::Cluster { redis, .. } => redis.blocking(block).await,
    }
}

/// One stream entry as read: its id and fields, or `None` when its payload
/// was deleted while it sat in a pending list.
#[derive(Debug, Clone)]
pub struct RawEntry {
    pub stream: String,
    pub id: String,
    pub fields: Option<Vec<(String, Vec<u8>)>>,
}

/// The entries of an `XREADGROUP`/`XREAD` reply (nil when it timed out).
pub fn parse_read_reply(value: Value) -> Result<Vec<RawEntry>, Error> {
    let mut entries = Vec::new();
    let streams = match value {
        Value::Nil => return Ok(entries),
        Value::Array(streams) => streams
            .into_iter()
            .map(|stream| match stream {
                Value::Array(mut pair) if pair.len() == 2 => {
                    let ids = pair.pop().unwrap_or(Value::Nil);
                    let name = pair.pop().unwrap_or(Value::Nil);
                    Ok((name, ids))
                }
                other => Err(unexpected("stream", &other)),
            })
            .collect::<Result<Vec<_>, Error>>()?,
        Value::Map(streams) => streams,
        other => return Err(unexpected("read reply", &other)),
    };
    for (name, ids) in streams {
        let stream = string(name)?;
        entries.extend(parse_entries(&stream, ids)?);
    }
    Ok(entries)
}

/// A list of `[id, [field, value, …]]`, as `XRANGE` and `XAUTOCLAIM` give it.
pub fn parse_entries(stream: &str, value: Value) -> Result<Vec<RawEntry>, Error> {
    let Value::Array(items) = value else {
        return match value {
            Value::Nil => Ok(Vec::new()),
            other => Err(unexpected("entry list", &other)),
        };
    };
    items
        .into_iter()
        .map(|item| {
            let Value::Array(mut pair) = item else {
                return Err(unexpected("entry", &item));
            };
            if pair.len() != 2 {
                return Err(Error::Garbage(format!("entry of {} parts", pair.len())));
            }
            let fields = pair.pop().unwrap_or(Value::Nil);
            let id = string(pair.pop().unwrap_or(Value::Nil))?;
            let fields = match fields {
                Value::Nil => None,
                Value::Array(flat) => Some(
                    flat.chunks(2)
                        .map(|pair| match pair {
                            [name, value] => Ok((string(name.clone())?, bytes(value.clone())?)),
                            _ => Err(Error::Garbage("odd number of field values".into())),
                        })
                        .collect::<Result<Vec<_>, Error>>()?,
                ),
                other => return Err(unexpected("fields", &other)),
            };
            Ok(RawEntry {
                stream: stream.to_string(),
                id,
                fields,
            })
        })
        .collect()
}

/// A reply that is a map (RESP3) or a flat `[key, value, …]` array (RESP2),
/// as `XINFO` gives them, keyed by name; anything else is empty.
pub fn field_map(value: Value) -> HashMap<String, Value> {
    let pairs: Vec<(Value, Value)> = match value {
        Value::Array(flat) => flat
            .chunks(2)
            .filter_map(|pair| match pair {
                [key, value] => Some((key.clone(), value.clone())),
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => pairs,
        _ => Vec::new(),
    };
    pairs
        .into_iter()
        .filter_map(|(key, value)| string(key).ok().map(|key| (key, value)))
        .collect()
}

pub fn string(value: Value) -> Result<String, Error> {
    String::from_utf8(bytes(value)?).map_err(|error| Error::Garbage(error.to_string()))
}

pub fn bytes(value: Value) -> Result<Vec<u8>, Error> {
    match value {
        Value::BulkString(bytes) => Ok(bytes),
        Value::SimpleString(text) => Ok(text.into_bytes()),
        Value::Int(number) => Ok(number.to_string().into_bytes()),
        other => Err(unexpected("string", &other)),
    }
}

fn unexpected(what: &str, value: &Value) -> Error {
    Error::Garbage(format!("unexpected {what} in reply: {value:?}"))
}

/// The millisecond part of a stream id (`1700000000000-3` → 1700000000000).
pub fn id_millis(id: &str) -> Option<i64> {
    id.split('-').next()?.parse().ok()
}

/// Stream ids order by (milliseconds, sequence).
pub fn id_order(id: &str) -> (i64, u64) {
    let sequence = id
        .split('-')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (id_millis(id).unwrap_or(0), sequence)
}
