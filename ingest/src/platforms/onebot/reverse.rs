//! Reverse WebSocket (`mode = "reverse"`): the implementation connects to
//! ingest at `GET /hooks/onebot/ws`, with `X-Self-ID` (the bot's QQ
//! number), `X-Client-Role` (`Universal`: events and actions on one
//! connection; or separate `Event` and `API` connections) and
//! `Authorization: Bearer <access token>` (`Token <…>` and an
//! `access_token` query parameter are taken too). A missing or wrong token
//! is refused before the upgrade with 401, counted as `missing_token` or
//! `bad_token` like a webhook's refusals; a missing or unreadable
//! `X-Self-ID` or role with 400.
//!
//! The implementation chooses the replica (through the load balancer), so
//! the replica holding a bot's `Universal`/`API` connection is the one that
//! carries its replies: each such connection takes the bot's lease when it
//! opens, even from another connection (the newest one is the one the
//! implementation is using; an older one may be half-open), and reads the
//! bot's frames only while it holds the lease (renewed between reads,
//! checked again in the script that claims each frame). An older
//! connection is not closed: it keeps delivering events (deduplicated), and
//! carries the replies again if the lease comes free (the newer one
//! closed). Connections that fall silent for `heartbeat_misses` heartbeat
//! intervals are closed; the implementation reconnects.
//!
//! Each bot has a link here (`botline_ingest_connection_*{bot}`): up while
//! a connection of it is open on this replica. Its `/readyz` check never
//! fails for want of a connection: the implementation may well be
//! connected to another replica, and a replica it cannot reach for being
//! unready could never get one.

use super::session::{sends, texts, Closed, Session};
use super::{LEASE_KIND, PLATFORM};
use crate::error::IngestError;
use crate::inbox::Inbox;
use crate::platforms::connection::{watch_age, Lease, Link, Supervision};
use crate::platforms::relay::Carrier;
use crate::platforms::{HookRequest, SocketService};
use axum::extract::ws::WebSocket;
use botline_shared::telemetry::Health;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What the implementation's connections are, by `X-Client-Role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Universal,
    Event,
    Api,
}

impl Role {
    /// Whether actions (the bot's replies) may go over it.
    fn carries(self) -> bool {
        matches!(self, Role::Universal | Role::Api)
    }

    fn parse(role: Option<&str>) -> Option<Role> {
        match role.map(str::to_ascii_lowercase).as_deref() {
            None | Some("universal") => Some(Role::Universal),
            Some("event") => Some(Role::Event),
            Some("api") => Some(Role::Api),
            Some(_) => None,
        }
    }
}

/// The connections the implementation opens to this replica.
pub(super) struct Reverse {
    /// The implementation's access token: never logged.
    token: String,
    heartbeat_misses: u32,
    supervision: Supervision,
    /// Set when ingest starts: what connections need.
    runtime: OnceLock<Runtime>,
    /// Each bot's link on this replica and its connections open here.
    bots: Mutex<HashMap<String, (Arc<Link>, usize)>>,
}

#[derive(Clone)]
struct Runtime {
    inbox: Inbox,
    health: Health,
    shutdown: CancellationToken,
}

/// Who opened a connection, as its opening request says.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Opening {
    pub bot: String,
    pub role: Role,
}

impl Reverse {
    pub fn new(token: String, heartbeat_misses: u32, supervision: Supervision) -> Self {
        Reverse {
            token,
            heartbeat_misses,
            supervision,
            runtime: OnceLock::new(),
            bots: Mutex::new(HashMap::new()),
        }
    }

    pub fn start(&self, inbox: Inbox, health: Health, shutdown: CancellationToken) {
        let _ = self.runtime.set(Runtime {
            inbox,
            health,
            shutdown,
        });
    }

    /// Verify a connection's opening request; what serves the socket.
    pub fn accept(self: Arc<Self>, request: &HookRequest) -> Result<SocketService, IngestError> {
        let opening = self.verify(request)?;
        let runtime = self.runtime.get().cloned().ok_or_else(|| {
            IngestError::Malformed("ingest is still starting; connect again".into())
        })?;
        Ok(Box::new(move |socket| {
            Box::pin(self.serve(socket, opening, runtime))
        }))
    }

    /// The token first (401), then who connects (400).
    pub(super) fn verify(&self, request: &HookRequest) -> Result<Opening, IngestError> {
        let refuse = |reason, detail: &str| IngestError::Unverified {
            platform: PLATFORM.name,
            reason,
            detail: detail.into(),
        };
        let given = request
            .header("authorization")
            .and_then(|value| value.split_once(' '))
            .filter(|(scheme, _)| {
                scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token")
            })
            .map(|(_, token)| token.trim().to_string())
            .or_else(|| request.query_param("access_token"))
            .ok_or_else(|| {
                refuse(
                    "missing_token",
                    "no Authorization: Bearer header and no access_token parameter",
                )
            })?;
        if !bool::from(given.as_bytes().ct_eq(self.token.as_bytes())) {
            return Err(refuse(
                "bad_token",
                &format!("the access token is not {}", super::TOKEN_ENV),
            ));
        }
        let bot = request
            .header("x-self-id")
            .filter(|id| (1..=20).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| {
                IngestError::Malformed("X-Self-ID must be the bot's QQ number".into())
            })?;
        let role = Role::parse(request.header("x-client-role")).ok_or_else(|| {
            IngestError::Malformed("X-Client-Role must be Universal, Event or API".into())
        })?;
        Ok(Opening {
            bot: bot.to_string(),
            role,
        })
    }

    async fn serve(self: Arc<Self>, socket: WebSocket, opening: Opening, runtime: Runtime) {
        let Opening { bot, role } = opening;
        let link = self.opened(&bot, &runtime);
        let carrier = match role.carries() {
            true => Some(self.carrier(&bot, &runtime.inbox).await),
            false => None,
        };
        info!(message = "onebot connected", %bot, ?role);
        let (outgoing, incoming) = socket.split();
        let session = Session {
            inbox: &runtime.inbox,
            link: &link,
            carrier: carrier.clone(),
            heartbeat_misses: self.heartbeat_misses,
            route: "onebot_reverse",
        };
        let closed = session
            .run(texts(incoming), sends(outgoing), &runtime.shutdown)
            .await;
        if let Some(carrier) = carrier {
            carrier.lease().release().await;
        }
        self.closed(&bot);
        match closed {
            Closed::Stopped => info!(message = "onebot connection closed", %bot, ?role),
            Closed::Ended { reason } => {
                info!(message = "onebot connection ended", %bot, ?role, %reason)
            }
        }
    }

    /// The bot's frames for this connection, which takes the bot's lease:
    /// the newest connection carries the replies.
    async fn carrier(&self, bot: &str, inbox: &Inbox) -> Carrier {
        let lease = Lease::new(
            inbox.pool.clone(),
            inbox.streams.consumer_lease(LEASE_KIND, bot),
            self.supervision.lease_ttl,
        );
        if let Err(error) = lease.take_over().await {
            warn!(message = "could not take the onebot lease; the connection waits for it", %bot, %error);
        }
        let poll = self.supervision.standby_poll;
        Carrier::new(inbox, PLATFORM.name, bot, lease, poll)
    }

    /// A connection of `bot` opened here: its link, up.
    fn opened(&self, bot: &str, runtime: &Runtime) -> Arc<Link> {
        let mut bots = self.bots.lock().expect("bots lock");
        let again = bots.contains_key(bot);
        let (link, open) = bots.entry(bot.to_string()).or_insert_with(|| {
            let link = Arc::new(Link::new(
                PLATFORM.name,
                bot.to_string(),
                runtime.health.clone(),
            ));
            watch_age(link.clone(), runtime.shutdown.clone());
            (link, 0)
        });
        if again && *open == 0 {
            link.reconnecting();
        }
        *open += 1;
        link.up();
        link.clone()
    }

    /// A connection of `bot` closed: with none left, its link stands by.
    fn closed(&self, bot: &str) {
        let mut bots = self.bots.lock().expect("bots lock");
        if let Some((link, open)) = bots.get_mut(bot) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                link.stand_by();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderName, Method};

    fn check(headers: &[(&str, &str)], query: &str, expected: Result<(&str, Role), &str>) {
        let reverse = Reverse::new(
            "kSLuTF2GC2Q4q4ugm3".into(),
            3,
            crate::platforms::connection::Timings {
                lease_ttl_ms: 1,
                standby_poll_ms: 1,
                connect_timeout_ms: 1,
                reconnect_base_ms: 1,
                reconnect_cap_ms: 1,
                handoff_after_ms: 1,
                stable_after_ms: 1,
            }
            .checked("test")
            .unwrap(),
        );
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        let request = HookRequest::new(
            Method::GET,
            Some(query.to_string()),
            map,
            Default::default(),
        );
        let got = reverse
            .verify(&request)
            .map(|opening| (opening.bot, opening.role))
            .map_err(|error| error.label());
        let expected = expected.map(|(bot, role)| (bot.to_string(), role));
        assert_eq!(got, expected, "{headers:?} {query:?}");
    }

    #[test]
    fn openings_are_verified_token_first() {
        let bearer = ("authorization", "Bearer kSLuTF2GC2Q4q4ugm3");
        let bot = ("x-self-id", "10001000");
        check(
            &[bearer, bot, ("x-client-role", "Universal")],
            "",
            Ok(("10001000", Role::Universal)),
        );
        check(
            &[bearer, bot, ("x-client-role", "API")],
            "",
            Ok(("10001000", Role::Api)),
        );
        check(&[bearer, bot], "", Ok(("10001000", Role::Universal)));
        check(
            &[
                ("authorization", "Token kSLuTF2GC2Q4q4ugm3"),
                bot,
                ("x-client-role", "event"),
            ],
            "",
            Ok(("10001000", Role::Event)),
        );
        check(
            &[bot],
            "access_token=kSLuTF2GC2Q4q4ugm3",
            Ok(("10001000", Role::Universal)),
        );
        check(&[bot], "", Err("missing_token"));
        check(
            &[("authorization", "Basic a2V5"), bot],
            "",
            Err("missing_token"),
        );
        check(
            &[("authorization", "Bearer kSLuTF2GC2Q4q4ug"), bot],
            "",
            Err("bad_token"),
        );
        check(&[bot], "access_token=nope", Err("bad_token"));
        check(&[bearer], "", Err("malformed"));
        check(&[bearer, ("x-self-id", "bot-1")], "", Err("malformed"));
        check(
            &[bearer, bot, ("x-client-role", "Observer")],
            "",
            Err("malformed"),
        );
    }
}
