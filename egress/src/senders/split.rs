//! A text too long for one platform message, split into pieces that each
//! fit: at a paragraph break if one falls in the second half of the room,
//! else a line break, else the end of a sentence (`. ! ?` and `。！？`),
//! else a space, and only as a last resort in the middle of a run of text
//! (never inside a character, so never inside a UTF-16 surrogate pair,
//! nor before a combining mark, a variation selector or a zero-width
//! joiner, nor inside an `@mention`). The whitespace a split falls on is
//! dropped; no other character is lost or added. Pure.
//!
//! Lengths are measured by the caller's unit: Telegram counts UTF-16 code
//! units, Slack characters. Callers split the plain text, before escaping
//! or rendering mentions, so no entity (`&amp;`) or tag is ever cut.

/// How a platform measures a text's length.
pub type Measure = fn(char) -> usize;

/// UTF-16 code units (Telegram).
pub fn utf16(c: char) -> usize {
    c.len_utf16()
}

/// Characters (Slack, Discord).
pub fn chars(_: char) -> usize {
    1
}

/// The length of `text` in `measure`'s units.
pub fn length(text: &str, measure: Measure) -> usize {
    text.chars().map(measure).sum()
}

/// `text` in pieces of at most `room` units each (`room` at least 1);
/// `[text]` when it fits, nothing for an empty text.
pub fn split(text: &str, room: usize, measure: Measure) -> Vec<&str> {
    let room = room.max(1);
    let mut pieces = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        // The byte index where `room` units end (or the end of `rest`).
        let mut used = 0;
        let mut end = rest.len();
        for (at, c) in rest.char_indices() {
            used += measure(c);
            if used > room {
                end = at;
                break;
            }
        }
        if end == rest.len() {
            pieces.push(rest);
            break;
        }
        if end == 0 {
            // One character wider than the room: it goes alone.
            end = rest.chars().next().map_or(0, char::len_utf8);
        }
        let (piece_end, next_start) = cut(&rest[..end], rest);
        let piece = rest[..piece_end].trim_end_matches(is_break_space);
        if !piece.is_empty() {
            pieces.push(piece);
        }
        rest = rest[next_start..].trim_start_matches(is_break_space);
    }
    pieces
}

/// `text` in pieces, each rendered by `render(piece, its mentions)` and
/// fitting `room` once rendered: a piece carries the users of `mentions`
/// it names (`@<id>`), and the first one also those the text names
/// nowhere (which `render` puts in front). `growth` is how much longer
/// the whole text is rendered than plain, in `measure`'s units: room is
/// kept for it in every piece (at least a quarter of `room` is left for text).
pub fn render_pieces(
    text: &str,
    mentions: &[String],
    room: usize,
    measure: Measure,
    growth: usize,
    render: impl Fn(&str, &[String]) -> String,
) -> Vec<String> {
    let ahead: Vec<&String> = mentions
        .iter()
        .filter(|user| !super::mentions::names(text, user))
        .collect();
    let pieces = split(text, room.saturating_sub(growth).max(room / 4), measure);
    if pieces.is_empty() {
        return vec![render("", mentions)];
    }
    pieces
        .into_iter()
        .enumerate()
        .map(|(index, piece)| {
            let carried: Vec<String> = mentions
                .iter()
                .filter(|user| {
                    super::mentions::names(piece, user) || (index == 0 && ahead.contains(user))
                })
                .cloned()
                .collect();
            render(piece, &carried)
        })
        .collect()
}

fn is_break_space(c: char) -> bool {
    matches!(c, ' ' | '\n' | '\r' | '\t')
}

/// Where to end the piece within `window` (a prefix of `rest`), and where
/// the next piece starts.
fn cut(window: &str, rest: &str) -> (usize, usize) {
    let end = window.len();
    let half = end / 2;
    let in_second_half = |at: &usize| *at >= half && *at > 0 && *at <= end;
    // Breaks may lie just past the window: what they end is still in it.
    let probe = &rest[..rest[end..]
        .char_indices()
        .nth(2)
        .map_or(rest.len(), |(at, _)| end + at)];
    let last = |pattern: &str| {
        probe
            .rmatch_indices(pattern)
            .map(|(at, _)| at)
            .find(|at| *at <= end)
    };
    if let Some(at) = last("\n\n").filter(in_second_half) {
        return (at, at + 2);
    }
    if let Some(at) = last("\n").filter(in_second_half) {
        return (at, at + 1);
    }
    let sentence_end = window
        .char_indices()
        .rev()
        .filter(|(at, c)| {
            let after = probe[at + c.len_utf8()..].chars().next();
            match c {
                '。' | '！' | '？' => true,
                '.' | '!' | '?' => after.is_some_and(char::is_whitespace),
                _ => false,
            }
        })
        .map(|(at, c)| at + c.len_utf8())
        .find(in_second_half);
    if let Some(at) = sentence_end {
        return (at, at);
    }
    if let Some(at) = probe
        .rmatch_indices([' ', '\t'])
        .map(|(at, _)| at)
        .find(|at| *at > 0 && *at <= end)
    {
        return (at, at + 1);
    }
    let at = hard_cut(window, rest);
    (at, at)
}

/// The last place in `window` that splits neither a grapheme's marks from
/// its base nor an `@mention`; the window's end when there is none.
fn hard_cut(window: &str, rest: &str) -> usize {
    let mut at = window.len();
    // Step back over at most this many characters looking for a better place.
    for _ in 0..64 {
        if at == 0 {
            break;
        }
        let before = window[..at].chars().next_back();
        let after = rest[at..].chars().next();
        let joins = after.is_some_and(joins_previous) || before == Some('\u{200D}');
        let in_mention = after.is_some_and(is_id_char)
            && window[..at].trim_end_matches(is_id_char).ends_with('@');
        if !joins && !in_mention {
            return at;
        }
        at -= before.map_or(0, char::len_utf8);
    }
    if at == 0 {
        window.len()
    } else {
        at
    }
}

/// A character that belongs with the one before it.
fn joins_previous(c: char) -> bool {
    matches!(c,
        '\u{0300}'..='\u{036F}'        // combining diacritical marks
        | '\u{1AB0}'..='\u{1AFF}'
        | '\u{20D0}'..='\u{20FF}'
        | '\u{FE00}'..='\u{FE0F}'      // variation selectors
        | '\u{FE20}'..='\u{FE2F}'
        | '\u{200D}'                   // zero-width joiner
        | '\u{1F3FB}'..='\u{1F3FF}'    // skin tones
        | '\u{E0020}'..='\u{E007F}'    // tag characters (flags)
    )
}

/// A character of a user id as mentions write them (`@U123_x`).
fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, room: usize, measure: Measure, expected: &[&str]) {
        let pieces = split(text, room, measure);
        assert_eq!(pieces, expected, "{text:?} in {room}");
        for piece in &pieces {
            assert!(length(piece, measure) <= room, "{piece:?} fits {room}");
        }
    }

    #[test]
    fn texts_split_at_the_best_break_in_reach() {
        check("", 10, chars, &[]);
        check("short", 10, chars, &["short"]);
        check("exactly 10", 10, chars, &["exactly 10"]);
        check("para one\n\npara two", 12, chars, &["para one", "para two"]);
        check("line one\nline two", 12, chars, &["line one", "line two"]);
        check(
            "One. Two three four",
            12,
            chars,
            &["One. Two", "three four"],
        );
        check("It is. Over there", 12, chars, &["It is.", "Over there"]);
        check(
            "你好世界。今天天气很好",
            8,
            chars,
            &["你好世界。", "今天天气很好"],
        );
        check("aaaa bbbb cccc", 9, chars, &["aaaa bbbb", "cccc"]);
        check("abcdefghij", 4, chars, &["abcd", "efgh", "ij"]);
        // A paragraph break too early in the window loses to a later line break.
        check("a\n\nbbbbbbb\ncc", 11, chars, &["a\n\nbbbbbbb", "cc"]);
    }

    #[test]
    fn nothing_is_lost_but_the_whitespace_split_on() {
        let text = "第一段。\n\nSecond paragraph, with words.\nThird line! 😀 end";
        for room in 3..40 {
            let pieces = split(text, room, utf16);
            let squeezed: String = text.chars().filter(|c| !c.is_whitespace()).collect();
            let joined: String = pieces
                .concat()
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            assert_eq!(joined, squeezed, "room {room}");
        }
    }

    #[test]
    fn utf16_units_are_counted_and_pairs_never_split() {
        // Each emoji is 2 UTF-16 units.
        check("😀😀😀", 4, utf16, &["😀😀", "😀"]);
        check("😀😀😀", 5, utf16, &["😀😀", "😀"]);
        check("😀😀😀", 3, chars, &["😀😀😀"]);
        // A room of one unit still makes progress with a two-unit character.
        assert_eq!(split("😀", 1, utf16), ["😀"]);
    }

    #[test]
    fn marks_stay_with_their_letter_and_mentions_stay_whole() {
        // `e` + combining acute: never cut between them.
        check("abcde\u{301}fg", 5, chars, &["abcd", "e\u{301}fg"]);
        // An emoji with a variation selector and a ZWJ sequence.
        check("xxx❤\u{FE0F}yy", 4, chars, &["xxx", "❤\u{FE0F}yy"]);
        check("ab👩\u{200D}👩cd", 4, chars, &["ab", "👩\u{200D}👩c", "d"]);
        // No space in reach: the cut moves back before `@42`, not inside it.
        check("xxxxxx@42yyyy", 8, chars, &["xxxxxx", "@42yyyy"]);
    }
}
