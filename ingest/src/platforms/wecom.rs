//! WeCom (WeChat Work): the encrypted callbacks of a self-built app.
//!
//! WeCom signs and encrypts every callback with the app's `Token` and
//! `EncodingAESKey` (both set in the app's "receive messages" page):
//!
//! - `msg_signature` (query) = hex SHA-1 of the four strings `Token`,
//!   `timestamp`, `nonce` and the encrypted text, sorted and concatenated;
//! - the encrypted text is Base64 of AES-256-CBC with the key
//!   Base64(`EncodingAESKey` + "=") and the key's first 16 bytes as the IV,
//!   over 16 random bytes + the message length (4 bytes, big-endian) + the
//!   message + the receive id (here the corp id), PKCS#7-padded to a
//!   multiple of 32 bytes.
//!
//! `GET` is the URL check: the encrypted text is the query's `echostr`, and
//! the answer is its plaintext. `POST` carries `<xml><Encrypt>…</Encrypt></xml>`
//! whose plaintext is the message's XML. WeCom answers are checked in this
//! order: signature (401 `missing_signature`, `bad_signature`), timestamp
//! window (401 `stale_timestamp`; WeCom publishes none, so the window is
//! ours, `max_timestamp_age_secs`), decryption (401 `bad_encryption`), the
//! receive id (401 `wrong_receiver`), then the XML (400).
//!
//! WeCom retries a callback it got no answer to within 5 s, three times;
//! the dedup key is the message's `MsgId`. An app's messages are always a
//! member talking to the app alone: the chat is direct, its id the member's
//! userid, the bot (the app, `AgentID`) is the one addressed. Text, image
//! (`PicUrl` and `MediaId`), voice and video (`MediaId`) become messages;
//! events (`MsgType` `event`) and other message types (location, link) are
//! acknowledged and counted as ignored.

use super::{Answer, Event, Hook, HookRequest, InboundPlatform, Registration};
use crate::error::IngestError;
use crate::generic::{raw_event, Stamp};
use aes::Aes256;
use axum::http::Method;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::Engine;
use botline_shared::config::{deserialize_setting, secret_env, Env};
use botline_shared::message::{
    Attachment, AttachmentKind, Chat, ChatKind, Mentions, Sender, UnifiedMessage,
};
use botline_shared::Error;
use cbc::cipher::block_padding::NoPadding;
use cbc::cipher::{BlockDecryptMut, KeyIvInit};
use serde::Deserialize;
use sha1::{Digest, Sha1};
use std::sync::Arc;
use subtle::ConstantTimeEq;
use tracing::info;

pub const PLATFORM: Registration = Registration {
    name: "wecom",
    build,
};

/// The app's callback `Token`.
pub const TOKEN_ENV: &str = "BOTLINE_WECOM_TOKEN";
/// The app's callback `EncodingAESKey` (43 characters).
pub const AES_KEY_ENV: &str = "BOTLINE_WECOM_ENCODING_AES_KEY";
/// WeCom pads to a multiple of this many bytes (not the AES block size).
const PAD_BLOCK: usize = 32;
/// The random bytes before the length.
const RANDOM_PREFIX: usize = 16;

/// `[ingest.platforms.wecom]`, documented in shared/defaults.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WeComSettings {
    #[allow(dead_code)]
    enabled: bool,
    corp_id: String,
    max_timestamp_age_secs: u64,
}

pub struct WeCom {
    crypt: Crypt,
    /// 0: timestamps are not checked.
    max_timestamp_age_ms: i64,
}

fn build(table: &toml::Value, env: &dyn Env) -> Result<Arc<dyn InboundPlatform>, Error> {
    let settings: WeComSettings = deserialize_setting("ingest.platforms.wecom", table.clone())?;
    if settings.corp_id.trim().is_empty() {
        return Err(Error::config(
            "ingest.platforms.wecom.corp_id",
            "must be the corp id (企业ID) of the app's company",
        ));
    }
    // WeCom accepts tokens of 3 to 32 letters and digits.
    let token = secret_env(env, TOKEN_ENV, 3)?;
    let key = secret_env(env, AES_KEY_ENV, 43)?;
    let crypt = Crypt::new(token, &key, settings.corp_id).ok_or_else(|| {
        Error::config(
            AES_KEY_ENV,
            "must be the app's 43-character EncodingAESKey (Base64 of 32 bytes without the `=`)",
        )
    })?;
    info!(message = "wecom callbacks", corp_id = %crypt.receive_id);
    Ok(Arc::new(WeCom {
        crypt,
        max_timestamp_age_ms: i64::try_from(settings.max_timestamp_age_secs)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000),
    }))
}

impl InboundPlatform for WeCom {
    fn name(&self) -> &'static str {
        PLATFORM.name
    }

    fn receive(&self, request: &HookRequest) -> Result<Hook, IngestError> {
        let signed = |name: &str| {
            request
                .query_param(name)
                .ok_or_else(|| unverified("missing_signature", format!("no `{name}` in the query")))
        };
        let signature = signed("msg_signature")?;
        let timestamp = signed("timestamp")?;
        let nonce = signed("nonce")?;
        if request.method == Method::GET {
            let echo = request
                .query_param("echostr")
                .ok_or_else(|| IngestError::Malformed("no `echostr` in the URL check".into()))?;
            let plaintext = self.open(&signature, &timestamp, &nonce, &echo, request)?;
            return Ok(Hook::Answer(Answer::text(plaintext)));
        }
        let body = std::str::from_utf8(&request.body)
            .map_err(|_| IngestError::Malformed("the body is not UTF-8".into()))?;
        let envelope: Envelope = from_xml(body, "not a WeCom callback")?;
        let xml = self.open(&signature, &timestamp, &nonce, &envelope.encrypt, request)?;
        let message: Message = from_xml(&xml, "the decrypted message is not WeCom XML")?;
        let mut stamp = request.stamp();
        stamp.raw = Some(raw_event(xml.as_bytes()));
        read_message(message, stamp)
    }
}

impl WeCom {
    /// Check the signature and the timestamp, then decrypt.
    fn open(
        &self,
        signature: &str,
        timestamp: &str,
        nonce: &str,
        encrypted: &str,
        request: &HookRequest,
    ) -> Result<String, IngestError> {
        self.crypt.verify(signature, timestamp, nonce, encrypted)?;
        if self.max_timestamp_age_ms > 0 {
            let sent_ms = timestamp
                .parse::<i64>()
                .map_err(|_| unverified("stale_timestamp", format!("timestamp {timestamp:?}")))?
                .saturating_mul(1000);
            let age_ms = request.received_at_ms.saturating_sub(sent_ms).abs();
            if age_ms > self.max_timestamp_age_ms {
                return Err(unverified(
                    "stale_timestamp",
                    format!(
                        "timestamp {timestamp} is {} s away from now, more than {} s",
                        age_ms / 1000,
                        self.max_timestamp_age_ms / 1000
                    ),
                ));
            }
        }
        self.crypt.decrypt(encrypted)
    }
}

/// `text` read as WeCom XML, or a refusal starting with `what`. WeCom sends
/// no document type declaration, and quick-xml's deserializer panics on one
/// between two runs of text (`<a>x<!DOCTYPE y>z</a>`; found by fuzz/), so
/// one is refused before deserializing (inside CDATA it is only text).
fn from_xml<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T, IngestError> {
    let mut reader = quick_xml::Reader::from_str(text);
    loop {
        match reader.read_event() {
            Ok(quick_xml::events::Event::DocType(_)) => {
                return Err(IngestError::Malformed(format!(
                    "{what}: a document type declaration (<!DOCTYPE) is not accepted"
                )))
            }
            // Errors are the deserializer's to report.
            Ok(quick_xml::events::Event::Eof) | Err(_) => break,
            Ok(_) => {}
        }
    }
    quick_xml::de::from_str(text)
        .map_err(|error| IngestError::Malformed(format!("{what}: {error}")))
}

fn unverified(reason: &'static str, detail: String) -> IngestError {
    IngestError::Unverified {
        platform: PLATFORM.name,
        reason,
        detail,
    }
}

/// WeCom's message crypto for one app.
struct Crypt {
    token: String,
    key: [u8; 32],
    /// The corp id every plaintext must end with.
    receive_id: String,
}

impl Crypt {
    /// `None` if `encoding_aes_key` is not Base64 of 32 bytes (without its `=`).
    fn new(token: String, encoding_aes_key: &str, receive_id: String) -> Option<Crypt> {
        // The 43rd character carries 2 bits that are not part of the key
        // (they are set in WeCom's own sample key): its SDKs ignore them.
        let lenient = GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
        );
        let key = lenient
            .decode(format!("{encoding_aes_key}="))
            .ok()?
            .try_into()
            .ok()?;
        Some(Crypt {
            token,
            key,
            receive_id,
        })
    }

    /// SHA-1 of the sorted, concatenated `token`, `timestamp`, `nonce`, `encrypted`.
    fn signature(&self, timestamp: &str, nonce: &str, encrypted: &str) -> [u8; 20] {
        let mut parts = [self.token.as_str(), timestamp, nonce, encrypted];
        parts.sort_unstable();
        let mut sha1 = Sha1::new();
        for part in parts {
            sha1.update(part.as_bytes());
        }
        sha1.finalize().into()
    }

    fn verify(
        &self,
        given: &str,
        timestamp: &str,
        nonce: &str,
        encrypted: &str,
    ) -> Result<(), IngestError> {
        let expected = self.signature(timestamp, nonce, encrypted);
        let given = hex::decode(given).unwrap_or_default();
        if bool::from(expected.as_slice().ct_eq(&given)) {
            Ok(())
        } else {
            Err(unverified(
                "bad_signature",
                format!("msg_signature does not match {TOKEN_ENV}"),
            ))
        }
    }

    /// The message inside `encrypted`, checked to be addressed to `receive_id`.
    fn decrypt(&self, encrypted: &str) -> Result<String, IngestError> {
        let broken = |why: &str| unverified("bad_encryption", why.to_string());
        let mut data = STANDARD
            .decode(encrypted.trim())
            .map_err(|_| broken("the encrypted text is not Base64"))?;
        let plain = cbc::Decryptor::<Aes256>::new(&self.key.into(), self.key[..16].into())
            .decrypt_padded_mut::<NoPadding>(&mut data)
            .map_err(|_| broken("the encrypted text is not whole AES blocks"))?;
        let pad = usize::from(*plain.last().ok_or_else(|| broken("nothing encrypted"))?);
        let padded_well = (1..=PAD_BLOCK).contains(&pad)
            && pad <= plain.len()
            && plain[plain.len() - pad..]
                .iter()
                .all(|&b| usize::from(b) == pad);
        if !padded_well {
            return Err(broken(
                "bad padding: the EncodingAESKey is not the app's, or the text was altered",
            ));
        }
        let content = plain
            .get(RANDOM_PREFIX..plain.len() - pad)
            .filter(|content| content.len() >= 4)
            .ok_or_else(|| broken("too short to hold a message"))?;
        let length = u32::from_be_bytes(content[..4].try_into().expect("4 bytes")) as usize;
        let rest = &content[4..];
        if length > rest.len() {
            return Err(broken("the message length is past the end"));
        }
        let (message, receive_id) = rest.split_at(length);
        if receive_id != self.receive_id.as_bytes() {
            return Err(unverified(
                "wrong_receiver",
                format!(
                    "addressed to {:?}, not corp_id {:?}",
                    String::from_utf8_lossy(receive_id),
                    self.receive_id
                ),
            ));
        }
        String::from_utf8(message.to_vec())
            .map_err(|_| IngestError::Malformed("the decrypted message is not UTF-8".into()))
    }
}

// ---- the XML WeCom sends, as far as botline reads it ----

/// The POST body: `<xml><ToUserName/><AgentID/><Encrypt/></xml>`.
#[derive(Debug, Deserialize)]
struct Envelope {
    #[serde(rename = "Encrypt")]
    encrypt: String,
}

/// A decrypted message or event.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Message {
    from_user_name: String,
    #[serde(default)]
    create_time: Option<i64>,
    msg_type: String,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    msg_id: Option<String>,
    #[serde(default, rename = "AgentID")]
    agent_id: Option<String>,
    #[serde(default)]
    pic_url: Option<String>,
    #[serde(default)]
    media_id: Option<String>,
    /// Of a voice message: `amr`, `speex`.
    #[serde(default)]
    format: Option<String>,
}

fn read_message(message: Message, stamp: Stamp) -> Result<Hook, IngestError> {
    let ignored = |kind: &str| {
        Ok(Hook::Ignored {
            kind: kind.into(),
            answer: Answer::ok(),
        })
    };
    let media = |kind: AttachmentKind, url: Option<String>, mime: Option<String>| Attachment {
        kind,
        url,
        file_id: message.media_id.clone(),
        mime,
        size: None,
        name: None,
    };
    let (text, attachments) = match message.msg_type.as_str() {
        "text" => (message.content.clone().unwrap_or_default(), Vec::new()),
        "image" => (
            String::new(),
            vec![media(AttachmentKind::Image, message.pic_url.clone(), None)],
        ),
        "voice" => {
            let mime = message
                .format
                .as_ref()
                .map(|format| format!("audio/{}", format.to_lowercase()));
            (
                String::new(),
                vec![media(AttachmentKind::Audio, None, mime)],
            )
        }
        "video" => (
            String::new(),
            vec![media(AttachmentKind::Video, None, None)],
        ),
        "event" => return ignored("event"),
        _ => return ignored("unsupported_message"),
    };
    let msg_id = message
        .msg_id
        .filter(|id| !id.trim().is_empty())
        .ok_or_else(|| IngestError::Malformed("a WeCom message without MsgId".into()))?;
    let user = message.from_user_name;
    if user.trim().is_empty() {
        return Err(IngestError::Malformed(
            "a WeCom message without FromUserName".into(),
        ));
    }
    let bot = message.agent_id.unwrap_or_default();
    let chat = Chat {
        id: user.clone(),
        kind: ChatKind::Direct,
    };
    let sender = Sender {
        id: user.clone(),
        name: user,
        is_bot: false,
    };
    let unified = UnifiedMessage {
        // A member writes to the app alone: it is always addressed.
        mentions: Mentions {
            users: Vec::new(),
            bot: true,
        },
        attachments,
        platform_message_id: Some(msg_id.clone()),
        platform_ts_ms: message
            .create_time
            .map(|seconds| seconds.saturating_mul(1000)),
        ..stamp.user_message(PLATFORM.name, bot, chat, sender, text)
    };
    Ok(Hook::Events {
        events: vec![Event {
            event_id: msg_id,
            message: unified,
        }],
        answer: Answer::ok(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // WeCom's published sample ("加解密方案说明" and the WXBizMsgCrypt
    // samples): token QDG6eK, this EncodingAESKey, corp id wx5823bf96d3bd56c7.
    const KEY: &str = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C";
    const ECHO: &str =
        "P9nAzCzyDtyTWESHep1vC5X9xho/qYX3Zpb4yKa9SKld1DsH3Iyt3tP3zNdtp+4RPcs8TgAE7OaBO+FZXvnaqQ==";

    fn sample() -> Crypt {
        Crypt::new("QDG6eK".into(), KEY, "wx5823bf96d3bd56c7".into()).unwrap()
    }

    #[test]
    fn the_published_url_check_verifies_and_decrypts() {
        let crypt = sample();
        crypt
            .verify(
                "5c45ff5e21c57e6ad56bac8758b79b1d9ac89fd3",
                "1409659589",
                "263014780",
                ECHO,
            )
            .unwrap();
        assert_eq!(crypt.decrypt(ECHO).unwrap(), "1616140317555161061");
    }

    fn refused(result: Result<impl std::fmt::Debug, IngestError>) -> &'static str {
        result.unwrap_err().label()
    }

    #[test]
    fn altered_inputs_are_refused_with_their_reason() {
        let crypt = sample();
        let verify = |signature: &str, nonce: &str| {
            refused(crypt.verify(signature, "1409659589", nonce, ECHO))
        };
        assert_eq!(
            verify("5c45ff5e21c57e6ad56bac8758b79b1d9ac89fd4", "263014780"),
            "bad_signature"
        );
        assert_eq!(
            verify("5c45ff5e21c57e6ad56bac8758b79b1d9ac89fd3", "263014781"),
            "bad_signature"
        );
        assert_eq!(verify("not hex", "263014780"), "bad_signature");
        assert_eq!(verify("", "263014780"), "bad_signature");
        assert_eq!(refused(crypt.decrypt("%%%")), "bad_encryption");
        assert_eq!(refused(crypt.decrypt("")), "bad_encryption");
        assert_eq!(refused(crypt.decrypt(&ECHO[..40])), "bad_encryption");
        let other_corp = Crypt::new("QDG6eK".into(), KEY, "ww0000000000000000".into()).unwrap();
        assert_eq!(refused(other_corp.decrypt(ECHO)), "wrong_receiver");
        let other_key = Crypt::new(
            "QDG6eK".into(),
            "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
            "wx5823bf96d3bd56c7".into(),
        )
        .unwrap();
        assert_eq!(refused(other_key.decrypt(ECHO)), "bad_encryption");
    }

    #[test]
    fn keys_must_be_43_base64_characters_of_32_bytes() {
        let key =
            |encoding_aes_key: &str| Crypt::new("t".into(), encoding_aes_key, "c".into()).is_some();
        assert!(key(KEY));
        // Other bits past the key in the last character.
        assert!(key("jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2D"));
        assert!(key("jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2A"));
        assert!(!key(&KEY[..42]));
        assert!(!key(&format!("{KEY}A")));
        assert!(!key("jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2!"));
    }
}
