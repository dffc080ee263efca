//! Pictures in generated text. A language model writes an image as
//! Markdown, `![alt](https://…)`; no chat platform shows that syntax as a
//! picture in plain text, so the image is taken out of the text and made an
//! attachment (its alt text kept as the attachment's `name`), which egress
//! sends the platform's way. Only http(s) URLs are taken (`data:`,
//! `javascript:`, relative paths stay in the text as they are), nothing in
//! code (fenced blocks, inline code spans) or escaped (`\![`) is touched,
//! the same URL is taken once, and at most [`MAX_IMAGES`] are taken (the
//! rest stay in the text). Pure: no I/O.

use crate::backend::Draft;
use botline_shared::message::{is_http_url, Attachment};

/// Most images taken from one reply.
pub const MAX_IMAGES: usize = 10;

/// `text` without its Markdown images, which become the draft's attachments.
pub fn take_images(text: &str) -> Draft {
    let mut attachments: Vec<Attachment> = Vec::new();
    let mut lines: Vec<String> = Vec::new();
    let mut fence: Option<&str> = None;
    for line in text.split('\n') {
        let trimmed = line.trim_start();
        if let Some(marker) = fence {
            if trimmed.starts_with(marker) {
                fence = None;
            }
            lines.push(line.to_string());
            continue;
        }
        if let Some(marker) = ["```", "~~~"]
            .into_iter()
            .find(|marker| trimmed.starts_with(marker))
        {
            fence = Some(marker);
            lines.push(line.to_string());
            continue;
        }
        let (kept, took) = take_from_line(line, &mut attachments);
        // A line that held nothing but images goes with them.
        if !(took && kept.trim().is_empty()) {
            lines.push(kept);
        }
    }
    if attachments.is_empty() {
        return Draft::from(text.to_string());
    }
    Draft {
        text: collapse_blank_lines(&lines.join("\n")),
        attachments,
    }
}

/// The line without its images (each added to `attachments`), and whether
/// any was taken.
fn take_from_line(line: &str, attachments: &mut Vec<Attachment>) -> (String, bool) {
    let mut kept = String::with_capacity(line.len());
    let mut took = false;
    let mut rest = line;
    while let Some(c) = rest.chars().next() {
        if c == '\\' {
            // An escaped character stays as written.
            let escaped: usize = rest.chars().take(2).map(char::len_utf8).sum();
            kept.push_str(&rest[..escaped]);
            rest = &rest[escaped..];
            continue;
        }
        if c == '`' {
            let span = code_span(rest);
            kept.push_str(&rest[..span]);
            rest = &rest[span..];
            continue;
        }
        if rest.starts_with("![") && attachments.len() < MAX_IMAGES {
            if let Some((image, length)) = image_at(rest) {
                if let Some(url) = image.url.as_deref() {
                    if !attachments.iter().any(|a| a.url.as_deref() == Some(url)) {
                        attachments.push(image);
                    }
                }
                took = true;
                rest = &rest[length..];
                // The space on one side of the image goes with it.
                if rest.starts_with(' ') && (kept.is_empty() || kept.ends_with(' ')) {
                    rest = &rest[1..];
                }
                continue;
            }
        }
        kept.push(c);
        rest = &rest[c.len_utf8()..];
    }
    if took {
        let end = kept.trim_end().len();
        kept.truncate(end);
    }
    (kept, took)
}

/// How long the code span at the start of `text` is (a run of backticks,
/// up to the same run closing it), or the run's own length when unclosed.
fn code_span(text: &str) -> usize {
    let ticks = text.bytes().take_while(|b| *b == b'`').count();
    let fence = &text[..ticks];
    let mut from = ticks;
    while let Some(found) = text[from..].find(fence) {
        let at = from + found;
        let run = text[at..].bytes().take_while(|b| *b == b'`').count();
        if run == ticks {
            return at + ticks;
        }
        from = at + run;
    }
    ticks
}

/// The http(s) image at the start of `text` (`![alt](url)`, `![alt](<url>)`,
/// optionally with a title) and how many bytes it spans.
fn image_at(text: &str) -> Option<(Attachment, usize)> {
    let after_bang = &text[2..];
    let mut alt = String::new();
    let mut close = None;
    let mut chars = after_bang.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            '\\' => {
                if let Some((_, escaped)) = chars.next() {
                    alt.push(escaped);
                }
            }
            ']' => {
                close = Some(at);
                break;
            }
            '[' => return None,
            c => alt.push(c),
        }
    }
    let after_alt = &after_bang[close? + 1..];
    let inside = after_alt.strip_prefix('(')?;
    let target = inside.trim_start_matches([' ', '\t']);
    let (url, after_url) = if let Some(angled) = target.strip_prefix('<') {
        let end = angled.find('>')?;
        // Only an angled URL may hold spaces; a URL may not.
        (angled[..end].replace(' ', "%20"), &angled[end + 1..])
    } else {
        let mut depth = 0usize;
        let end = target
            .char_indices()
            .find(|(_, c)| match c {
                '(' => {
                    depth += 1;
                    false
                }
                ')' if depth > 0 => {
                    depth -= 1;
                    false
                }
                ')' => true,
                c => c.is_whitespace(),
            })
            .map_or(target.len(), |(at, _)| at);
        (target[..end].to_string(), &target[end..])
    };
    let mut tail = after_url.trim_start_matches([' ', '\t']);
    if let Some(quote) = tail.chars().next().filter(|c| matches!(c, '"' | '\'')) {
        let end = tail[1..].find(quote)?;
        tail = tail[1 + end + 1..].trim_start_matches([' ', '\t']);
    }
    let after_image = tail.strip_prefix(')')?;
    if !is_http_url(&url) {
        return None;
    }
    let alt = alt.trim().to_string();
    let spanned = text.len() - after_image.len();
    Some((Attachment::image(url, Some(alt)), spanned))
}

/// At most one blank line in a row, and none at either end.
fn collapse_blank_lines(text: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for line in text.split('\n') {
        let blank = line.trim().is_empty();
        if blank && out.last().is_none_or(|last| last.trim().is_empty()) {
            continue;
        }
        out.push(line);
    }
    while out.last().is_some_and(|last| last.trim().is_empty()) {
        out.pop();
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `text` gives `expected_text` and images (url, alt).
    fn check(text: &str, expected_text: &str, expected_images: &[(&str, Option<&str>)]) {
        let draft = take_images(text);
        let images: Vec<(&str, Option<&str>)> = draft
            .attachments
            .iter()
            .map(|a| (a.url.as_deref().unwrap(), a.name.as_deref()))
            .collect();
        assert_eq!(
            (draft.text.as_str(), images.as_slice()),
            (expected_text, expected_images),
            "{text:?}"
        );
        for attachment in &draft.attachments {
            assert_eq!(
                attachment.kind,
                botline_shared::message::AttachmentKind::Image
            );
        }
    }

    #[test]
    fn images_leave_the_text_for_attachments() {
        check("no images here", "no images here", &[]);
        check(
            "Here is the map: ![store map](https://example.com/map.png)",
            "Here is the map:",
            &[("https://example.com/map.png", Some("store map"))],
        );
        check(
            "See ![a](https://x.test/a.png) and then ![](http://x.test/b.jpg) too.",
            "See and then too.",
            &[
                ("https://x.test/a.png", Some("a")),
                ("http://x.test/b.jpg", None),
            ],
        );
        check(
            "Our store:\n\n![map](https://x.test/m.png)\n\nOpen 9 to 6.",
            "Our store:\n\nOpen 9 to 6.",
            &[("https://x.test/m.png", Some("map"))],
        );
        check(
            "![only](https://x.test/o.png)",
            "",
            &[("https://x.test/o.png", Some("only"))],
        );
        check(
            "title ![t](https://x.test/t.png \"The title\") after",
            "title after",
            &[("https://x.test/t.png", Some("t"))],
        );
        check(
            "angled ![x](<https://x.test/a b.png>)",
            "angled",
            &[("https://x.test/a%20b.png", Some("x"))],
        );
        check(
            "wiki ![w](https://x.test/Foo_(bar).png)!",
            "wiki !",
            &[("https://x.test/Foo_(bar).png", Some("w"))],
        );
        check(
            "escaped alt ![a \\] b](https://x.test/e.png)",
            "escaped alt",
            &[("https://x.test/e.png", Some("a ] b"))],
        );
        check(
            "twice ![1](https://x.test/same.png) ![2](https://x.test/same.png)",
            "twice",
            &[("https://x.test/same.png", Some("1"))],
        );
        check(
            "中文 ![地图](https://x.test/地图.png) 后",
            "中文 后",
            &[("https://x.test/地图.png", Some("地图"))],
        );
    }

    #[test]
    fn only_http_images_outside_code_are_taken() {
        for text in [
            "![x](javascript:alert(1))",
            "![x](data:image/png;base64,AAAA)",
            "![x](/relative/path.png)",
            "![x](ftp://x.test/a.png)",
            "\\![x](https://x.test/a.png)",
            "`![x](https://x.test/a.png)`",
            "``code ` ![x](https://x.test/a.png) ``",
            "```\n![x](https://x.test/a.png)\n```",
            "~~~md\n![x](https://x.test/a.png)\n~~~",
            "![x] (https://x.test/a.png)",
            "![x](https://x.test/a.png",
            "![x][ref]",
            "![unclosed alt(https://x.test/a.png)",
            "[link](https://x.test/page) is a link, not an image",
        ] {
            check(text, text, &[]);
        }
        check(
            "```\ncode\n```\n![x](https://x.test/a.png)",
            "```\ncode\n```",
            &[("https://x.test/a.png", Some("x"))],
        );
    }

    #[test]
    fn at_most_ten_images_are_taken() {
        let text: String = (0..12)
            .map(|n| format!("![{n}](https://x.test/{n}.png)"))
            .collect::<Vec<_>>()
            .join(" ");
        let draft = take_images(&text);
        assert_eq!(draft.attachments.len(), MAX_IMAGES);
        assert_eq!(
            draft.text,
            "![10](https://x.test/10.png) ![11](https://x.test/11.png)"
        );
    }
}
