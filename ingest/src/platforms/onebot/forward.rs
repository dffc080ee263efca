//! Forward WebSocket (`mode = "forward"`): ingest connects to the
//! implementation's WebSocket server (`ws_url`, its universal endpoint,
//! which serves events and actions on one connection) with
//! `Authorization: Bearer <access token>`.
//!
//! One ingest replica holds the bot's connection, by a lease
//! ([`crate::platforms::connection`]), and carries the bot's replies over
//! it; the others stand by and take over within the lease's ttl when the
//! holder dies. A connection that drops, is refused, or falls silent for
//! `heartbeat_misses` heartbeat intervals is opened again with backoff.

use super::session::{sends, texts, Closed, Session};
use super::{LEASE_KIND, PLATFORM};
use crate::inbox::Inbox;
use crate::platforms::connection::{open_unless, Connector, Ended, Held, Link, Supervision};
use crate::platforms::relay::Carrier;
use botline_shared::telemetry::Health;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use std::sync::Arc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_util::sync::CancellationToken;

/// Where to connect, and as which bot.
pub(super) struct Target {
    /// `ws://` or `wss://`.
    pub url: url::Url,
    /// The bot's QQ number: names the lease, the link and the frame stream.
    pub self_id: String,
    /// The implementation's access token: never logged.
    pub token: String,
    pub heartbeat_misses: u32,
    pub supervision: Supervision,
}

/// Keep the bot's connection up from whichever replica holds its lease.
pub(super) fn start(
    target: Arc<Target>,
    inbox: Inbox,
    health: Health,
    shutdown: CancellationToken,
) {
    let supervision = target.supervision.clone();
    let name = target.self_id.clone();
    let held = Held::new(
        &inbox,
        LEASE_KIND,
        PLATFORM.name,
        name,
        health,
        &supervision,
    );
    let carrier = Carrier::new(
        &inbox,
        PLATFORM.name,
        &target.self_id,
        held.lease.clone(),
        supervision.standby_poll,
    );
    let forward = Forward {
        target,
        inbox,
        carrier,
    };
    held.supervise(Arc::new(forward), supervision, shutdown);
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Forward {
    target: Arc<Target>,
    inbox: Inbox,
    /// The bot's frames, under the same lease as the connection.
    carrier: Carrier,
}

impl Connector for Forward {
    fn connect<'a>(&'a self, link: &'a Link, stop: &'a CancellationToken) -> BoxFuture<'a, Ended> {
        Box::pin(self.run(link, stop))
    }
}

impl Forward {
    async fn run(&self, link: &Link, stop: &CancellationToken) -> Ended {
        let socket = match open_unless(self.open(), stop).await {
            Ok(socket) => socket,
            Err(ended) => return ended,
        };
        link.up();
        let (outgoing, incoming) = socket.split();
        let session = Session {
            inbox: &self.inbox,
            link,
            carrier: Some(self.carrier.clone()),
            heartbeat_misses: self.target.heartbeat_misses,
            route: "onebot_forward",
        };
        match session.run(texts(incoming), sends(outgoing), stop).await {
            Closed::Stopped => Ended::Stopped,
            // Opened again after a backoff (from its start if it lasted),
            // so an implementation that keeps closing is not hammered.
            Closed::Ended { reason } => Ended::Failed(reason),
        }
    }

    /// The WebSocket, with the access token.
    async fn open(&self) -> Result<Socket, String> {
        let target = &self.target;
        let mut request = target
            .url
            .as_str()
            .into_client_request()
            .map_err(|error| format!("ws_url: {error}"))?;
        let bearer = HeaderValue::from_str(&format!("Bearer {}", target.token))
            .map_err(|_| "the access token is not a valid header value".to_string())?;
        request.headers_mut().insert("authorization", bearer);
        let timeout = target.supervision.connect_timeout;
        let connecting = tokio::time::timeout(timeout, tokio_tungstenite::connect_async(request));
        match connecting.await {
            Ok(Ok((socket, _))) => Ok(socket),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => Err(format!(
                "the onebot implementation at {} refused the connection: HTTP {}",
                target.url,
                response.status()
            )),
            Ok(Err(error)) => Err(format!("could not connect to {}: {error}", target.url)),
            Err(_) => Err(format!(
                "no connection to {} within {timeout:?}",
                target.url
            )),
        }
    }
}
