//! Slack Socket Mode against a local stand-in that speaks it as Slack
//! documents it: `apps.connections.open` (the app-level token checked)
//! answers a WebSocket URL; each connection starts with `hello`; envelopes
//! not acknowledged by their `envelope_id` when a connection ends are sent
//! again on the next one; `disconnect` comes before Slack closes a socket.
//! Messages keep flowing through a refresh and a dropped socket, none lost
//! or doubled, every envelope acknowledged — and only once its message is in
//! `in`; across two ingest replicas only one connects, and the other takes
//! over when the holder dies. A socket kept quiet stays up on ingest's pings;
//! one gone silent (open, but nothing read or sent) is found dead within
//! `idle_timeout_ms` and replaced. A Slack that closes each socket, or asks
//! for a new one, right after `hello` meets a growing backoff; a replica
//! that cannot reach Slack hands the connection to one that can; `/readyz`
//! and the connection metrics follow a drop.

mod common;

use axum::extract::State as AxumState;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::Json;
use botline_shared::message::ChatKind;
use botline_shared::testing::RedisServer;
use common::connections::{
    expect_backed_off, expect_texts, texts, unreachable_base, with_storm_backoff, Behaviour,
    Command, Protocol, StandIn, WAIT,
};
use common::*;
use serde_json::{json, Value};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const APP_TOKEN: &str = "xapp-1-A0123-456-socket-mode-test";
const BOT: &str = "UBOT";

/// Slack's side of Socket Mode: `hello` first, envelopes acknowledged by
/// their `envelope_id` alone.
struct SocketMode;

type Slack = StandIn<SocketMode>;

#[derive(Default)]
struct Opens {
    /// The `Authorization` header of each `apps.connections.open`.
    opens: Vec<String>,
}

impl Protocol for SocketMode {
    type Api = Opens;

    fn api() -> axum::Router<Slack> {
        axum::Router::new().route("/api/apps.connections.open", post(open))
    }

    fn greeting() -> Option<Value> {
        Some(json!({"type": "hello", "num_connections": 1,
            "debug_info": {"host": "applink-test", "approximate_connection_time": 18060},
            "connection_info": {"app_id": "A0123"}}))
    }

    fn disconnect(reason: &str) -> Value {
        json!({"type": "disconnect", "reason": reason, "debug_info": {"host": "applink-test"}})
    }

    fn frame_id(envelope: &Value) -> String {
        envelope["envelope_id"].as_str().unwrap().to_string()
    }

    fn answer_id(ack: &Value) -> Option<String> {
        ack["envelope_id"].as_str().map(str::to_string)
    }

    fn check_answer(_envelope: &Value, ack: &Value) -> Option<String> {
        (ack.as_object().map(|fields| fields.len()) != Some(1))
            .then(|| format!("an ack with more than its id: {ack}"))
    }

    fn message_id(envelope: &Value) -> Option<String> {
        envelope["payload"]["event"]["ts"]
            .as_str()
            .map(str::to_string)
    }
}

/// `POST /api/apps.connections.open`.
async fn open(AxumState(slack): AxumState<Slack>, headers: HeaderMap) -> Json<Value> {
    let authorization = headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let mut state = slack.state();
    state.api.opens.push(authorization.clone());
    if authorization != format!("Bearer {APP_TOKEN}") {
        state.faults.push(format!("opened with {authorization:?}"));
        return Json(json!({"ok": false, "error": "invalid_auth"}));
    }
    let n = state.api.opens.len();
    Json(json!({"ok": true, "url": format!("{}/link?ticket={n}", slack.socket_base)}))
}

/// An `events_api` envelope carrying a channel message.
fn envelope(id: &str, ts: &str, text: &str) -> Value {
    json!({
        "envelope_id": id, "type": "events_api", "accepts_response_payload": false,
        "retry_attempt": 0, "retry_reason": "",
        "payload": {
            "token": "legacy", "team_id": "T1", "api_app_id": "A0123", "type": "event_callback",
            "event_id": format!("Ev{id}"), "event_time": 1_700_000_000,
            "event": {"type": "message", "channel": "C1", "channel_type": "channel",
                "user": "U42", "text": text, "ts": ts, "event_ts": ts},
        },
    })
}

fn settings(slack: &Slack) -> String {
    settings_for(slack, BOT)
}

/// The settings for the bot `bot` (tests reading metrics each have their own).
fn settings_for(slack: &Slack, bot: &str) -> String {
    format!(
        "[ingest.platforms.slack]\nenabled = true\nmode = \"socket\"\nbot_user_id = \"{bot}\"\n\
         api_base_url = \"{}/api\"\nlease_ttl_ms = 1500\nstandby_poll_ms = 100\n\
         connect_timeout_ms = 5000\nreconnect_base_ms = 20\nreconnect_cap_ms = 200\n",
        slack.api_base
    )
}

/// The socket found dead after a second of silence, pinged after 300 ms.
const IDLE: &str = "idle_timeout_ms = 1000\nping_interval_ms = 300\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_flow_are_acknowledged_and_survive_a_refresh_and_a_drop() {
    let slack = Slack::start().await;
    // Every socket lasts (up 1 ms), so a refresh is a handover at once.
    let overlay = format!("{}stable_after_ms = 1\n", settings(&slack));
    let harness = start_configured(&overlay, &[("BOTLINE_SLACK_APP_TOKEN", APP_TOKEN)]).await;
    let key = INBOUND.to_string();
    let redis = &harness.redis;
    slack.check_inbound(redis, &key);

    slack.wait_accepted(1).await;
    slack.command(Command::Send(envelope(
        "e1",
        "1700000001.000100",
        "first <@UBOT>",
    )));
    slack.command(Command::Send(envelope("e2", "1700000002.000200", "second")));
    // Not a message: acknowledged all the same, nothing added.
    slack.command(Command::Send(
        json!({"envelope_id": "slash-1", "type": "slash_commands",
        "accepts_response_payload": true, "payload": {"command": "/weather", "text": "today"}}),
    ));
    // What `in` holds, growing with each step.
    let mut expected = vec!["first @UBOT", "second"];
    expect_texts(redis, &key, &expected).await;
    slack.wait_all_answered(&["e1", "e2", "slash-1"]).await;
    let first = &read_inbound(redis)[0];
    assert_eq!(first.platform, "slack");
    assert_eq!(first.bot, BOT);
    assert_eq!(first.chat.id, "C1");
    assert_eq!(first.chat.kind, ChatKind::Group);
    assert!(first.mentions.bot);
    assert_eq!(
        first.platform_message_id.as_deref(),
        Some("1700000001.000100")
    );

    // A refresh: `disconnect`, and one more envelope on the old socket
    // before it closes. The new socket opens while the old one is still
    // up; the old one is closed after.
    slack.command(Command::DisconnectThenSend(
        "refresh_requested",
        envelope("e3", "1700000003.000300", "during refresh"),
    ));
    slack.wait_accepted(2).await;
    slack.command(Command::Send(envelope(
        "e4",
        "1700000004.000400",
        "after refresh",
    )));
    expected.extend(["during refresh", "after refresh"]);
    expect_texts(redis, &key, &expected).await;
    slack.wait_all_answered(&["e3", "e4"]).await;
    wait_until(WAIT, "the old socket closed", || slack.state().live == 1).await;
    assert_eq!(
        slack.state().overlapped,
        1,
        "the new socket opened before the old one closed"
    );

    // The socket drops: opened again, and what was pending arrives once.
    slack.command(Command::Drop);
    slack.wait_accepted(3).await;
    slack.command(Command::Send(envelope(
        "e5",
        "1700000005.000500",
        "after a drop",
    )));
    // Slack sends an envelope again (say it missed the ack): added once.
    slack.command(Command::Send(envelope(
        "e5-again",
        "1700000005.000500",
        "after a drop",
    )));
    expected.push("after a drop");
    expect_texts(redis, &key, &expected).await;
    slack.wait_all_answered(&["e5", "e5-again"]).await;

    let state = slack.state();
    assert!(state.faults.is_empty(), "{:?}", state.faults);
    assert_eq!(
        state.api.opens.len(),
        3,
        "apps.connections.open once per socket"
    );
    assert!(
        state.most_live <= 2,
        "at most the refresh's two sockets at once"
    );
    drop(state);
    assert_eq!(texts(redis, &key).len(), 5);
}

#[tokio::test]
async fn in_socket_mode_the_webhook_is_off_and_the_app_token_is_required() {
    let slack = Slack::start().await;
    let harness =
        start_configured(&settings(&slack), &[("BOTLINE_SLACK_APP_TOKEN", APP_TOKEN)]).await;
    let answer = post_hook(&harness, "slack", "{}", &[]).await;
    assert_refused(answer, 401, "socket mode");

    let redis = RedisServer::start();
    let refused = |env: &[(&str, &str)]| {
        configured_ingest(&redis.url(), Some(&settings(&slack)), env, None)
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default()
    };
    assert!(refused(&[]).contains("BOTLINE_SLACK_APP_TOKEN"));
    assert!(refused(&[("BOTLINE_SLACK_APP_TOKEN", "xoxb-a-bot-token")]).contains("xapp"));
    // The signing secret is not needed in socket mode.
    assert_eq!(refused(&[("BOTLINE_SLACK_APP_TOKEN", APP_TOKEN)]), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_open_one_connection_and_the_other_takes_over() {
    let slack = Slack::start().await;
    let redis = RedisServer::start();
    let replicas = Replicas::new(
        &redis,
        settings(&slack),
        &[("BOTLINE_SLACK_APP_TOKEN", APP_TOKEN)],
    );
    // The first replica runs on a runtime of its own, so it can die.
    let (doomed, key) = replicas.start_doomed();
    slack.wait_accepted(1).await;
    let second_shutdown = CancellationToken::new();
    replicas.start(&second_shutdown);
    slack.command(Command::Send(envelope("r1", "1700000101.000100", "one")));
    expect_texts(&redis, &key, &["one"]).await;
    slack.wait_all_answered(&["r1"]).await;
    assert_eq!(slack.state().accepted, 1, "the second replica stands by");

    // The holder dies without a word, an envelope unacknowledged: its
    // lease expires, the other replica connects and gets it.
    slack.command(Command::Send(
        json!({"envelope_id": "never-acked", "type": "hello-unknown"}),
    ));
    doomed.shutdown_background();
    slack.wait_accepted(2).await;
    slack.command(Command::Send(envelope("r2", "1700000102.000200", "two")));
    expect_texts(&redis, &key, &["one", "two"]).await;
    slack.wait_all_answered(&["r2"]).await;

    let state = slack.state();
    assert!(state.faults.is_empty(), "{:?}", state.faults);
    assert_eq!(state.most_live, 1, "never two connections at once");
    assert_eq!(state.api.opens.len(), 2);
    drop(state);
    second_shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_socket_is_kept_and_a_silent_one_is_replaced_within_the_idle_time() {
    let slack = Slack::start().await;
    let harness = start_configured(
        &format!("{}{IDLE}", settings(&slack)),
        &[("BOTLINE_SLACK_APP_TOKEN", APP_TOKEN)],
    )
    .await;
    let key = INBOUND.to_string();
    let redis = &harness.redis;
    slack.check_inbound(redis, &key);

    slack.wait_accepted(1).await;
    slack.command(Command::Send(envelope("e1", "1700000201.000100", "one")));
    expect_texts(redis, &key, &["one"]).await;
    slack.wait_all_answered(&["e1"]).await;

    // Quiet, but answering: ingest's pings (every 300 ms) get their pongs,
    // and the socket outlives its idle time several times over.
    wait_until(WAIT, "ten pings", || slack.state().pings >= 10).await;
    assert_eq!(slack.state().accepted, 1, "a quiet socket is kept");

    // Silent: an envelope, then nothing at all, the TCP connection open.
    // Its ack goes nowhere; the socket is found dead and replaced, and the
    // envelope, sent again on the new one, is added once.
    let silenced = std::time::Instant::now();
    slack.command(Command::SendThenSilence(envelope(
        "e2",
        "1700000202.000200",
        "just before the silence",
    )));
    slack.wait_accepted(2).await;
    assert_replaced_after_idle(silenced, Duration::from_secs(1));
    slack.command(Command::Send(envelope(
        "e3",
        "1700000203.000300",
        "after the silence",
    )));
    expect_texts(
        redis,
        &key,
        &["one", "just before the silence", "after the silence"],
    )
    .await;
    slack.wait_all_answered(&["e2", "e3"]).await;

    let state = slack.state();
    assert!(state.faults.is_empty(), "{:?}", state.faults);
    assert_eq!(state.accepted, 2);
    assert_eq!(
        state.api.opens.len(),
        2,
        "apps.connections.open once per socket"
    );
    drop(state);
    assert_eq!(texts(redis, &key).len(), 3, "nothing doubled");
}

#[tokio::test]
async fn idle_and_connection_settings_are_checked_at_start() {
    let slack = Slack::start().await;
    let redis = RedisServer::start();
    let refused = |extra: &str| {
        configured_ingest(
            &redis.url(),
            Some(&format!("{}{extra}", settings(&slack))),
            &[("BOTLINE_SLACK_APP_TOKEN", APP_TOKEN)],
            None,
        )
        .err()
        .map(|error| error.to_string())
        .unwrap_or_default()
    };
    assert!(refused("idle_timeout_ms = 0\n").contains("ingest.platforms.slack.idle_timeout_ms"));
    assert!(refused("idle_timeout_ms = 1000\nping_interval_ms = 1000\n")
        .contains("ingest.platforms.slack.ping_interval_ms"));
    assert_eq!(
        refused("idle_timeout_ms = 1000\nping_interval_ms = 0\n"),
        ""
    );
    for timing in ["handoff_after_ms", "stable_after_ms"] {
        assert!(refused(&format!("{timing} = 0\n")).contains(&format!(
            "setting ingest.platforms.slack.{timing}: must be at least 1"
        )));
    }
}

const TOKEN_ENV: (&str, &str) = ("BOTLINE_SLACK_APP_TOKEN", APP_TOKEN);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_closed_or_refreshed_right_after_hello_are_reopened_after_a_growing_backoff() {
    let slack = Slack::start().await;
    slack.state().behaviour = Behaviour::CloseAtOnce;
    let _harness = start_configured(&with_storm_backoff(&settings(&slack)), &[TOKEN_ENV]).await;
    expect_backed_off(6, || slack.state().attempts.clone()).await;

    // `disconnect` right after `hello`, again and again: no handover
    // storm either, the backoff still growing.
    {
        let mut state = slack.state();
        state.behaviour = Behaviour::DisconnectAtOnce;
        state.attempts.clear();
    }
    expect_backed_off(6, || slack.state().attempts.clone()).await;
    let state = slack.state();
    assert!(state.faults.is_empty(), "{:?}", state.faults);
    assert_eq!(state.accepted, 0, "no socket was served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_socket_refreshed_at_once_backs_off_though_the_first_socket_lasted() {
    let slack = Slack::start().await;
    let overlay = format!(
        "{}stable_after_ms = 300\n",
        with_storm_backoff(&settings(&slack))
    );
    let harness = start_configured(&overlay, &[TOKEN_ENV]).await;
    let key = INBOUND.to_string();
    slack.wait_accepted(1).await;
    // Answered, so `hello` (before it on the socket) was read: up by now.
    slack.command(Command::Send(envelope("l1", "1700000501.000100", "one")));
    slack.wait_all_answered(&["l1"]).await;
    let up = std::time::Instant::now();
    wait_until(WAIT, "the first socket up past stable_after_ms", || {
        up.elapsed() >= Duration::from_millis(400)
    })
    .await;

    // Slack refreshes the socket that lasted (a handover at once), then
    // every later socket right after its `hello`: those did not last.
    {
        let mut state = slack.state();
        state.behaviour = Behaviour::DisconnectAtOnce;
        state.attempts.clear();
    }
    slack.command(Command::DisconnectThenSend(
        "refresh_requested",
        envelope("l2", "1700000502.000200", "during refresh"),
    ));
    expect_backed_off(6, || slack.state().attempts.clone()).await;
    expect_texts(&harness.redis, &key, &["one", "during refresh"]).await;
    let state = slack.state();
    assert!(state.faults.is_empty(), "{:?}", state.faults);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_cannot_reach_slack_hands_the_connection_to_a_replica_that_can() {
    let prometheus = prometheus();
    let slack = Slack::start().await;
    let redis = RedisServer::start();
    let bot = "UHANDOFF";
    let reachable = format!("{}handoff_after_ms = 1000\n", settings_for(&slack, bot));
    let unreachable = reachable.replace(&slack.api_base, &unreachable_base().await);
    let replicas = Replicas::new(&redis, reachable, &[TOKEN_ENV]);
    let lease_key = botline_shared::streams::Streams::default().consumer_lease("slack-socket", bot);
    let holder = || -> Option<String> {
        redis::cmd("GET")
            .arg(&lease_key)
            .query(&mut redis.connection())
            .unwrap()
    };

    // The first replica takes the lease, but every connection it tries fails.
    let first_shutdown = CancellationToken::new();
    let key = replicas.with_overlay(unreachable).start(&first_shutdown);
    wait_until(WAIT, "the first replica holding the lease", || {
        holder().is_some()
    })
    .await;
    let first = holder();
    let second_shutdown = CancellationToken::new();
    replicas.start(&second_shutdown);

    // It gives the lease up; the second takes it and connects.
    slack.wait_accepted(1).await;
    assert_ne!(holder(), first, "the lease changed hands");
    slack.command(Command::Send(envelope("h1", "1700000301.000100", "one")));
    slack.command(Command::Send(envelope("h2", "1700000302.000200", "two")));
    slack.command(Command::Send(envelope(
        "h2-again",
        "1700000302.000200",
        "two",
    )));
    expect_texts(&redis, &key, &["one", "two"]).await;
    slack.wait_all_answered(&["h1", "h2", "h2-again"]).await;
    let handoffs =
        format!("botline_ingest_connection_handoffs_total{{platform=\"slack\",bot=\"{bot}\"}}");
    assert!(
        botline_tests::metric_value(&prometheus.render(), &handoffs) >= Some(1.0),
        "{handoffs} counted"
    );

    let state = slack.state();
    assert!(state.faults.is_empty(), "{:?}", state.faults);
    assert_eq!(
        state.accepted, 1,
        "only the replica that can reach Slack connected"
    );
    assert_eq!(state.most_live, 1);
    drop(state);
    first_shutdown.cancel();
    second_shutdown.cancel();
}

/// `/readyz`'s status and its check `check` (`None`: not listed).
async fn readyz(base: &str, check: &str) -> (u16, Option<bool>) {
    let Ok(response) = reqwest::get(format!("{base}/readyz")).await else {
        return (0, None);
    };
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or_default();
    (status, body["checks"][check].as_bool())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_and_the_connection_metrics_follow_a_drop() {
    let prometheus = prometheus();
    let slack = Slack::start().await;
    let bot = "UVISIBLE";
    let harness = start_configured(&settings_for(&slack, bot), &[TOKEN_ENV]).await;
    let health = harness.serve_health().await;
    let check = format!("slack:{bot}");
    let metric = |name: &str| {
        let series = format!("{name}{{platform=\"slack\",bot=\"{bot}\"}}");
        botline_tests::metric_value(&prometheus.render(), &series)
    };
    let ready_is = |expected: (u16, Option<bool>)| {
        let (health, check) = (health.clone(), check.clone());
        async move {
            let what = format!("/readyz {expected:?}");
            wait_for(WAIT, &what, || {
                let (health, check) = (health.clone(), check.clone());
                async move { readyz(&health, &check).await == expected }
            })
            .await;
        }
    };

    slack.wait_accepted(1).await;
    ready_is((200, Some(true))).await;
    assert_eq!(metric("botline_ingest_connection_up"), Some(1.0));
    wait_until(WAIT, "the last event's age exported", || {
        metric("botline_ingest_connection_last_event_age_seconds").is_some()
    })
    .await;
    let reconnects = metric("botline_ingest_connection_reconnects_total").unwrap_or(0.0);

    // The socket drops and Slack refuses the next ones: not ready, down.
    slack.state().behaviour = Behaviour::Refuse;
    slack.command(Command::Drop);
    ready_is((503, Some(false))).await;
    assert_eq!(metric("botline_ingest_connection_up"), Some(0.0));

    // Slack takes sockets again: ready, up, the reconnects counted.
    slack.state().behaviour = Behaviour::Serve;
    slack.wait_accepted(2).await;
    ready_is((200, Some(true))).await;
    assert_eq!(metric("botline_ingest_connection_up"), Some(1.0));
    let after = metric("botline_ingest_connection_reconnects_total").unwrap_or(0.0);
    assert!(after > reconnects, "reconnects {reconnects} then {after}");
    slack.command(Command::Send(envelope("v1", "1700000401.000100", "back")));
    expect_texts(&harness.redis, INBOUND, &["back"]).await;
}
