//! Mentions in a reply's text, placed the platform's way: a reply carries
//! user ids, and its text may already say `@<user id>` where one belongs.
//! Shared by the senders whose platforms mention users inline (Telegram,
//! Slack); pure.

/// `text` with each user of `mentions` rendered by `render`: in place of
/// its `@<id>` (not followed by more of an id), or, where the text has
/// none, in front of it, separated by spaces.
pub fn place(text: &str, mentions: &[String], render: impl Fn(&str) -> String) -> String {
    let mut text = text.to_string();
    let mut ahead = Vec::new();
    for user in mentions {
        let rendered = render(user);
        match replace_mention(&text, user, &rendered) {
            Some(replaced) => text = replaced,
            None => ahead.push(rendered),
        }
    }
    if ahead.is_empty() {
        text
    } else {
        format!("{} {text}", ahead.join(" "))
    }
}

/// Whether `text` names `user` as `@<user>` (not followed by more of an id).
pub fn names(text: &str, user: &str) -> bool {
    find_whole(text, user).is_some()
}

/// A stretch of text, or a mention, in the order the text has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    Text(&'a str),
    Mention(&'a str),
}

/// `text` cut at each `@<user>` of `mentions` it names (as a whole id):
/// for platforms whose mentions are elements of their own, not markup.
pub fn pieces<'a>(text: &'a str, mentions: &'a [String]) -> Vec<Piece<'a>> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while let Some((at, user)) = mentions
        .iter()
        .filter_map(|user| find_whole(rest, user).map(|at| (at, user.as_str())))
        .min()
    {
        if at > 0 {
            pieces.push(Piece::Text(&rest[..at]));
        }
        pieces.push(Piece::Mention(user));
        rest = &rest[at + 1 + user.len()..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest));
    }
    pieces
}

/// Where `text` first has `@<user>` not followed by more of an id.
fn find_whole(text: &str, user: &str) -> Option<usize> {
    if user.is_empty() {
        return None;
    }
    let token = format!("@{user}");
    let mut from = 0;
    while let Some(found) = text[from..].find(&token) {
        let at = from + found;
        let after = &text[at + token.len()..];
        if !after
            .chars()
            .next()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
        {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// `text` with every `@<user>` (not followed by more of an id) replaced by
/// `with`, or `None` if there is none.
fn replace_mention(text: &str, user: &str, with: &str) -> Option<String> {
    let token = format!("@{user}");
    let mut replaced = String::with_capacity(text.len());
    let mut rest = text;
    let mut found = false;
    while let Some(at) = rest.find(&token) {
        let after = &rest[at + token.len()..];
        let whole = !after
            .chars()
            .next()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        replaced.push_str(&rest[..at]);
        replaced.push_str(if whole { with } else { &token });
        found |= whole;
        rest = after;
    }
    replaced.push_str(rest);
    found.then_some(replaced)
}

/// `&`, `<` and `>` as `&amp;`, `&lt;` and `&gt;`: what Telegram's HTML
/// parse mode and Slack's message text both require.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, mentions: &[&str], expected: &str) {
        let mentions: Vec<String> = mentions.iter().map(|user| user.to_string()).collect();
        assert_eq!(
            place(text, &mentions, |user| format!("[{user}]")),
            expected,
            "{text:?} {mentions:?}"
        );
    }

    #[test]
    fn mentions_go_where_the_text_names_them_or_in_front() {
        check("plain", &[], "plain");
        check("hi", &["42"], "[42] hi");
        check("thanks @42!", &["42"], "thanks [42]!");
        check("@42 and @42", &["42"], "[42] and [42]");
        check("@421 is not @42", &["42"], "@421 is not [42]");
        check("@421 only", &["42"], "[42] @421 only");
        check("@U1_x is longer", &["U1"], "[U1] @U1_x is longer");
        check("hi", &["7", "42"], "[7] [42] hi");
        check("你好 @7。", &["7"], "你好 [7]。");
    }

    #[test]
    fn texts_are_cut_into_pieces_at_their_mentions() {
        let mentions = vec!["ou_a".to_string(), "ou_ab".to_string()];
        assert_eq!(
            pieces("hi @ou_ab and @ou_a, @ou_ax", &mentions),
            [
                Piece::Text("hi "),
                Piece::Mention("ou_ab"),
                Piece::Text(" and "),
                Piece::Mention("ou_a"),
                Piece::Text(", @ou_ax"),
            ]
        );
        assert_eq!(pieces("@ou_a", &mentions), [Piece::Mention("ou_a")]);
        assert_eq!(pieces("", &mentions), []);
    }

    #[test]
    fn a_text_names_a_user_only_by_the_whole_id() {
        assert!(names("hi @42!", "42"));
        assert!(!names("hi @421", "42"));
        assert!(!names("hi 42", "42"));
    }

    #[test]
    fn angle_brackets_and_ampersands_are_escaped() {
        assert_eq!(escape("a < b && c > d"), "a &lt; b &amp;&amp; c &gt; d");
        assert_eq!(escape("&lt;"), "&amp;lt;");
    }
}
