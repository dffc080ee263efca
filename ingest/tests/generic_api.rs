//! The generic API against a real redis-server over real HTTP.

mod common;

use base64::Engine;
use botline_shared::message::{ChatKind, Origin, RAW_EVENT_LIMIT};
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const MESSAGE: &str = r#"{"event_id":"evt-1","platform":"telegram","chat":{"id":"c1","kind":"group"},"sender":{"id":"u1","name":"Ann"},"text":"hello 世界"}"#;

async fn post(
    harness: &Harness,
    path: &str,
    token: Option<&str>,
    body: String,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut request = reqwest::Client::new()
        .post(harness.url(path))
        .header("content-type", "application/json")
        .body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body, headers)
}

#[tokio::test]
async fn an_accepted_message_lands_in_in_and_decodes() {
    let harness = start(|_| {}).await;
    let response = reqwest::Client::new()
        .post(harness.url("/v1/messages"))
        .bearer_auth(valid_token())
        .header("x-trace-id", "trace-abc")
        .body(MESSAGE)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["trace_id"], "trace-abc");
    let messages = harness.inbound();
    assert_eq!(messages.len(), 1);
    let message = &messages[0];
    assert_eq!(answer["id"], message.id.as_str());
    assert_eq!(message.platform, "telegram");
    assert_eq!(message.chat.kind, ChatKind::Group);
    assert_eq!(message.sender.name, "Ann");
    assert_eq!(message.text, "hello 世界");
    assert_eq!(message.trace_id, "trace-abc");
    assert_eq!(message.origin, Origin::User);
    assert_eq!(message.raw.as_deref(), Some(MESSAGE));
    assert!(ulid::Ulid::from_string(&message.id).is_ok());
    assert!((botline_shared::now_ms() - message.received_at_ms).abs() < 60_000);
    let ttl: i64 =
        harness.redis_cmd(redis::cmd("PTTL").arg(harness.streams.dedup("telegram", "c1", "evt-1")));
    assert!(ttl > 0, "dedup key expires: {ttl}");
}

#[tokio::test]
async fn a_duplicate_event_id_adds_nothing() {
    let harness = start(|_| {}).await;
    let token = valid_token();
    let (first, _, _) = post(&harness, "/v1/messages", Some(&token), MESSAGE.into()).await;
    let (second, answer, _) = post(&harness, "/v1/messages", Some(&token), MESSAGE.into()).await;
    assert_eq!((first, second), (202, 200));
    assert_eq!(answer, json!({ "duplicate": true, "event_id": "evt-1" }));
    assert_eq!(harness.inbound().len(), 1);
    // The same event id on another platform is another event.
    let other = MESSAGE.replace("telegram", "slack");
    assert_eq!(
        post(&harness, "/v1/messages", Some(&token), other).await.0,
        202
    );
    // Without an event id nothing can be deduplicated.
    let anonymous = MESSAGE.replace(r#""event_id":"evt-1","#, "");
    assert_eq!(
        post(&harness, "/v1/messages", Some(&token), anonymous.clone())
            .await
            .0,
        202
    );
    assert_eq!(
        post(&harness, "/v1/messages", Some(&token), anonymous)
            .await
            .0,
        202
    );
    assert_eq!(harness.inbound().len(), 4);
}

#[tokio::test]
async fn concurrent_duplicates_add_exactly_one_entry() {
    let harness = start(|_| {}).await;
    let token = valid_token();
    let posts = (0..20).map(|_| post(&harness, "/v1/messages", Some(&token), MESSAGE.into()));
    let statuses: Vec<u16> = futures_util::future::join_all(posts)
        .await
        .into_iter()
        .map(|(status, _, _)| status)
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 202).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        19,
        "{statuses:?}"
    );
    assert_eq!(harness.inbound().len(), 1);
}

fn unsigned_token() -> String {
    let encode =
        |value: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string());
    format!(
        "{}.{}.",
        encode(json!({ "alg": "none", "typ": "JWT" })),
        encode(json!({ "sub": "x", "exp": now_secs() + 3600 }))
    )
}

#[tokio::test]
async fn bad_tokens_are_refused_each_with_its_reason() {
    let harness = start(|ingest| ingest.settings.jwt_audience = "botline".into()).await;
    let good = token(json!({ "aud": "botline", "exp": now_secs() + 3600 }));
    let cases: Vec<(&str, Option<String>, u16, &str)> = vec![
        ("missing", None, 401, "missing bearer token"),
        (
            "expired",
            Some(token(json!({ "aud": "botline", "exp": now_secs() - 3600 }))),
            401,
            "token expired",
        ),
        (
            "wrong secret",
            Some(token_signed(
                json!({ "aud": "botline", "exp": now_secs() + 3600 }),
                "another-secret-0123456789",
            )),
            401,
            "token signature does not verify",
        ),
        (
            "alg none",
            Some(unsigned_token()),
            401,
            "unsigned token (alg none) refused",
        ),
        (
            "wrong audience",
            Some(token(
                json!({ "aud": "someone-else", "exp": now_secs() + 3600 }),
            )),
            401,
            "token audience not accepted",
        ),
        (
            "no audience",
            Some(token(json!({ "exp": now_secs() + 3600 }))),
            401,
            "token has no `aud` claim",
        ),
        (
            "no expiry",
            Some(token(json!({ "aud": "botline" }))),
            401,
            "token has no `exp` claim",
        ),
        (
            "garbage",
            Some("not.a.token".into()),
            401,
            "malformed token",
        ),
    ];
    for (case, token, status, reason) in cases {
        let (actual_status, answer, headers) =
            post(&harness, "/v1/messages", token.as_deref(), MESSAGE.into()).await;
        assert_eq!(
            (actual_status, answer["error"].as_str()),
            (status, Some(reason)),
            "{case}"
        );
        assert_eq!(headers["www-authenticate"], "Bearer", "{case}");
    }
    assert!(harness.inbound().is_empty());
    assert_eq!(
        post(&harness, "/v1/messages", Some(&good), MESSAGE.into())
            .await
            .0,
        202
    );
}

#[tokio::test]
async fn without_a_secret_the_generic_api_is_disabled() {
    let harness = start_with(None, |_| {}).await;
    for path in ["/v1/messages", "/v1/broadcast"] {
        let (status, answer, _) = post(&harness, path, Some(&valid_token()), MESSAGE.into()).await;
        assert_eq!(status, 401);
        assert_eq!(
            answer["error"],
            "generic API disabled: BOTLINE_JWT_SECRET is not set"
        );
    }
}

#[tokio::test]
async fn bad_bodies_are_refused_with_the_reason() {
    let harness = start(|ingest| {
        ingest.settings.max_body_bytes = 2048;
        ingest.settings.max_text_chars = 10;
    })
    .await;
    let token = valid_token();
    let cases: Vec<(String, u16, &str)> = vec![
        (
            format!(
                r#"{{"chat":{{"id":"c"}},"sender":{{"id":"u"}},"text":"{}"}}"#,
                "x".repeat(4096)
            ),
            413,
            "request body is larger than 2048 bytes",
        ),
        (
            "{not json".into(),
            400,
            "key must be a string at line 1 column 2",
        ),
        (
            r#"{"chat":{"id":"c"},"sender":{"id":"u"},"text":"hi","colour":1}"#.into(),
            400,
            "colour: unknown field `colour`",
        ),
        (
            r#"{"chat":{"id":"c"},"sender":{"id":"u","age":3},"text":"hi"}"#.into(),
            400,
            "sender.age: unknown field `age`",
        ),
        (
            r#"{"chat":{"id":"c"},"sender":{"id":"u"}}"#.into(),
            400,
            "missing field `text`",
        ),
        (
            r#"{"chat":{"id":"c"},"sender":{"id":"u"},"text":"more than ten"}"#.into(),
            422,
            "text has 13 characters, more than the limit of 10",
        ),
        (
            r#"{"platform":"Bad!","chat":{"id":"c"},"sender":{"id":"u"},"text":"hi"}"#.into(),
            422,
            "platform \"Bad!\" must match",
        ),
    ];
    for (body, status, reason) in cases {
        let (actual, answer, _) = post(&harness, "/v1/messages", Some(&token), body.clone()).await;
        let error = answer["error"].as_str().unwrap_or_default().to_string();
        assert_eq!(actual, status, "{body}: {error}");
        assert!(error.starts_with(reason), "{body}: {error}");
    }
    assert!(harness.inbound().is_empty());
}

#[tokio::test]
async fn raw_events_are_truncated_on_a_character_boundary() {
    let harness = start(|_| {}).await;
    let body = format!(
        r#"{{"chat":{{"id":"c"}},"sender":{{"id":"u"}},"text":"{}"}}"#,
        "长".repeat(1500)
    );
    assert_eq!(
        post(&harness, "/v1/messages", Some(&valid_token()), body.clone())
            .await
            .0,
        202
    );
    let raw = harness.inbound().remove(0).raw.unwrap();
    assert!(raw.len() <= RAW_EVENT_LIMIT && raw.len() > RAW_EVENT_LIMIT - 4);
    assert!(body.starts_with(&raw));
}

#[tokio::test]
async fn a_long_backlog_is_pushed_back_with_retry_after() {
    let harness = start(|ingest| {
        ingest.settings.in_max_backlog = 2;
        ingest.settings.retry_after_secs = 7;
    })
    .await;
    let token = valid_token();
    let anonymous = MESSAGE.replace(r#""event_id":"evt-1","#, "");
    for _ in 0..3 {
        assert_eq!(
            post(&harness, "/v1/messages", Some(&token), anonymous.clone())
                .await
                .0,
            202
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let refused = loop {
        let (status, answer, headers) =
            post(&harness, "/v1/messages", Some(&token), anonymous.clone()).await;
        if status == 429 {
            break Some((answer, headers));
        }
        assert_eq!(status, 202);
        if std::time::Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (answer, headers) = refused.expect("a 429 within 5 s");
    assert_eq!(headers["retry-after"], "7");
    assert_eq!(answer["error"], "ingest is busy, retry in 7 s");
    let admitted = harness.inbound().len();
    // classify catching up (its group's lag, not the stream's length) lifts
    // it: every message is of chat c1, in its partition's `in`.
    let partition = harness.streams.partition_of("telegram", "c1");
    let _: () = harness.redis_cmd(
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(harness.streams.inbound(partition))
            .arg("classify")
            .arg("$"),
    );
    wait_for(Duration::from_secs(5), "the push-back to lift", || {
        let request = post(&harness, "/v1/messages", Some(&token), anonymous.clone());
        async move { request.await.0 == 202 }
    })
    .await;
    assert_eq!(harness.inbound().len(), admitted + 1);
}

#[tokio::test]
async fn a_full_redis_answers_503_with_retry_after() {
    let harness = start(|_| {}).await;
    let _: () = harness.redis_cmd(redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("1"));
    let (status, answer, headers) = post(
        &harness,
        "/v1/messages",
        Some(&valid_token()),
        MESSAGE.into(),
    )
    .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (503, Some("storage is full, retry in 5 s"))
    );
    assert_eq!(headers["retry-after"], "5");
    let _: () = harness.redis_cmd(redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("0"));
    // Nothing was half-written: the retry is not taken for a duplicate.
    assert_eq!(
        post(
            &harness,
            "/v1/messages",
            Some(&valid_token()),
            MESSAGE.into()
        )
        .await
        .0,
        202
    );
    assert_eq!(harness.inbound().len(), 1);
}

#[tokio::test]
async fn a_broadcast_fans_out_one_message_per_chat() {
    let harness = start(|ingest| ingest.settings.broadcast_max_chats = 3).await;
    let token = valid_token();
    let body = json!({
        "event_id": "announce-1",
        "text": "maintenance at 22:00",
        "chats": [
            { "platform": "web", "chat": "abcdefgh" },
            { "platform": "telegram", "chat": "-100", "kind": "group" },
            { "platform": "telegram", "chat": "-200", "kind": "channel" },
        ],
    });
    let (status, answer, _) = post(&harness, "/v1/broadcast", Some(&token), body.to_string()).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        (answer["accepted"].as_u64(), answer["duplicates"].as_u64()),
        (Some(3), Some(0))
    );
    let messages = harness.inbound();
    // One message per chat, each in its own chat's partition: their order
    // across partitions is not defined.
    let mut chats: Vec<(&str, &str, String)> = messages
        .iter()
        .map(|m| {
            (
                m.platform.as_str(),
                m.chat.id.as_str(),
                format!("{:?}", m.chat.kind),
            )
        })
        .collect();
    chats.sort();
    assert_eq!(
        chats,
        [
            ("telegram", "-100", format!("{:?}", ChatKind::Group)),
            ("telegram", "-200", format!("{:?}", ChatKind::Channel)),
            ("web", "abcdefgh", format!("{:?}", ChatKind::Direct)),
        ]
    );
    let broadcast_id = answer["id"].as_str().unwrap();
    for message in &messages {
        assert_eq!(
            message.origin,
            Origin::Broadcast {
                id: broadcast_id.into()
            }
        );
        assert_eq!(message.text, "maintenance at 22:00");
        assert_eq!(message.trace_id, answer["trace_id"].as_str().unwrap());
        assert!(message.sender.is_bot);
    }
    assert_eq!(
        messages
            .iter()
            .map(|m| &m.id)
            .collect::<std::collections::HashSet<_>>()
            .len(),
        3
    );
    // A retry adds nothing; a bigger one adds only the new chat... within the limit.
    let (_, again, _) = post(&harness, "/v1/broadcast", Some(&token), body.to_string()).await;
    assert_eq!(
        (again["accepted"].as_u64(), again["duplicates"].as_u64()),
        (Some(0), Some(3))
    );
    let mut four = body.clone();
    four["chats"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "platform": "web", "chat": "zzzzzzzz" }));
    let (status, refused, _) =
        post(&harness, "/v1/broadcast", Some(&token), four.to_string()).await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (400, Some("4 chats, more than the limit of 3"))
    );
    assert_eq!(harness.inbound().len(), 3);
}
