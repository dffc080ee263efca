//! Every platform's inbound side, driven as `/hooks/<platform>` drives it:
//! built from its settings by the registry ingest uses, handed a
//! [`HookRequest`] through [`InboundPlatform::receive`]. Each target signs
//! the fuzzer's bytes with the platform's test secret, so they reach the
//! parser, then checks that the same bytes wrongly signed are refused.

use crate::check;
use crate::sign;
use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use botline_ingest::config::IngestSettings;
use botline_ingest::platforms::{self, HookRequest, InboundPlatform};
use botline_shared::config::Settings;
use std::sync::{Arc, OnceLock};

/// When every request is received (UTC ms): inputs are replayable.
pub const NOW_MS: i64 = 1_700_000_000_000;
/// The timestamp platforms that sign in seconds are given.
pub const NOW_SECS: i64 = NOW_MS / 1000;

pub const TELEGRAM_SECRET: &str = "s3cr3t-Token_for-the-webhook";
pub const SLACK_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
pub const FEISHU_TOKEN: &str = "rvaYgkND1GOiu5MM0E1rncYC6PLtF7JV";
pub const FEISHU_KEY: &str = "test key";
pub const DINGTALK_SECRET: &str = "GT-lsu-taDAsTsxxxx-app-secret";
pub const WECOM_TOKEN: &str = "QDG6eK";
pub const WECOM_AES_KEY: &str = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C";
pub const WECOM_CORP_ID: &str = "wx5823bf96d3bd56c7";
pub const ONEBOT_SECRET: &str = "onebot-secret-0123";
/// The Discord bot's user id: its own messages are ignored.
pub const DISCORD_BOT_ID: &str = "1234567890";

/// One platform as a target sets it up.
pub struct Setup {
    /// What `hooks` inputs call it.
    pub key: &'static str,
    pub platform: &'static str,
    /// Its `[ingest.platforms.<platform>]` table, besides `enabled`.
    pub settings: &'static str,
    pub env: &'static [(&'static str, &'static str)],
}

pub const SETUPS: &[Setup] = &[
    Setup {
        key: "telegram",
        platform: "telegram",
        settings: "bot_id = \"999\"\nbot_username = \"support_bot\"\n",
        env: &[("BOTLINE_TELEGRAM_WEBHOOK_SECRET", TELEGRAM_SECRET)],
    },
    Setup {
        key: "slack",
        platform: "slack",
        settings: "bot_user_id = \"U0LAN0Z89\"\nbot_id = \"B0LAN0Z8A\"\n",
        env: &[("BOTLINE_SLACK_SIGNING_SECRET", SLACK_SECRET)],
    },
    Setup {
        key: "feishu",
        platform: "feishu",
        settings: "encrypted = false\nbot_open_id = \"ou_7d8a6e6df7621556ce0d21922b676706ccs\"\n",
        env: &[("BOTLINE_FEISHU_VERIFICATION_TOKEN", FEISHU_TOKEN)],
    },
    Setup {
        key: "feishu_encrypted",
        platform: "feishu",
        settings: "encrypted = true\nbot_open_id = \"ou_7d8a6e6df7621556ce0d21922b676706ccs\"\n",
        env: &[
            ("BOTLINE_FEISHU_VERIFICATION_TOKEN", FEISHU_TOKEN),
            ("BOTLINE_FEISHU_ENCRYPT_KEY", FEISHU_KEY),
        ],
    },
    Setup {
        key: "dingtalk",
        platform: "dingtalk",
        settings: "",
        env: &[("BOTLINE_DINGTALK_APP_SECRET", DINGTALK_SECRET)],
    },
    Setup {
        key: "wecom",
        platform: "wecom",
        settings: "corp_id = \"wx5823bf96d3bd56c7\"\n",
        env: &[
            ("BOTLINE_WECOM_TOKEN", WECOM_TOKEN),
            ("BOTLINE_WECOM_ENCODING_AES_KEY", WECOM_AES_KEY),
        ],
    },
    Setup {
        key: "onebot",
        platform: "onebot",
        settings: "",
        env: &[("BOTLINE_ONEBOT_SECRET", ONEBOT_SECRET)],
    },
];

/// The platform set up as `key`, built once per process.
pub fn platform(key: &str) -> (&'static Setup, &'static dyn InboundPlatform) {
    static BUILT: OnceLock<Vec<Arc<dyn InboundPlatform>>> = OnceLock::new();
    let built = BUILT.get_or_init(|| SETUPS.iter().map(build).collect());
    let index = SETUPS
        .iter()
        .position(|setup| setup.key == key)
        .unwrap_or_else(|| panic!("no platform setup {key}"));
    (&SETUPS[index], built[index].as_ref())
}

fn build(setup: &Setup) -> Arc<dyn InboundPlatform> {
    let overlay = format!(
        "[ingest.platforms.{}]\nenabled = true\n{}",
        setup.platform, setup.settings
    );
    let settings = Settings::from_overlay(Some(&overlay)).expect("the fuzz settings load");
    let ingest = IngestSettings::load(&settings).expect("the fuzz settings are valid");
    let mut built =
        platforms::build(&ingest.platforms, &setup.env.to_vec()).expect("the platform builds");
    assert_eq!(
        built.len(),
        1,
        "{} built {} platforms",
        setup.key,
        built.len()
    );
    built.remove(0)
}

/// A request as `/hooks/<platform>` hands it over; headers that HTTP
/// could not carry are left out, as the server would never see them.
pub fn request(
    method: Method,
    query: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> HookRequest {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            map.append(name, value);
        }
    }
    HookRequest {
        method,
        query: query.to_string(),
        headers: map,
        body: Bytes::copy_from_slice(body),
        received_at_ms: NOW_MS,
        trace_id: "fuzz".into(),
    }
}

/// Receive `headers` + `body` as `key`'s platform and check the outcome;
/// then receive it with `forged` headers, which must be refused.
fn signed(key: &str, headers: &[(&str, String)], forged: &[(&str, String)], body: &[u8]) {
    let (setup, platform) = platform(key);
    check::hook(
        setup.platform,
        platform.receive(&request(Method::POST, "", headers, body)),
    );
    check::unverified(platform.receive(&request(Method::POST, "", forged, body)));
}

pub fn telegram(data: &[u8]) {
    let header = "x-telegram-bot-api-secret-token";
    signed(
        "telegram",
        &[(header, TELEGRAM_SECRET.into())],
        &[(header, format!("{TELEGRAM_SECRET}x"))],
        data,
    );
}

pub fn slack(data: &[u8]) {
    let timestamp = NOW_SECS.to_string();
    let headers = |signature: String| {
        [
            ("x-slack-request-timestamp", timestamp.clone()),
            ("x-slack-signature", signature),
        ]
    };
    signed(
        "slack",
        &headers(sign::slack(&timestamp, data)),
        &headers(sign::slack(&(NOW_SECS - 1).to_string(), data)),
        data,
    );
}

/// Feishu without an Encrypt Key: the verification token is in the body.
pub fn feishu(data: &[u8]) {
    let (setup, platform) = platform("feishu");
    check::hook(
        setup.platform,
        platform.receive(&request(Method::POST, "", &[], data)),
    );
}

/// Feishu with an Encrypt Key: the input encrypted and signed, or (first
/// byte 1) the text of `encrypt` as it came.
pub fn feishu_encrypted(data: &[u8]) {
    let body = match data.split_first() {
        Some((1, encrypt)) => serde_json::json!({ "encrypt": String::from_utf8_lossy(encrypt) }),
        _ => serde_json::json!({ "encrypt": sign::feishu_encrypt(data) }),
    }
    .to_string();
    let timestamp = NOW_SECS.to_string();
    let headers = |signature: String| {
        [
            ("x-lark-request-timestamp", timestamp.clone()),
            ("x-lark-request-nonce", "n0nce".to_string()),
            ("x-lark-signature", signature),
        ]
    };
    signed(
        "feishu_encrypted",
        &headers(sign::feishu(&timestamp, "n0nce", body.as_bytes())),
        &headers(sign::feishu(&timestamp, "other", body.as_bytes())),
        body.as_bytes(),
    );
}

pub fn dingtalk(data: &[u8]) {
    let timestamp = NOW_MS.to_string();
    let headers = |sign: String| [("timestamp", timestamp.clone()), ("sign", sign)];
    signed(
        "dingtalk",
        &headers(sign::dingtalk(&timestamp)),
        &headers(sign::dingtalk(&(NOW_MS - 1).to_string())),
        data,
    );
}

/// WeCom: the input is a message's XML, encrypted into a callback and
/// signed; first byte 0: the whole plaintext (random bytes, length, message,
/// corp id) as it is encrypted; first byte 1: the `echostr` of a URL check.
pub fn wecom(data: &[u8]) {
    let (setup, platform) = platform("wecom");
    let (method, encrypted) = match data.split_first() {
        Some((0, plaintext)) => (Method::POST, sign::wecom_encrypt_raw(plaintext)),
        Some((1, echo)) => (Method::GET, String::from_utf8_lossy(echo).into_owned()),
        _ => (Method::POST, sign::wecom_encrypt(data)),
    };
    let timestamp = NOW_SECS.to_string();
    let query = |signature: &str| {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        query
            .append_pair("msg_signature", signature)
            .append_pair("timestamp", &timestamp)
            .append_pair("nonce", "1372623149");
        if method == Method::GET {
            query.append_pair("echostr", &encrypted);
        }
        query.finish()
    };
    let body = if method == Method::GET {
        String::new()
    } else {
        format!(
            "<xml><ToUserName><![CDATA[{WECOM_CORP_ID}]]></ToUserName>\
             <Encrypt><![CDATA[{encrypted}]]></Encrypt><AgentID><![CDATA[1]]></AgentID></xml>"
        )
    };
    let right = sign::wecom(&timestamp, "1372623149", &encrypted);
    let wrong = sign::wecom(&timestamp, "1372623150", &encrypted);
    let receive = |signature: &str| {
        platform.receive(&request(
            method.clone(),
            &query(signature),
            &[],
            body.as_bytes(),
        ))
    };
    check::hook(setup.platform, receive(&right));
    check::unverified(receive(&wrong));
}

pub fn onebot(data: &[u8]) {
    let header = "x-signature";
    signed(
        "onebot",
        &[(header, sign::onebot(ONEBOT_SECRET, data))],
        &[(header, sign::onebot("not-the-secret", data))],
        data,
    );
}

/// A Discord Gateway frame (text; binary frames are read as lossy UTF-8,
/// as the connection reads them).
pub fn discord(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match botline_ingest::platforms::discord::read_frame(&text, DISCORD_BOT_ID) {
        Ok(Some(hook)) => check::hook("discord", Ok(hook)),
        Ok(None) => {}
        Err(error) => check::refusal(&error),
    }
}
