//! A reply's attachments as the senders need them: the images to show
//! ([`images`]), the text with every other attachment (file, audio, video,
//! sticker) written as a link ([`text_with_links`]), and, for platforms
//! that take a picture only as an upload (Feishu, WeCom), the picture
//! itself, fetched from its URL within the platform's size limit and
//! checked to be an image of a kind the platform takes ([`Fetcher`]).
//!
//! Only http(s) URLs are used, and pictures are fetched only from public
//! addresses unless `image_private_hosts` is on: a reply's image URL may
//! come from an LLM, and must not make egress reach into its own network
//! (cloud metadata at 169.254.169.254, Redis, admin pages). The address is
//! checked after the name is resolved and on every redirect. An attachment
//! without an http(s) URL (a platform's own
//! file id, which means nothing on another platform) cannot be sent: it is
//! logged and counted in `botline_egress_attachments_skipped_total`, never
//! passed over in silence.

use super::{Attempt, Verdict};
use botline_shared::message::{AttachmentKind, Reply};
use botline_shared::Error;
use reqwest::StatusCode;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

/// Feishu's and WeCom's limit on an uploaded picture: 10 MB.
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 10 * 1024 * 1024;
/// How many redirects a picture's URL may take.
const MAX_REDIRECTS: usize = 3;

/// An image attachment to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Image<'a> {
    pub url: &'a str,
    /// Its alt text (the attachment's name), if any.
    pub alt: Option<&'a str>,
}

/// The reply's image attachments with an http(s) URL, in order.
pub fn images(reply: &Reply) -> Vec<Image<'_>> {
    reply
        .attachments
        .iter()
        .filter(|attachment| attachment.kind == AttachmentKind::Image)
        .filter_map(|attachment| {
            Some(Image {
                url: attachment.http_url()?,
                alt: attachment.name.as_deref().filter(|name| !name.is_empty()),
            })
        })
        .collect()
}

/// The reply's text, then each attachment that is not an image (or, with
/// `images_too`, every attachment) on a line of its own: `name: url`, or
/// the URL alone. Attachments without an http(s) URL are skipped, logged
/// and counted.
pub fn text_with_links(reply: &Reply, images_too: bool) -> String {
    let mut text = reply.text.clone();
    for attachment in &reply.attachments {
        let Some(url) = attachment.http_url() else {
            warn!(
                message = "an attachment without an http(s) URL cannot be sent; skipped",
                reply_id = %reply.id,
                kind = ?attachment.kind
            );
            metrics::counter!("botline_egress_attachments_skipped_total", "platform" => reply.platform.clone())
                .increment(1);
            continue;
        };
        if attachment.kind == AttachmentKind::Image && !images_too {
            continue;
        }
        if !text.is_empty() {
            text.push('\n');
        }
        match attachment.name.as_deref().filter(|name| !name.is_empty()) {
            Some(name) => text.push_str(&format!("{name}: {url}")),
            None => text.push_str(url),
        }
    }
    text
}

/// `images` as link lines after `text` (for images a platform cannot show
/// beyond its own limit, say).
pub fn append_image_links(text: &mut String, images: &[Image<'_>]) {
    for image in images {
        if !text.is_empty() {
            text.push('\n');
        }
        match image.alt {
            Some(alt) => text.push_str(&format!("{alt}: {}", image.url)),
            None => text.push_str(image.url),
        }
    }
}

/// Kinds of picture, as told by their first bytes (not by what a server
/// says they are).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Jpeg,
    Png,
    Gif,
    Webp,
    Bmp,
    Tiff,
    Ico,
}

impl ImageFormat {
    /// Every kind Feishu's image upload takes.
    pub const ALL: &'static [ImageFormat] = &[
        ImageFormat::Jpeg,
        ImageFormat::Png,
        ImageFormat::Gif,
        ImageFormat::Webp,
        ImageFormat::Bmp,
        ImageFormat::Tiff,
        ImageFormat::Ico,
    ];

    /// The kind of image `bytes` start like, if any.
    pub fn sniff(bytes: &[u8]) -> Option<ImageFormat> {
        let starts = |magic: &[u8]| bytes.starts_with(magic);
        if starts(b"\xFF\xD8\xFF") {
            Some(ImageFormat::Jpeg)
        } else if starts(b"\x89PNG\r\n\x1a\n") {
            Some(ImageFormat::Png)
        } else if starts(b"GIF87a") || starts(b"GIF89a") {
            Some(ImageFormat::Gif)
        } else if bytes.len() >= 12 && starts(b"RIFF") && &bytes[8..12] == b"WEBP" {
            Some(ImageFormat::Webp)
        } else if starts(b"BM") && bytes.len() >= 26 {
            Some(ImageFormat::Bmp)
        } else if starts(b"II*\0") || starts(b"MM\0*") {
            Some(ImageFormat::Tiff)
        } else if starts(b"\0\0\x01\0") {
            Some(ImageFormat::Ico)
        } else {
            None
        }
    }

    pub fn mime(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Png => "image/png",
            ImageFormat::Gif => "image/gif",
            ImageFormat::Webp => "image/webp",
            ImageFormat::Bmp => "image/bmp",
            ImageFormat::Tiff => "image/tiff",
            ImageFormat::Ico => "image/x-icon",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "jpg",
            ImageFormat::Png => "png",
            ImageFormat::Gif => "gif",
            ImageFormat::Webp => "webp",
            ImageFormat::Bmp => "bmp",
            ImageFormat::Tiff => "tiff",
            ImageFormat::Ico => "ico",
        }
    }
}

/// A picture fetched for an upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Picture {
    pub bytes: Vec<u8>,
    pub format: ImageFormat,
}

impl Picture {
    /// The file name an upload gives it: `image.<extension>`.
    pub fn file_name(&self) -> String {
        format!("image.{}", self.format.extension())
    }

    /// The picture as a multipart file part.
    pub fn part(&self) -> reqwest::multipart::Part {
        reqwest::multipart::Part::bytes(self.bytes.clone())
            .file_name(self.file_name())
            .mime_str(self.format.mime())
            .expect("image MIME types parse")
    }
}

/// Fetches pictures from their URLs for one platform, within its limits.
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    timeout: Duration,
    max_bytes: u64,
    /// The platform, as reasons name it (`feishu`).
    platform: &'static str,
    /// The kinds of picture it takes.
    formats: &'static [ImageFormat],
    /// Whether pictures may come from loopback, private and link-local
    /// addresses.
    private_hosts: bool,
}

impl Fetcher {
    pub fn new(
        platform: &'static str,
        timeout: Duration,
        max_bytes: u64,
        formats: &'static [ImageFormat],
        private_hosts: bool,
    ) -> Result<Fetcher, Error> {
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
            } else if let Some(inside) = inside(attempt.url()).filter(|_| !private_hosts) {
                attempt.error(inside)
            } else {
                attempt.follow()
            }
        });
        let mut client = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(redirects)
            .user_agent(concat!("botline-egress/", env!("CARGO_PKG_VERSION")));
        if !private_hosts {
            client = client.dns_resolver(Arc::new(PublicOnly));
        }
        let client = client
            .build()
            .map_err(|error| Error::config(format!("egress.platforms.{platform}"), error))?;
        Ok(Fetcher {
            client,
            timeout,
            max_bytes,
            platform,
            formats,
            private_hosts,
        })
    }

    /// The picture at `url`, or the attempt that failed: a URL that is
    /// gone or refused (4xx), a picture over the size limit, or anything
    /// that is not a picture the platform takes is permanent (the entry
    /// goes to `dead` saying which URL and why); timeouts, broken
    /// connections, 408, 429 and 5xx are worth a retry.
    pub async fn fetch(&self, url: &str) -> Result<Picture, Attempt> {
        let shown = shown_url(url);
        let permanent = |why: String| Attempt {
            response: None,
            verdict: Verdict::Permanent(format!("image {shown}: {why}")),
        };
        let retry = |why: String| Attempt {
            response: None,
            verdict: Verdict::RetryAfter {
                wait: None,
                reason: format!("image {shown}: {why}"),
            },
        };
        let parsed = reqwest::Url::parse(url)
            .ok()
            .filter(|parsed| matches!(parsed.scheme(), "http" | "https"))
            .ok_or_else(|| permanent("not an http(s) URL".into()))?;
        let refuse_inside = |inside: &Inside| {
            permanent(format!(
                "{inside}; pictures are fetched from public addresses only, unless \
                 egress.platforms.{}.image_private_hosts = true",
                self.platform
            ))
        };
        if let Some(inside) = inside(&parsed).filter(|_| !self.private_hosts) {
            return Err(refuse_inside(&inside));
        }
        let mut response = self.client.get(parsed).send().await.map_err(|error| {
            if let Some(inside) = cause::<Inside>(&error) {
                refuse_inside(inside)
            } else if error.is_timeout() {
                retry(format!("fetching it timed out after {:?}", self.timeout))
            } else if error.is_redirect() {
                permanent(format!("more than {MAX_REDIRECTS} redirects"))
            } else {
                retry(format!("could not be fetched: {}", error.without_url()))
            }
        })?;
        let status = response.status();
        if !status.is_success() {
            let why = format!("could not be fetched: HTTP {}", status.as_u16());
            let transient = status.is_server_error()
                || status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::REQUEST_TIMEOUT;
            return Err(if transient {
                retry(why)
            } else {
                permanent(why)
            });
        }
        let too_big = |size: String| {
            permanent(format!(
                "is {size} bytes, over {}'s limit of {} bytes",
                self.platform, self.max_bytes
            ))
        };
        if let Some(length) = response.content_length().filter(|l| *l > self.max_bytes) {
            return Err(too_big(length.to_string()));
        }
        let mut bytes = Vec::new();
        loop {
            let chunk = response.chunk().await.map_err(|error| {
                if error.is_timeout() {
                    retry(format!("fetching it timed out after {:?}", self.timeout))
                } else {
                    retry(format!("fetching it broke off: {}", error.without_url()))
                }
            })?;
            let Some(chunk) = chunk else { break };
            bytes.extend_from_slice(&chunk);
            if bytes.len() as u64 > self.max_bytes {
                return Err(too_big(format!("more than {}", self.max_bytes)));
            }
        }
        if bytes.is_empty() {
            return Err(permanent("is empty".into()));
        }
        match ImageFormat::sniff(&bytes).filter(|format| self.formats.contains(format)) {
            Some(format) => Ok(Picture { bytes, format }),
            None => Err(permanent(format!(
                "is not a picture {} takes ({})",
                self.platform,
                self.formats
                    .iter()
                    .map(|format| format.extension())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }
}

/// A host that is, or resolves only to, an address inside the network.
#[derive(Debug, thiserror::Error)]
#[error("{host} is a loopback, private or link-local address")]
struct Inside {
    host: String,
}

/// Whether anyone on the internet could reach `ip`: not loopback, private
/// (RFC 1918, RFC 4193), link-local, shared (RFC 6598), "this network",
/// unspecified, broadcast, documentation or multicast.
fn public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || a == 0
                || (a == 100 && (64..128).contains(&b)))
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => public(IpAddr::V4(v4)),
            None => {
                !(v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || v6.is_unique_local()
                    || v6.is_unicast_link_local())
            }
        },
    }
}

/// The URL's host if it is an IP address that is not public (names are
/// checked once resolved, by [`PublicOnly`]).
fn inside(url: &reqwest::Url) -> Option<Inside> {
    let host = url.host_str()?;
    let ip: IpAddr = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()?;
    (!public(ip)).then(|| Inside {
        host: ip.to_string(),
    })
}

/// Resolves names as the system does and keeps only their public
/// addresses; a name with none is refused.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let public: Vec<SocketAddr> = found.filter(|address| public(address.ip())).collect();
            if public.is_empty() {
                return Err(Box::new(Inside { host }) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The first `E` among the causes of `error`.
fn cause<E: std::error::Error + 'static>(error: &reqwest::Error) -> Option<&E> {
    let mut source = std::error::Error::source(error);
    while let Some(error) = source {
        if let Some(found) = error.downcast_ref::<E>() {
            return Some(found);
        }
        source = error.source();
    }
    None
}

/// A URL as reasons show it: without its query and fragment, which may
/// carry signatures or tokens.
pub fn shown_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            parsed.set_query(None);
            parsed.set_fragment(None);
            parsed.to_string()
        }
        Err(_) => url.chars().take(100).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::senders::http::test_reply;
    use botline_shared::message::{Attachment, ChatKind};

    fn reply(attachments: Vec<Attachment>) -> Reply {
        Reply {
            attachments,
            ..test_reply("p", "b", "c", ChatKind::Direct, "see")
        }
    }

    fn file(kind: AttachmentKind, url: Option<&str>, name: Option<&str>) -> Attachment {
        Attachment {
            kind,
            url: url.map(str::to_string),
            file_id: Some("f1".into()),
            mime: None,
            size: None,
            name: name.map(str::to_string),
        }
    }

    #[test]
    fn images_are_shown_and_other_attachments_become_links() {
        let with = reply(vec![
            Attachment::image("https://x.test/a.png", Some("map".into())),
            file(
                AttachmentKind::File,
                Some("https://x.test/menu.pdf"),
                Some("menu.pdf"),
            ),
            file(AttachmentKind::Image, None, Some("platform file only")),
            file(
                AttachmentKind::Audio,
                Some("https://x.test/hello.mp3"),
                None,
            ),
            file(AttachmentKind::Video, Some("ftp://x.test/v.mp4"), None),
            Attachment::image("http://x.test/b.jpg", None),
        ]);
        assert_eq!(
            images(&with),
            [
                Image {
                    url: "https://x.test/a.png",
                    alt: Some("map")
                },
                Image {
                    url: "http://x.test/b.jpg",
                    alt: None
                }
            ]
        );
        assert_eq!(
            text_with_links(&with, false),
            "see\nmenu.pdf: https://x.test/menu.pdf\nhttps://x.test/hello.mp3"
        );
        assert_eq!(
            text_with_links(&with, true),
            "see\nmap: https://x.test/a.png\nmenu.pdf: https://x.test/menu.pdf\nhttps://x.test/hello.mp3\nhttp://x.test/b.jpg"
        );
        let mut empty = reply(vec![]);
        empty.text.clear();
        assert_eq!(text_with_links(&empty, true), "");
    }

    #[test]
    fn pictures_are_known_by_their_first_bytes() {
        for (bytes, expected) in [
            (&b"\xFF\xD8\xFF\xE0\0\x10JFIF"[..], Some(ImageFormat::Jpeg)),
            (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", Some(ImageFormat::Png)),
            (b"GIF89a\x01\0\x01\0", Some(ImageFormat::Gif)),
            (b"RIFF\x24\0\0\0WEBPVP8 ", Some(ImageFormat::Webp)),
            (b"II*\0\x08\0\0\0", Some(ImageFormat::Tiff)),
            (b"\0\0\x01\0\x01\0", Some(ImageFormat::Ico)),
            (b"<html>not found</html>", None),
            (b"{\"error\": 1}", None),
            (b"RIFF\x24\0\0\0WAVE", None),
            (b"", None),
        ] {
            assert_eq!(ImageFormat::sniff(bytes), expected, "{bytes:?}");
        }
    }

    /// A server on 127.0.0.1:0 answering every request with `response`
    /// (raw HTTP/1.1), then closing.
    async fn serve(response: Vec<u8>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let _ = socket.write_all(&response).await;
                let _ = socket.shutdown().await;
            }
        });
        url
    }

    /// What fetching from a server answering `response` comes to.
    async fn fetched(response: &[u8], formats: &'static [ImageFormat]) -> String {
        let url = serve(response.to_vec()).await;
        let fetcher = Fetcher::new("p", Duration::from_secs(5), 1000, formats, true).unwrap();
        let shown = |reason: String| reason.replace(&url, "URL");
        match fetcher.fetch(&format!("{url}/a.png?token=x")).await {
            Ok(picture) => format!("{:?} {} bytes", picture.format, picture.bytes.len()),
            Err(attempt) => match attempt.verdict {
                Verdict::RetryAfter { reason, .. } => format!("retry {}", shown(reason)),
                Verdict::Permanent(reason) => format!("permanent {}", shown(reason)),
                Verdict::Delivered { .. } => "delivered".into(),
            },
        }
    }

    #[tokio::test]
    async fn a_picture_is_fetched_within_its_limit_or_refused_saying_why() {
        let png = |size: usize| {
            let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
            bytes.resize(size, 0);
            bytes
        };
        let with_length = |body: &[u8]| {
            let mut response =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
            response.extend_from_slice(body);
            response
        };
        // No Content-Length: the cap holds while reading.
        let chunked = |body: &[u8]| {
            let mut response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for chunk in body.chunks(300) {
                response.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                response.extend_from_slice(chunk);
                response.extend_from_slice(b"\r\n");
            }
            response.extend_from_slice(b"0\r\n\r\n");
            response
        };
        let all = ImageFormat::ALL;
        let cases: [(Vec<u8>, &'static [ImageFormat], &str); 8] = [
            (with_length(&png(1000)), all, "Png 1000 bytes"),
            (chunked(&png(900)), all, "Png 900 bytes"),
            (
                with_length(&png(1001)),
                all,
                "permanent image URL/a.png: is 1001 bytes, over p's limit of 1000 bytes",
            ),
            (
                chunked(&png(2000)),
                all,
                "permanent image URL/a.png: is more than 1000 bytes, over p's limit of 1000 bytes",
            ),
            (
                with_length(&png(500)),
                &[ImageFormat::Jpeg],
                "permanent image URL/a.png: is not a picture p takes (jpg)",
            ),
            (with_length(b""), all, "permanent image URL/a.png: is empty"),
            (
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
                all,
                "permanent image URL/a.png: could not be fetched: HTTP 404",
            ),
            (
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".to_vec(),
                all,
                "retry image URL/a.png: could not be fetched: HTTP 503",
            ),
        ];
        for (response, formats, expected) in cases {
            assert_eq!(fetched(&response, formats).await, expected);
        }
        let fetcher =
            Fetcher::new("p", Duration::from_secs(5), 1000, ImageFormat::ALL, true).unwrap();
        let refused = fetcher.fetch("http://127.0.0.1:1/a.png").await.unwrap_err();
        assert!(
            matches!(&refused.verdict, Verdict::RetryAfter { reason, .. } if reason.starts_with("image http://127.0.0.1:1/a.png: could not be fetched")),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn pictures_come_from_public_addresses_only_unless_allowed() {
        let png = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n\x89PNG\r\n\x1a\n".to_vec();
        let url = serve(png.clone()).await;
        let port = url.rsplit(':').next().unwrap().to_string();
        let guarded = Fetcher::new(
            "feishu",
            Duration::from_secs(5),
            1000,
            ImageFormat::ALL,
            false,
        )
        .unwrap();
        // By address, by a name that resolves to it, and IPv4 inside IPv6.
        for (url, host) in [
            (url.clone(), "127.0.0.1"),
            (format!("http://localhost:{port}"), "localhost"),
            (
                format!("http://[::ffff:127.0.0.1]:{port}"),
                "::ffff:127.0.0.1",
            ),
        ] {
            let refused = guarded.fetch(&format!("{url}/a.png")).await.unwrap_err();
            let Verdict::Permanent(reason) = &refused.verdict else {
                panic!("{url}: {refused:?}");
            };
            assert!(
                reason.contains(&format!(
                    "{host} is a loopback, private or link-local address"
                )) && reason.contains("egress.platforms.feishu.image_private_hosts = true"),
                "{url}: {reason}"
            );
        }
        let allowed = Fetcher::new(
            "feishu",
            Duration::from_secs(5),
            1000,
            ImageFormat::ALL,
            true,
        )
        .unwrap();
        let url = serve(png).await;
        assert_eq!(
            allowed.fetch(&format!("{url}/a.png")).await.unwrap().format,
            ImageFormat::Png
        );
    }

    #[test]
    fn only_addresses_anyone_could_reach_are_public() {
        for inside in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "192.0.2.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!public(inside.parse().unwrap()), "{inside}");
        }
        for outside in [
            "8.8.8.8",
            "1.1.1.1",
            "100.128.0.1",
            "2001:4860:4860::8888",
            "::ffff:8.8.8.8",
        ] {
            assert!(public(outside.parse().unwrap()), "{outside}");
        }
    }

    #[test]
    fn reasons_never_show_a_urls_query() {
        assert_eq!(
            shown_url("https://cdn.x.test/a.png?signature=secret#frag"),
            "https://cdn.x.test/a.png"
        );
        assert_eq!(shown_url("not a url"), "not a url");
    }
}
