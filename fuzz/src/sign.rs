//! Each platform's signatures and encryption, written from the platforms'
//! documentation (not taken from ingest), with the test secrets of
//! [`crate::platforms`].

use crate::platforms::{
    DINGTALK_SECRET, FEISHU_KEY, SLACK_SECRET, WECOM_AES_KEY, WECOM_CORP_ID, WECOM_TOKEN,
};
use aes::cipher::block_padding::{NoPadding, Pkcs7};
use aes::cipher::{BlockEncryptMut, KeyIvInit};
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};

type Aes256CbcEnc = cbc::Encryptor<aes::Aes256>;

/// `X-Slack-Signature`: `v0=` + hex HMAC-SHA256 of `v0:<timestamp>:<body>`.
pub fn slack(timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SLACK_SECRET.as_bytes()).expect("any key");
    mac.update(format!("v0:{timestamp}:").as_bytes());
    mac.update(body);
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

/// `X-Lark-Signature`: hex SHA-256 of timestamp, nonce, encrypt key, body.
pub fn feishu(timestamp: &str, nonce: &str, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(timestamp.as_bytes());
    hasher.update(nonce.as_bytes());
    hasher.update(FEISHU_KEY.as_bytes());
    hasher.update(body);
    hex::encode(hasher.finalize())
}

/// Feishu's `encrypt`: Base64 of an IV and AES-256-CBC (key SHA-256 of the
/// encrypt key, PKCS#7) of `plaintext`.
pub fn feishu_encrypt(plaintext: &[u8]) -> String {
    let key = Sha256::digest(FEISHU_KEY.as_bytes());
    let iv = [7u8; 16];
    let mut data = iv.to_vec();
    data.extend(Aes256CbcEnc::new(&key, &iv.into()).encrypt_padded_vec_mut::<Pkcs7>(plaintext));
    STANDARD.encode(data)
}

/// DingTalk's `sign`: Base64 HMAC-SHA256 of `<timestamp>\n<app secret>`.
pub fn dingtalk(timestamp: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(DINGTALK_SECRET.as_bytes()).expect("any key");
    mac.update(format!("{timestamp}\n{DINGTALK_SECRET}").as_bytes());
    STANDARD.encode(mac.finalize().into_bytes())
}

/// WeCom's `msg_signature`: hex SHA-1 of token, timestamp, nonce and the
/// encrypted text, sorted and concatenated.
pub fn wecom(timestamp: &str, nonce: &str, encrypted: &str) -> String {
    let mut parts = [WECOM_TOKEN, timestamp, nonce, encrypted];
    parts.sort_unstable();
    hex::encode(Sha1::digest(parts.concat().as_bytes()))
}

/// A WeCom message as WeCom encrypts it: 16 random bytes, its length
/// (4 bytes, big-endian), the message, the corp id.
pub fn wecom_encrypt(message: &[u8]) -> String {
    let mut plaintext = b"0123456789abcdef".to_vec();
    plaintext.extend((message.len() as u32).to_be_bytes());
    plaintext.extend(message);
    plaintext.extend(WECOM_CORP_ID.as_bytes());
    wecom_encrypt_raw(&plaintext)
}

/// `plaintext` padded to 32 bytes (PKCS#7 style) and encrypted with the
/// EncodingAESKey (AES-256-CBC, the key's first 16 bytes as IV), in Base64.
pub fn wecom_encrypt_raw(plaintext: &[u8]) -> String {
    let lenient = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
    );
    let key = lenient
        .decode(format!("{WECOM_AES_KEY}="))
        .expect("the test EncodingAESKey is Base64");
    let pad = 32 - plaintext.len() % 32;
    let mut data = plaintext.to_vec();
    data.extend(std::iter::repeat_n(pad as u8, pad));
    let encrypted = Aes256CbcEnc::new(key.as_slice().into(), key[..16].into())
        .encrypt_padded_vec_mut::<NoPadding>(&data);
    STANDARD.encode(encrypted)
}

/// OneBot's `X-Signature`: `sha1=` + hex HMAC-SHA1 of the body.
pub fn onebot(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("any key");
    mac.update(body);
    format!("sha1={}", hex::encode(mac.finalize().into_bytes()))
}
