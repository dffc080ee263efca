//! botline's fuzz targets: one function per input surface, each taking the
//! fuzzer's bytes, driving the code that reads them the way the service
//! does, and checking what must hold whatever the bytes are:
//!
//! - nothing panics: bad input is an `Err`, never a crash;
//! - a refusal is a client error (400, 401, 404, 413, 422), never a server
//!   error, since nothing here touches Redis;
//! - every message a parser makes survives the stream codec
//!   (`decode(encode(m)) == m`), as it must to reach classify;
//! - a request whose signature is wrong is refused (401), whatever its body.
//!
//! The platform targets sign each input with fixed test secrets, so the
//! fuzzer's bytes get past verification into the parser; `hooks` lets the
//! fuzzer write the headers, the query and the timestamps too.
//!
//! `src/bin/afl.rs` runs a target under AFL++, `src/bin/replay.rs` runs
//! saved inputs through one without it (`scripts/fuzz replay`).

pub mod api;
pub mod check;
pub mod codec;
pub mod hooks;
pub mod platforms;
pub mod sign;

/// One fuzz target.
pub struct Target {
    pub name: &'static str,
    /// What its input is.
    pub input: &'static str,
    pub run: fn(&[u8]),
}

/// Every target, by the name `scripts/fuzz` and `fuzz/corpus/<name>` use.
pub const TARGETS: &[Target] = &[
    Target {
        name: "codec",
        input: "a selector byte (record kind, fields left out), then the `body` field",
        run: codec::run,
    },
    Target {
        name: "telegram",
        input: "an Update, with the right secret token",
        run: platforms::telegram,
    },
    Target {
        name: "slack",
        input: "an Events API body, signed",
        run: platforms::slack,
    },
    Target {
        name: "feishu",
        input: "a plain callback (verification token in the body)",
        run: platforms::feishu,
    },
    Target {
        name: "feishu_encrypted",
        input: "a callback, encrypted and signed; \\x01 first: the `encrypt` text itself",
        run: platforms::feishu_encrypted,
    },
    Target {
        name: "dingtalk",
        input: "an outgoing-robot callback, signed",
        run: platforms::dingtalk,
    },
    Target {
        name: "wecom",
        input: "a message's XML, encrypted and signed; \\x00 first: the whole plaintext; \\x01 first: a URL check's echostr",
        run: platforms::wecom,
    },
    Target {
        name: "onebot",
        input: "an OneBot v11 event, signed",
        run: platforms::onebot,
    },
    Target {
        name: "discord",
        input: "a Gateway text frame",
        run: platforms::discord,
    },
    Target {
        name: "generic_api",
        input: "a POST /v1/messages or /v1/broadcast body; also tried as a bearer token and trace headers",
        run: api::generic,
    },
    Target {
        name: "webchat",
        input: "a web chat client frame",
        run: api::webchat,
    },
    Target {
        name: "hooks",
        input: "a whole request: `<setup> <METHOD> [query]`, header lines, a blank line, the body; `{sign}` in a header or the query becomes the right signature",
        run: hooks::run,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|target| target.name == name)
}
