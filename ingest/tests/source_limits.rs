//! Per-source request limits over real HTTP and a real WebSocket, against a
//! real redis-server: one address over its limit is refused (429 with
//! Retry-After, counted as `rate_limited`, nothing added to `in`), on every
//! route and for each web chat message, while other addresses go on; and a
//! web chat frame over `max_body_bytes` ends its socket.

mod common;

use botline_ingest::limits::SourceLimits;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// Ingest allowing each address `burst` requests at once, then one a second;
/// the address read from `header` when it is not empty.
async fn limited(burst: u32, header: &str) -> Harness {
    let header = header.to_string();
    start(move |ingest| {
        ingest.settings.per_source_per_second = 1;
        ingest.settings.per_source_burst = burst;
        ingest.settings.client_ip_header = header;
        ingest.limits = Arc::new(SourceLimits::new(&ingest.settings).unwrap());
    })
    .await
}

/// POST one generic API message (event id `event`), as `forwarded_for` if given.
async fn post_message(
    harness: &Harness,
    event: &str,
    forwarded_for: Option<&str>,
) -> (u16, Option<String>) {
    let mut request = reqwest::Client::new()
        .post(harness.url("/v1/messages"))
        .bearer_auth(valid_token())
        .json(
            &json!({"event_id": event, "chat": {"id": "c1"}, "sender": {"id": "u1"}, "text": "hi"}),
        );
    if let Some(address) = forwarded_for {
        request = request.header("X-Forwarded-For", address);
    }
    let response = request.send().await.unwrap();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|value| value.to_str().unwrap().to_string());
    (response.status().as_u16(), retry_after)
}

#[tokio::test]
async fn an_address_over_its_limit_gets_429_with_retry_after_on_every_route() {
    // Only this test of the file installs the recorder; the others' refusals
    // may be counted too, so the count is checked as at least this test's.
    let metrics = botline_shared::telemetry::install_metrics().unwrap();
    let harness = limited(3, "").await;
    for n in 0..3 {
        assert_eq!(post_message(&harness, &format!("e{n}"), None).await.0, 202);
    }
    let (status, retry_after) = post_message(&harness, "e3", None).await;
    assert_eq!(status, 429);
    assert_eq!(retry_after.as_deref(), Some("1"));
    // The same bucket for the hooks and the chat page.
    assert_refused(
        post_hook(&harness, "slack", "{}", &[]).await,
        429,
        "too many requests",
    );
    let page = reqwest::get(harness.url("/")).await.unwrap();
    assert_eq!(page.status().as_u16(), 429);
    assert_eq!(harness.inbound().len(), 3, "a refused request adds nothing");
    // Counted by the platform each route is for: the generic API's, a hook
    // no enabled platform owns here, the web chat's.
    let rendered = metrics.render();
    for platform in ["webhook", "unknown", "web"] {
        let series = format!(
            "botline_ingest_rejected_total{{platform=\"{platform}\",reason=\"rate_limited\"}} "
        );
        let counted: f64 = rendered
            .lines()
            .find_map(|line| line.strip_prefix(series.as_str()))
            .unwrap_or_else(|| panic!("{series}in\n{rendered}"))
            .parse()
            .unwrap();
        assert!(counted >= 1.0, "{series}{counted}");
    }
    // The bucket refills: one more a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(post_message(&harness, "e4", None).await.0, 202);
    assert_eq!(harness.inbound().len(), 4);
}

#[tokio::test]
async fn behind_a_proxy_each_forwarded_address_has_its_own_limit() {
    let harness = limited(2, "X-Forwarded-For").await;
    let noisy = Some("198.51.100.1, 203.0.113.9");
    assert_eq!(post_message(&harness, "n1", noisy).await.0, 202);
    assert_eq!(post_message(&harness, "n2", noisy).await.0, 202);
    assert_eq!(post_message(&harness, "n3", noisy).await.0, 429);
    // Another client behind the same proxy (the same peer address) goes on.
    assert_eq!(
        post_message(&harness, "q1", Some("203.0.113.10")).await.0,
        202
    );
    // Only the last address counts: a client cannot pick its own bucket by
    // writing an earlier one.
    assert_eq!(
        post_message(&harness, "n4", Some("192.0.2.77, 203.0.113.9"))
            .await
            .0,
        429
    );
    assert_eq!(harness.inbound().len(), 3);
}

#[tokio::test]
async fn web_chat_messages_count_against_their_address() {
    // The socket's upgrade takes one request; two messages fit, the third does not.
    let harness = limited(3, "").await;
    let url = format!("ws://{}/ws?chat=limited-chat-1", harness.addr);
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    for n in 0..3 {
        let frame = json!({"type": "message", "id": format!("w{n}"), "text": format!("hello {n}")});
        socket
            .send(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
    }
    // The first error frame (turns of the accepted messages may come first).
    let errors = socket.filter_map(|frame| async move {
        let Ok(Message::Text(text)) = frame else {
            return None;
        };
        serde_json::from_str::<Value>(text.as_str())
            .ok()
            .filter(|frame| frame["type"] == "error")
    });
    let error = tokio::time::timeout(Duration::from_secs(5), Box::pin(errors).next())
        .await
        .expect("an error frame within 5 s")
        .expect("socket open");
    assert!(
        error["error"]
            .as_str()
            .unwrap()
            .contains("too many requests"),
        "{error}"
    );
    wait_for(Duration::from_secs(5), "two messages in `in`", || async {
        harness.inbound().len() == 2
    })
    .await;
    let texts: Vec<String> = harness.inbound().into_iter().map(|m| m.text).collect();
    assert_eq!(texts, ["hello 0", "hello 1"]);
}

#[tokio::test]
async fn a_web_chat_frame_over_max_body_bytes_ends_its_socket_and_adds_nothing() {
    let harness = start(|ingest| ingest.settings.max_body_bytes = 1024).await;
    let url = format!("ws://{}/ws?chat=oversize-chat-1", harness.addr);
    let (mut socket, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let huge = json!({"type": "message", "id": "big", "text": "x".repeat(4096)});
    // The server may close before the whole frame is written.
    let _ = socket.send(Message::Text(huge.to_string().into())).await;
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match socket.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the socket should end");
    // A frame within the limit on a new socket goes in.
    let (mut socket, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let small = json!({"type": "message", "id": "small", "text": "hello"});
    socket
        .send(Message::Text(small.to_string().into()))
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(5),
        "the small message in `in`",
        || async { harness.inbound().len() == 1 },
    )
    .await;
    assert_eq!(harness.inbound()[0].text, "hello");
}
