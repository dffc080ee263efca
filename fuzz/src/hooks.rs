//! Whole requests to `/hooks/<platform>`: the fuzzer writes the method, the
//! query, the headers (timestamps, nonces, signatures) and the body.
//!
//! ```text
//! slack POST
//! X-Slack-Request-Timestamp: {now}
//! X-Slack-Signature: {sign}
//!
//! {"type":"url_verification","challenge":"c"}
//! ```
//!
//! The first line is a [`SETUPS`] key, the method and the raw query; header
//! lines follow up to a blank line, then the body. In the headers and the
//! query `{now}` is the receiving time in seconds, `{now_ms}` in
//! milliseconds, and `{sign}` the signature the platform expects of this
//! request (over the timestamps and nonces as written), so the fuzzer can
//! reach the timestamp checks and what follows them with a valid signature.
//!
//! [`SETUPS`]: crate::platforms::SETUPS

use crate::check;
use crate::platforms::{self, request, NOW_MS, NOW_SECS, ONEBOT_SECRET, TELEGRAM_SECRET};
use crate::sign;
use axum::http::Method;

pub fn run(data: &[u8]) {
    let (head, body) = match data.windows(2).position(|pair| pair == b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or_default().splitn(3, ' ');
    let key = first.next().unwrap_or_default();
    let Some(setup) = platforms::SETUPS.iter().find(|setup| setup.key == key) else {
        return;
    };
    let method =
        Method::from_bytes(first.next().unwrap_or_default().as_bytes()).unwrap_or(Method::POST);
    let now = |text: &str| {
        text.replace("{now_ms}", &NOW_MS.to_string())
            .replace("{now}", &NOW_SECS.to_string())
    };
    let query = now(first.next().unwrap_or_default());
    let headers: Vec<(&str, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim(), now(value.trim_start())))
        .collect();
    let signature = signature(setup.key, &method, &query, &headers, body);
    let headers: Vec<(&str, String)> = headers
        .iter()
        .map(|(name, value)| (*name, value.replace("{sign}", &signature)))
        .collect();
    let query = query.replace("{sign}", &signature);
    let (_, platform) = platforms::platform(setup.key);
    check::hook(
        setup.platform,
        platform.receive(&request(method, &query, &headers, body)),
    );
}

/// What `key`'s platform would accept as the signature of this request.
fn signature(
    key: &str,
    method: &Method,
    query: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> String {
    let header = |name: &str| {
        headers
            .iter()
            .find(|(given, _)| given.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.trim())
            .unwrap_or_default()
    };
    let param = |name: &str| {
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(given, _)| given == name)
            .map(|(_, value)| value.into_owned())
            .unwrap_or_default()
    };
    match key {
        "telegram" => TELEGRAM_SECRET.into(),
        "slack" => sign::slack(header("x-slack-request-timestamp"), body),
        "feishu" | "feishu_encrypted" => sign::feishu(
            header("x-lark-request-timestamp"),
            header("x-lark-request-nonce"),
            body,
        ),
        "dingtalk" => sign::dingtalk(header("timestamp")),
        "wecom" => {
            let encrypted = if *method == Method::GET {
                param("echostr")
            } else {
                encrypt_element(&String::from_utf8_lossy(body))
            };
            sign::wecom(&param("timestamp"), &param("nonce"), &encrypted)
        }
        "onebot" => sign::onebot(ONEBOT_SECRET, body)
            .trim_start_matches("sha1=")
            .into(),
        _ => String::new(),
    }
}

/// The text of `<Encrypt>` in a WeCom body, CDATA or not.
fn encrypt_element(body: &str) -> String {
    let Some(start) = body.find("<Encrypt>") else {
        return String::new();
    };
    let rest = &body[start + "<Encrypt>".len()..];
    match rest.strip_prefix("<![CDATA[") {
        Some(cdata) => cdata.split("]]>").next().unwrap_or_default().into(),
        None => rest.split("</Encrypt>").next().unwrap_or_default().into(),
    }
}
