//! DingTalk Stream mode against a local stand-in that speaks it as
//! DingTalk documents it (and its dingtalk-stream SDKs implement it): the
//! registration call (clientId, clientSecret and the robot subscription
//! checked) answers an endpoint and a one-time ticket; frames carry
//! `specVersion`, `type`, `headers` (`messageId`, `topic`) and `data`;
//! CALLBACK frames not acknowledged by their `messageId` when a connection
//! ends are sent again on the next one; `ping` wants its pong; `disconnect`
//! comes before DingTalk closes a socket. Messages keep flowing through a
//! disconnect and a dropped socket, none lost or doubled, every frame
//! answered — acknowledgements only once the message is in `in`; across two
//! ingest replicas only one connects, and the other takes over when the
//! holder dies. A quiet socket stays up on ingest's pings; one gone silent
//! (open, but nothing read or sent) is found dead within `idle_timeout_ms`
//! and replaced. A DingTalk that closes each socket, or sends `disconnect`,
//! right after accepting it meets a growing backoff.

mod common;

use axum::extract::State as AxumState;
use axum::routing::post;
use axum::Json;
use botline_ingest::platforms::dingtalk::SESSION_WEBHOOK;
use botline_shared::message::ChatKind;
use botline_shared::testing::RedisServer;
use common::connections::{
    expect_backed_off, expect_texts, texts, with_storm_backoff, Behaviour, Command, Protocol,
    StandIn, WAIT,
};
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const CLIENT_ID: &str = "dingclientid0123";
const APP_SECRET: &str = "GT-lsu-taDAsTsxxxx-app-secret";
const ROBOT_TOPIC: &str = "/v1.0/im/bot/messages/get";

/// DingTalk's side of Stream mode: a socket only with a ticket the
/// registration issued, frames answered by their `messageId`, only
/// CALLBACKs sent again.
struct StreamMode;

type DingTalk = StandIn<StreamMode>;

#[derive(Default)]
struct Registrations {
    /// Registration bodies, in order; tickets issued and not yet used.
    registrations: Vec<Value>,
    tickets: BTreeSet<String>,
}

impl Protocol for StreamMode {
    type Api = Registrations;

    fn api() -> axum::Router<DingTalk> {
        axum::Router::new().route("/v1.0/gateway/connections/open", post(register))
    }

    fn admit(query: &str, api: &mut Registrations) -> Result<(), String> {
        let ticket = url::form_urlencoded::parse(query.as_bytes())
            .find(|(name, _)| name == "ticket")
            .map(|(_, value)| value.into_owned())
            .unwrap_or_default();
        if api.tickets.remove(&ticket) {
            Ok(())
        } else {
            Err(format!("connected with ticket {ticket:?}"))
        }
    }

    fn disconnect(reason: &str) -> Value {
        system("disconnect", "sys-disconnect", json!({"reason": reason}))
    }

    fn frame_id(frame: &Value) -> String {
        frame["headers"]["messageId"].as_str().unwrap().to_string()
    }

    fn answer_id(answer: &Value) -> Option<String> {
        answer["headers"]["messageId"].as_str().map(str::to_string)
    }

    fn check_answer(frame: &Value, answer: &Value) -> Option<String> {
        let id = Self::frame_id(frame);
        let expected = if frame["type"] == "SYSTEM" {
            // The pong: the ping's own headers and data.
            json!({"code": 200, "headers": frame["headers"], "message": "OK", "data": frame["data"]})
        } else if frame["type"] == "EVENT" {
            json!({"code": 200, "headers": {"contentType": "application/json", "messageId": id},
                "message": "OK", "data": "{\"message\":\"success\",\"status\":\"SUCCESS\"}"})
        } else {
            json!({"code": 200, "headers": {"contentType": "application/json", "messageId": id},
                "message": "OK", "data": "{\"response\":null}"})
        };
        (*answer != expected).then(|| format!("answered {answer}, expected {expected}"))
    }

    fn message_id(frame: &Value) -> Option<String> {
        if frame["type"] != "CALLBACK" {
            return None;
        }
        let data: Value = serde_json::from_str(frame["data"].as_str().unwrap()).unwrap();
        Some(data["msgId"].as_str().unwrap().to_string())
    }

    /// A ping of a closed connection is not asked again.
    fn sent_again(frame: &Value) -> bool {
        frame["type"] == "CALLBACK"
    }
}

/// `POST /v1.0/gateway/connections/open`.
async fn register(
    AxumState(dingtalk): AxumState<DingTalk>,
    Json(body): Json<Value>,
) -> Json<Value> {
    let mut state = dingtalk.state();
    state.api.registrations.push(body.clone());
    let subscribed = body["subscriptions"]
        .as_array()
        .is_some_and(|subscriptions| {
            subscriptions.contains(&json!({"type": "CALLBACK", "topic": ROBOT_TOPIC}))
        });
    if body["clientId"] != CLIENT_ID || body["clientSecret"] != APP_SECRET || !subscribed {
        state.faults.push(format!("registered with {body}"));
    }
    let ticket = format!("ticket-{}", state.api.registrations.len());
    state.api.tickets.insert(ticket.clone());
    let endpoint = format!("{}/connect", dingtalk.socket_base);
    Json(json!({"endpoint": endpoint, "ticket": ticket}))
}

fn system(topic: &str, message_id: &str, data: Value) -> Value {
    json!({"specVersion": "1.0", "type": "SYSTEM",
        "headers": {"contentType": "application/json", "messageId": message_id,
            "time": "1700000000000", "topic": topic},
        "data": data.to_string()})
}

/// A CALLBACK frame carrying a group text message mentioning the bot.
fn callback(message_id: &str, msg_id: &str, text: &str) -> Value {
    let data = json!({
        "conversationId": "cidGroup==", "atUsers": [{"dingtalkId": "$:LWCP_v1:$bot"}],
        "chatbotCorpId": "dingcorp", "chatbotUserId": "$:LWCP_v1:$bot", "msgId": msg_id,
        "senderNick": "张三", "isAdmin": false, "senderStaffId": "2220111111",
        "sessionWebhookExpiredTime": 1_700_005_400_000_i64, "createAt": 1_700_000_000_000_i64,
        "senderCorpId": "dingcorp", "conversationType": "2", "senderId": "$:LWCP_v1:$sender",
        "conversationTitle": "group", "isInAtList": true,
        "sessionWebhook": "https://oapi.dingtalk.com/robot/sendBySession?session=abc",
        "text": {"content": text}, "robotCode": "dingrobot", "msgtype": "text",
    });
    json!({"specVersion": "1.0", "type": "CALLBACK",
        "headers": {"appId": "app-1", "connectionId": "conn-1", "contentType": "application/json",
            "messageId": message_id, "time": "1700000000000", "topic": ROBOT_TOPIC},
        "data": data.to_string()})
}

fn settings(dingtalk: &DingTalk) -> String {
    format!(
        "[ingest.platforms.dingtalk]\nenabled = true\nmode = \"stream\"\nclient_id = \"{CLIENT_ID}\"\n\
         api_base_url = \"{}\"\nlease_ttl_ms = 1500\nstandby_poll_ms = 100\n\
         connect_timeout_ms = 5000\nreconnect_base_ms = 20\nreconnect_cap_ms = 200\n",
        dingtalk.api_base
    )
}

const SECRET_ENV: (&str, &str) = ("BOTLINE_DINGTALK_APP_SECRET", APP_SECRET);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_flow_are_acknowledged_and_survive_a_disconnect_and_a_drop() {
    let dingtalk = DingTalk::start().await;
    let harness = start_configured(&settings(&dingtalk), &[SECRET_ENV]).await;
    let key = INBOUND.to_string();
    let redis = &harness.redis;
    dingtalk.check_inbound(redis, &key);

    dingtalk.wait_accepted(1).await;
    dingtalk.command(Command::Send(callback("m1", "msg1", " 你好 ")));
    dingtalk.command(Command::Send(system(
        "ping",
        "p1",
        json!({"opaque": "4b4e-ab"}),
    )));
    dingtalk.command(Command::Send(callback("m2", "msg2", "second")));
    // What `in` holds, growing with each step.
    let mut expected = vec!["你好", "second"];
    expect_texts(redis, &key, &expected).await;
    dingtalk.wait_all_answered(&["m1", "p1", "m2"]).await;
    let first = &read_inbound(redis)[0];
    assert_eq!(first.platform, "dingtalk");
    assert_eq!(first.bot, "dingrobot");
    assert_eq!(first.chat.id, "cidGroup==");
    assert_eq!(first.chat.kind, ChatKind::Group);
    assert!(first.mentions.bot);
    assert_eq!(first.platform_message_id.as_deref(), Some("msg1"));
    assert_eq!(
        first.platform_data.get(SESSION_WEBHOOK).map(String::as_str),
        Some("https://oapi.dingtalk.com/robot/sendBySession?session=abc")
    );

    // `disconnect`, then a callback on the socket about to close: a new
    // connection, and the callback arrives (again, unanswered) on it, once.
    dingtalk.command(Command::DisconnectThenSend(
        "server is restarting",
        callback("m3", "msg3", "around a disconnect"),
    ));
    dingtalk.wait_accepted(2).await;
    dingtalk.command(Command::Send(callback(
        "m4",
        "msg4",
        "after the disconnect",
    )));
    expected.extend(["around a disconnect", "after the disconnect"]);
    expect_texts(redis, &key, &expected).await;
    dingtalk.wait_all_answered(&["m3", "m4"]).await;

    // The socket drops: registered and opened again.
    dingtalk.command(Command::Drop);
    dingtalk.wait_accepted(3).await;
    dingtalk.command(Command::Send(callback("m5", "msg5", "after a drop")));
    // DingTalk sends a callback again (a lost ack): added once.
    dingtalk.command(Command::Send(callback("m5-again", "msg5", "after a drop")));
    dingtalk.command(Command::Send(json!({"specVersion": "1.0", "type": "EVENT",
        "headers": {"messageId": "ev1", "topic": "*", "eventType": "chat_update", "contentType": "application/json"},
        "data": "{}"})));
    expected.push("after a drop");
    expect_texts(redis, &key, &expected).await;
    dingtalk.wait_all_answered(&["m5", "m5-again", "ev1"]).await;

    let state = dingtalk.state();
    assert!(state.faults.is_empty(), "{:?}", state.faults);
    assert_eq!(
        state.api.registrations.len(),
        3,
        "one registration per socket"
    );
    assert!(state.api.tickets.is_empty(), "every ticket used");
    drop(state);
    assert_eq!(texts(redis, &key).len(), 5);
}

#[tokio::test]
async fn stream_mode_needs_the_client_id_and_the_secret() {
    let dingtalk = DingTalk::start().await;
    let redis = RedisServer::start();
    let refused = |overlay: &str, env: &[(&str, &str)]| {
        configured_ingest(&redis.url(), Some(overlay), env, None)
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default()
    };
    let overlay = settings(&dingtalk);
    assert!(refused(&overlay, &[]).contains("BOTLINE_DINGTALK_APP_SECRET"));
    let without_id = overlay.replace(&format!("client_id = \"{CLIENT_ID}\""), "client_id = \"\"");
    assert!(refused(&without_id, &[SECRET_ENV]).contains("client_id"));
    assert_eq!(refused(&overlay, &[SECRET_ENV]), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_open_one_connection_and_the_other_takes_over() {
    let dingtalk = DingTalk::start().await;
    let redis = RedisServer::start();
    let replicas = Replicas::new(&redis, settings(&dingtalk), &[SECRET_ENV]);
    let (doomed, key) = replicas.start_doomed();
    dingtalk.wait_accepted(1).await;
    let second_shutdown = CancellationToken::new();
    replicas.start(&second_shutdown);
    dingtalk.command(Command::Send(callback("r1", "rmsg1", "one")));
    expect_texts(&redis, &key, &["one"]).await;
    dingtalk.wait_all_answered(&["r1"]).await;
    assert_eq!(dingtalk.state().accepted, 1, "the second replica stands by");

    // The holder dies without a word: its lease expires, the other
    // replica registers and connects.
    doomed.shutdown_background();
    dingtalk.wait_accepted(2).await;
    dingtalk.command(Command::Send(callback("r2", "rmsg2", "two")));
    expect_texts(&redis, &key, &["one", "two"]).await;
    dingtalk.wait_all_answered(&["r2"]).await;

    let state = dingtalk.state();
    assert!(state.faults.is_empty(), "{:?}", state.faults);
    assert_eq!(state.most_live, 1, "never two connections at once");
    assert_eq!(state.api.registrations.len(), 2);
    drop(state);
    second_shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_stream_is_kept_and_a_silent_one_is_replaced_within_the_idle_time() {
    let dingtalk = DingTalk::start().await;
    let overlay = format!(
        "{}idle_timeout_ms = 1000\nping_interval_ms = 300\n",
        settings(&dingtalk)
    );
    let harness = start_configured(&overlay, &[SECRET_ENV]).await;
    let key = INBOUND.to_string();
    let redis = &harness.redis;
    dingtalk.check_inbound(redis, &key);

    dingtalk.wait_accepted(1).await;
    dingtalk.command(Command::Send(system(
        "ping",
        "p1",
        json!({"opaque": "o-1"}),
    )));
    dingtalk.command(Command::Send(callback("m1", "msg1", "one")));
    expect_texts(redis, &key, &["one"]).await;
    dingtalk.wait_all_answered(&["p1", "m1"]).await;

    // Quiet, but answering: ingest's WebSocket pings (every 300 ms) get
    // their pongs, and the socket outlives its idle time several times over.
    wait_until(WAIT, "ten pings", || dingtalk.state().pings >= 10).await;
    assert_eq!(dingtalk.state().accepted, 1, "a quiet socket is kept");

    // Silent: a callback, then nothing at all, the TCP connection open.
    // Its ack goes nowhere; the socket is found dead and replaced, and the
    // callback, sent again on the new one, is added once.
    let silenced = std::time::Instant::now();
    dingtalk.command(Command::SendThenSilence(callback(
        "m2",
        "msg2",
        "just before the silence",
    )));
    dingtalk.wait_accepted(2).await;
    assert_replaced_after_idle(silenced, Duration::from_secs(1));
    dingtalk.command(Command::Send(callback("m3", "msg3", "after the silence")));
    expect_texts(
        redis,
        &key,
        &["one", "just before the silence", "after the silence"],
    )
    .await;
    dingtalk.wait_all_answered(&["m2", "m3"]).await;

    let state = dingtalk.state();
    assert!(state.faults.is_empty(), "{:?}", state.faults);
    assert_eq!(state.accepted, 2);
    assert_eq!(
        state.api.registrations.len(),
        2,
        "one registration per socket"
    );
    drop(state);
    assert_eq!(texts(redis, &key).len(), 3, "nothing doubled");
}

#[tokio::test]
async fn idle_settings_are_checked_at_start() {
    let dingtalk = DingTalk::start().await;
    let redis = RedisServer::start();
    let refused = |extra: &str| {
        configured_ingest(
            &redis.url(),
            Some(&format!("{}{extra}", settings(&dingtalk))),
            &[SECRET_ENV],
            None,
        )
        .err()
        .map(|error| error.to_string())
        .unwrap_or_default()
    };
    assert!(refused("idle_timeout_ms = 0\n").contains("ingest.platforms.dingtalk.idle_timeout_ms"));
    assert!(refused("ping_interval_ms = 60000\n")
        .contains("ingest.platforms.dingtalk.ping_interval_ms"));
    assert_eq!(refused("ping_interval_ms = 0\n"), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_closed_or_disconnected_at_once_are_reopened_after_a_growing_backoff() {
    let dingtalk = DingTalk::start().await;
    dingtalk.state().behaviour = Behaviour::CloseAtOnce;
    let _harness = start_configured(&with_storm_backoff(&settings(&dingtalk)), &[SECRET_ENV]).await;
    expect_backed_off(6, || dingtalk.state().attempts.clone()).await;

    // `disconnect` at once, again and again: reconnecting at once is for
    // a connection that lasted.
    {
        let mut state = dingtalk.state();
        state.behaviour = Behaviour::DisconnectAtOnce;
        state.attempts.clear();
    }
    expect_backed_off(6, || dingtalk.state().attempts.clone()).await;
    let state = dingtalk.state();
    assert!(state.faults.is_empty(), "{:?}", state.faults);
    assert_eq!(state.accepted, 0, "no socket was served");
}
