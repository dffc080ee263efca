//! The OneBot sender against a local stand-in of a OneBot v11 HTTP API
//! (send_msg, checked as the implementations check it) and a real redis-server.

mod senders;

use botline_shared::message::{Attachment, ChatKind, Reply};
use senders::*;
use serde_json::{json, Value};
use std::time::Duration;

const TOKEN: &str = "kSLuTF2GC2Q4q4ugm3";
const ENV: [(&str, &str); 1] = [("BOTLINE_ONEBOT_ACCESS_TOKEN", TOKEN)];

fn sent(nth: usize) -> Answer {
    answer(
        200,
        json!({"status": "ok", "retcode": 0, "data": {"message_id": 1000 + nth}}),
    )
}

/// `POST /send_msg` answered by `script` (given the request's number,
/// 0-based), or refused as OneBot refuses: 401 without a token, 403 with
/// another, 400 for a body that is not send_msg's.
fn send_msg(nth: usize, received: &Received, script: fn(usize) -> Answer) -> Answer {
    let refused = |status: u16| (status, Vec::new(), String::new());
    if received.method != "POST" || received.path() != "/send_msg" {
        return refused(404);
    }
    match received.header("authorization") {
        None => return refused(401),
        Some(value) if value != format!("Bearer {TOKEN}") => return refused(403),
        Some(_) => {}
    }
    let json: Value = serde_json::from_slice(&received.body).unwrap_or(Value::Null);
    let target_ok = match json["message_type"].as_str() {
        Some("private") => json["user_id"].is_i64(),
        Some("group") => json["group_id"].is_i64(),
        _ => false,
    };
    let segments_ok = json["message"].as_array().is_some_and(|segments| {
        !segments.is_empty()
            && segments.iter().all(|segment| {
                let image_ok = segment["type"] != "image"
                    || segment["data"]["file"].as_str().is_some_and(|file| {
                        file.starts_with("http://") || file.starts_with("https://")
                    });
                segment["type"].is_string() && segment["data"].is_object() && image_ok
            })
    });
    if !target_ok || !segments_ok || received.header("content-type") != Some("application/json") {
        return refused(400);
    }
    script(nth)
}

async fn stand_in(script: fn(usize) -> Answer) -> StandIn {
    StandIn::start(move |nth, received| send_msg(nth, received, script)).await
}

fn bodies(api: &StandIn) -> Vec<Value> {
    api.received().iter().map(Received::json).collect()
}

fn settings(url: &str, extra: &str) -> String {
    format!("[egress.platforms.onebot]\nenabled = true\napi_base_url = \"{url}\"\n{extra}")
}

fn group_reply(id: &str, text: &str) -> Reply {
    let mut reply = reply(id, "onebot", chat("123456789", ChatKind::Group), text);
    reply.bot = "10001000".into();
    reply.reply_to = Some("-2147483001".into());
    reply.mentions = vec!["12345678".into()];
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_reply_quotes_and_mentions_once() {
    let api = stand_in(sent).await;
    let egress = Egress::start(&settings(&api.url, ""), &ENV);
    egress.send(&group_reply("r-1", "收到 & [ok]"));
    let mut private = reply("r-2", "onebot", chat("12345678", ChatKind::Direct), "hi");
    private.bot = "10001000".into();
    egress.send(&private);
    eventually("two receipts", || async { egress.receipts().len() == 2 }).await;

    let mut bodies = bodies(&api);
    bodies.sort_by_key(|body| body["message_type"].to_string());
    assert_eq!(
        bodies,
        [
            json!({"message_type": "group", "group_id": 123456789, "message": [
                {"type": "reply", "data": {"id": "-2147483001"}},
                {"type": "at", "data": {"qq": "12345678"}},
                {"type": "text", "data": {"text": " 收到 & [ok]"}}]}),
            json!({"message_type": "private", "user_id": 12345678, "message": [
                {"type": "text", "data": {"text": "hi"}}]}),
        ]
    );
    let receipts = egress.receipts();
    assert!(receipts.iter().all(|receipt| receipt.attempts == 1));
    let ids: Vec<_> = receipts
        .iter()
        .map(|receipt| receipt.platform_message_id.clone().unwrap())
        .collect();
    assert!(
        ids.contains(&"1000".to_string()) && ids.contains(&"1001".to_string()),
        "{ids:?}"
    );
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_and_a_server_error_are_retried_until_sent() {
    let api = stand_in(|nth| match nth {
        0 => (429, vec![("retry-after", "1".into())], "slow down".into()),
        1 => (502, Vec::new(), "down".into()),
        _ => sent(nth),
    })
    .await;
    let egress = Egress::start(&settings(&api.url, ""), &ENV);
    egress.send(&group_reply("r-1", "hi"));
    eventually("a receipt", || async { egress.receipts().len() == 1 }).await;
    assert_eq!(api.count(), 3);
    assert_eq!(egress.receipts()[0].attempts, 3);
    let received = api.received();
    assert!(
        received[1].at - received[0].at >= Duration::from_secs(1),
        "Retry-After honoured"
    );
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_go_to_dead_with_their_reason() {
    let api = stand_in(|_| {
        answer(
            200,
            json!({"status": "failed", "retcode": 100, "data": null,
                   "message": "群不存在", "wording": "group not found"}),
        )
    })
    .await;
    let egress = Egress::start(&settings(&api.url, ""), &ENV);
    egress.send(&group_reply("r-1", "hi"));
    eventually("a dead letter", || async { egress.dead().len() == 1 }).await;
    let error = &egress.dead()[0].error;
    assert!(
        error.contains("retcode 100 (failed): group not found"),
        "{error}"
    );
    assert_eq!(api.count(), 1, "not retried");
    egress.stop().await;

    let wrong_token = [("BOTLINE_ONEBOT_ACCESS_TOKEN", "not-the-token")];
    let egress = Egress::start(&settings(&api.url, ""), &wrong_token);
    egress.send(&group_reply("r-2", "hi"));
    eventually("a dead letter", || async { egress.dead().len() == 1 }).await;
    let error = &egress.dead()[0].error;
    assert!(error.contains("onebot answered 403"), "{error}");
    assert!(!error.contains("not-the-token"), "{error}");
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_groups_replies_are_paced_by_the_group_limit() {
    let api = stand_in(sent).await;
    // 120 a minute, no burst: one every 500 ms.
    let egress = Egress::start(
        &settings(
            &api.url,
            "account_per_minute = 6000\ngroup_per_minute = 120\nburst = 1\n",
        ),
        &ENV,
    );
    for n in 0..3 {
        egress.send(&group_reply(&format!("r-{n}"), &format!("reply {n}")));
    }
    eventually("three receipts", || async { egress.receipts().len() == 3 }).await;
    assert_paced(&api.received(), 3, Duration::from_millis(450));
    egress.stop().await;
}

#[tokio::test]
async fn the_access_token_is_required_at_start() {
    let error = Egress::try_start(&settings("http://127.0.0.1:1", ""), &[])
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("BOTLINE_ONEBOT_ACCESS_TOKEN"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_picture_is_an_image_segment_after_the_text() {
    let api = stand_in(sent).await;
    let egress = Egress::start(&settings(&api.url, ""), &ENV);
    let mut with_picture = group_reply("r-1", "店在这里");
    with_picture.attachments = vec![Attachment::image(
        "https://cdn.example.com/shop.jpg",
        Some("店".into()),
    )];
    egress.send(&with_picture);
    eventually("a receipt", || async { egress.receipts().len() == 1 }).await;
    let received = api.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].path(), "/send_msg");
    assert_eq!(
        received[0].header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert_eq!(
        received[0].json(),
        json!({"message_type": "group", "group_id": 123456789, "message": [
            {"type": "reply", "data": {"id": "-2147483001"}},
            {"type": "at", "data": {"qq": "12345678"}},
            {"type": "text", "data": {"text": " 店在这里"}},
            {"type": "image", "data": {"file": "https://cdn.example.com/shop.jpg"}},
        ]})
    );
    egress.stop().await;
}
