//! The web chat over a real WebSocket, against a real redis-server.

mod common;

use botline_shared::codec;
use botline_shared::message::{Attachment, AttachmentKind, ChatKind, Role, Turn};
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const CHAT: &str = "chat_abc-123";

async fn connect(harness: &Harness, chat: &str) -> Socket {
    let url = format!("ws://{}/ws?chat={chat}", harness.addr);
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

async fn send(socket: &mut Socket, frame: Value) {
    socket
        .send(Message::Text(frame.to_string().into()))
        .await
        .unwrap();
}

/// The next JSON frame, within a deadline.
async fn next_frame(socket: &mut Socket) -> Value {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("a frame within 5 s")
            .expect("socket open")
            .unwrap();
        if let Message::Text(text) = frame {
            return serde_json::from_str(text.as_str()).unwrap();
        }
    }
}

/// What egress does with a reply: append the bot's turn and announce it.
fn append_bot_turn(harness: &Harness, chat: &str, text: &str) {
    append_bot_turn_with(harness, chat, text, Vec::new());
}

/// The same, for a reply with attachments.
fn append_bot_turn_with(harness: &Harness, chat: &str, text: &str, attachments: Vec<Attachment>) {
    let turn = Turn {
        role: Role::Bot,
        speaker_id: "botline".into(),
        speaker_name: "botline".into(),
        text: text.into(),
        message_id: ulid::Ulid::new().to_string(),
        at_ms: botline_shared::now_ms(),
        attachments,
    };
    let mut add = redis::cmd("XADD");
    add.arg(harness.streams.transcript(chat)).arg("*");
    for (name, value) in codec::encode(&turn) {
        add.arg(name).arg(value);
    }
    let _: String = harness.redis_cmd(&mut add);
    let _: i64 = harness.redis_cmd(
        redis::cmd("PUBLISH")
            .arg(harness.streams.transcript_channel())
            .arg(chat),
    );
}

fn turn(frame: &Value) -> (&str, &str, &str) {
    assert_eq!(frame["type"], "turn", "{frame}");
    (
        frame["role"].as_str().unwrap(),
        frame["name"].as_str().unwrap(),
        frame["text"].as_str().unwrap(),
    )
}

#[tokio::test]
async fn a_message_goes_in_and_the_conversation_is_shown_live_and_again() {
    let harness = start(|_| {}).await;
    let mut socket = connect(&harness, CHAT).await;
    send(
        &mut socket,
        json!({ "type": "message", "id": "m1", "text": "你好 bot", "name": "Ann" }),
    )
    .await;
    assert_eq!(
        turn(&next_frame(&mut socket).await),
        ("user", "Ann", "你好 bot")
    );

    let messages = harness.inbound();
    assert_eq!(messages.len(), 1);
    let message = &messages[0];
    assert_eq!(
        (message.platform.as_str(), message.bot.as_str()),
        ("web", "botline")
    );
    assert_eq!(
        (message.chat.id.as_str(), message.chat.kind),
        (CHAT, ChatKind::Direct)
    );
    assert_eq!(
        (message.sender.id.as_str(), message.sender.name.as_str()),
        (CHAT, "Ann")
    );
    let transcript: Vec<Turn> = read_stream(&harness.redis, &harness.streams.transcript(CHAT));
    assert_eq!(transcript[0].message_id, message.id);
    let ttl: i64 = harness.redis_cmd(redis::cmd("PTTL").arg(harness.streams.transcript(CHAT)));
    assert!(ttl > 0, "transcript expires: {ttl}");

    append_bot_turn(&harness, CHAT, "hello Ann");
    assert_eq!(
        turn(&next_frame(&mut socket).await),
        ("bot", "botline", "hello Ann")
    );

    // A reload: the whole conversation, in order, then live again.
    let mut reloaded = connect(&harness, CHAT).await;
    assert_eq!(
        turn(&next_frame(&mut reloaded).await),
        ("user", "Ann", "你好 bot")
    );
    assert_eq!(
        turn(&next_frame(&mut reloaded).await),
        ("bot", "botline", "hello Ann")
    );
    send(
        &mut reloaded,
        json!({ "type": "message", "id": "m2", "text": "thanks" }),
    )
    .await;
    assert_eq!(
        turn(&next_frame(&mut reloaded).await),
        ("user", "you", "thanks")
    );
    assert_eq!(
        turn(&next_frame(&mut socket).await),
        ("user", "you", "thanks")
    );
}

#[tokio::test]
async fn a_resend_after_reconnect_is_dropped() {
    let harness = start(|_| {}).await;
    let frame = json!({ "type": "message", "id": "same-id", "text": "once" });
    let mut socket = connect(&harness, CHAT).await;
    send(&mut socket, frame.clone()).await;
    assert_eq!(turn(&next_frame(&mut socket).await).2, "once");
    drop(socket);
    let mut socket = connect(&harness, CHAT).await;
    assert_eq!(turn(&next_frame(&mut socket).await).2, "once");
    send(&mut socket, frame).await;
    send(
        &mut socket,
        json!({ "type": "message", "id": "other", "text": "twice" }),
    )
    .await;
    assert_eq!(turn(&next_frame(&mut socket).await).2, "twice");
    assert_eq!(harness.inbound().len(), 2);
}

#[tokio::test]
async fn chats_do_not_see_each_other() {
    let harness = start(|_| {}).await;
    let mut first = connect(&harness, "first-chat").await;
    let mut second = connect(&harness, "second-chat").await;
    send(
        &mut first,
        json!({ "type": "message", "id": "a", "text": "for first" }),
    )
    .await;
    send(
        &mut second,
        json!({ "type": "message", "id": "a", "text": "for second" }),
    )
    .await;
    assert_eq!(turn(&next_frame(&mut first).await).2, "for first");
    assert_eq!(turn(&next_frame(&mut second).await).2, "for second");
    // The same client id in another chat is another message.
    assert_eq!(harness.inbound().len(), 2);
}

#[tokio::test]
async fn refused_messages_get_an_error_frame() {
    let harness = start(|ingest| ingest.settings.max_text_chars = 5).await;
    let mut socket = connect(&harness, CHAT).await;
    for (frame, expected) in [
        (
            json!({ "type": "message", "id": "m", "text": "  " }),
            "text must not be empty",
        ),
        (
            json!({ "type": "message", "id": "m", "text": "too long" }),
            "text has 8 characters, more than the limit of 5",
        ),
        (
            json!({ "type": "message", "id": "bad id", "text": "hi" }),
            "id must be 1 to 64 characters of A-Z a-z 0-9 _ -",
        ),
        (
            json!({ "type": "shout", "text": "hi" }),
            "type: unknown variant `shout`, expected `message` at line 1 column 27",
        ),
    ] {
        send(&mut socket, frame.clone()).await;
        assert_eq!(
            next_frame(&mut socket).await,
            json!({ "type": "error", "error": expected }),
            "{frame}"
        );
    }
    assert!(harness.inbound().is_empty());
}

#[tokio::test]
async fn a_long_backlog_is_refused_with_an_error_frame() {
    let harness = start(|ingest| ingest.settings.in_max_backlog = 0).await;
    let mut socket = connect(&harness, CHAT).await;
    send(
        &mut socket,
        json!({ "type": "message", "id": "m1", "text": "first" }),
    )
    .await;
    assert_eq!(turn(&next_frame(&mut socket).await).2, "first");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut attempt = 0;
    loop {
        attempt += 1;
        send(
            &mut socket,
            json!({ "type": "message", "id": format!("n{attempt}"), "text": "more" }),
        )
        .await;
        let frame = next_frame(&mut socket).await;
        if frame["type"] == "error" {
            assert_eq!(frame["error"], "ingest is busy, retry in 5 s");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no push-back within 5 s"
        );
    }
}

#[tokio::test]
async fn a_bad_chat_id_is_refused() {
    let harness = start(|_| {}).await;
    for chat in ["short", "has%20space%20in", &"x".repeat(65)] {
        let url = format!("ws://{}/ws?chat={chat}", harness.addr);
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 400, "{chat}")
            }
            other => panic!("{chat}: expected a 400, got {:?}", other.map(|_| ())),
        }
    }
}

#[tokio::test]
async fn nothing_is_missed_while_the_subscription_is_down() {
    let harness = start(|_| {}).await;
    let mut socket = connect(&harness, CHAT).await;
    send(
        &mut socket,
        json!({ "type": "message", "id": "m1", "text": "hi" }),
    )
    .await;
    assert_eq!(turn(&next_frame(&mut socket).await).2, "hi");
    // Drop ingest's pub/sub connection; the reply's announcement is lost,
    // but after re-subscribing every socket reads again from where it was.
    let killed: i64 = harness.redis_cmd(redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub"));
    assert_eq!(killed, 1);
    append_bot_turn(&harness, CHAT, "while you were away");
    assert_eq!(
        turn(&next_frame(&mut socket).await),
        ("bot", "botline", "while you were away")
    );
}

#[tokio::test]
async fn the_page_is_served() {
    let harness = start(|_| {}).await;
    let page = reqwest::get(harness.url("/")).await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = page.text().await.unwrap();
    for needle in ["id=\"messages\"", "id=\"text\"", "id=\"send\"", "/ws?chat="] {
        assert!(html.contains(needle), "{needle}");
    }
}

#[tokio::test]
async fn a_bot_turn_with_pictures_reaches_the_page_with_their_urls() {
    let harness = start(|_| {}).await;
    let mut socket = connect(&harness, CHAT).await;
    append_bot_turn_with(
        &harness,
        CHAT,
        "our shop",
        vec![
            Attachment::image("https://cdn.example.com/shop.jpg", Some("the shop".into())),
            Attachment::image("javascript:alert(1)", Some("no".into())),
            Attachment {
                kind: AttachmentKind::File,
                url: Some("https://cdn.example.com/menu.pdf".into()),
                file_id: None,
                mime: Some("application/pdf".into()),
                size: Some(1000),
                name: Some("menu.pdf".into()),
            },
        ],
    );
    let frame = next_frame(&mut socket).await;
    assert_eq!(turn(&frame), ("bot", "botline", "our shop"));
    assert_eq!(
        frame["attachments"],
        json!([
            {"kind": "image", "url": "https://cdn.example.com/shop.jpg", "name": "the shop"},
            {"kind": "file", "url": "https://cdn.example.com/menu.pdf", "name": "menu.pdf"},
        ]),
        "only http(s) URLs are passed to the page"
    );
    append_bot_turn(&harness, CHAT, "plain");
    let plain = next_frame(&mut socket).await;
    assert!(plain.get("attachments").is_none(), "{plain}");
}

#[tokio::test]
async fn the_page_shows_pictures_as_img_elements_and_never_writes_html() {
    let harness = start(|_| {}).await;
    let page = reqwest::get(format!("http://{}/", harness.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Pictures are <img> elements made with the DOM, their URL checked to
    // be http(s) first; no text from the server is ever parsed as HTML.
    assert!(page.contains("document.createElement(\"img\")"));
    assert!(page.contains("safeUrl("));
    assert!(!page.contains("innerHTML"), "no innerHTML");
    assert!(!page.contains("insertAdjacentHTML"));
    assert!(!page.contains("document.write"));
}
