//! Keywords found in one pass (Aho-Corasick), case-insensitively; a keyword
//! made of ASCII letters and digits matches only as a whole word (`hi` is
//! not found in `this`), any other keyword (Chinese, say) anywhere. The
//! sensitive-word audit is built on it: classify marks inbound messages,
//! respond checks what an LLM wrote before it is sent.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};

/// A set of keywords, each tagged with a value, found in one pass.
pub struct KeywordSet<T> {
    matcher: AhoCorasick,
    tags: Vec<T>,
    whole_word: Vec<bool>,
}

impl<T: Clone> KeywordSet<T> {
    pub fn new(keywords: impl IntoIterator<Item = (String, T)>) -> Result<Self, String> {
        let (words, tags): (Vec<String>, Vec<T>) = keywords
            .into_iter()
            .filter(|(word, _)| !word.trim().is_empty())
            .map(|(word, tag)| (word.trim().to_lowercase(), tag))
            .unzip();
        let whole_word = words
            .iter()
            .map(|word| {
                word.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == ' ' || c == '\'')
            })
            .collect();
        let matcher = AhoCorasickBuilder::new()
            .ascii_case_insensitive(true)
            .match_kind(MatchKind::LeftmostLongest)
            .build(&words)
            .map_err(|error| error.to_string())?;
        Ok(KeywordSet {
            matcher,
            tags,
            whole_word,
        })
    }

    /// The tag and matched keyword of every hit in `text`, left to right.
    pub fn find<'t>(&self, text: &'t str) -> Vec<(T, &'t str)> {
        let bytes = text.as_bytes();
        let is_word = |at: Option<&u8>| at.is_some_and(|b| b.is_ascii_alphanumeric());
        self.matcher
            .find_iter(text)
            .filter(|hit| {
                let pattern = hit.pattern().as_usize();
                !self.whole_word[pattern]
                    || (!is_word(hit.start().checked_sub(1).and_then(|i| bytes.get(i)))
                        && !is_word(bytes.get(hit.end())))
            })
            .map(|hit| {
                (
                    self.tags[hit.pattern().as_usize()].clone(),
                    &text[hit.range()],
                )
            })
            .collect()
    }
}

/// The sensitive words found in a text, lower-cased, each once.
pub struct Audit {
    words: KeywordSet<()>,
}

impl Audit {
    pub fn new(words: &[String]) -> Result<Self, String> {
        Ok(Audit {
            words: KeywordSet::new(words.iter().map(|w| (w.clone(), ())))?,
        })
    }

    pub fn hits(&self, text: &str) -> Vec<String> {
        let mut found: Vec<String> = self
            .words
            .find(text)
            .into_iter()
            .map(|(_, w)| w.to_lowercase())
            .collect();
        found.sort();
        found.dedup();
        found
    }

    /// `text` with every sensitive word replaced by as many `*` as it has characters.
    pub fn mask(&self, text: &str) -> String {
        let mut masked = String::with_capacity(text.len());
        let mut rest = 0;
        for (_, word) in self.words.find(text) {
            let start = word.as_ptr() as usize - text.as_ptr() as usize;
            masked.push_str(&text[rest..start]);
            masked.extend(std::iter::repeat_n('*', word.chars().count()));
            rest = start + word.len();
        }
        masked.push_str(&text[rest..]);
        masked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn audit_reports_each_word_once() {
        let audit = Audit::new(&strings(&["badword", "敏感"])).unwrap();
        assert_eq!(audit.hits("BadWord 敏感 badword"), vec!["badword", "敏感"]);
        assert!(audit.hits("badwords").is_empty());
        assert!(audit.hits("fine").is_empty());
    }

    #[test]
    fn masking_keeps_everything_else() {
        let audit = Audit::new(&strings(&["badword", "敏感"])).unwrap();
        let check = |text: &str, expected: &str| assert_eq!(audit.mask(text), expected, "{text:?}");
        check("a BadWord here", "a ******* here");
        check("有敏感词", "有**词");
        check("badwords stay", "badwords stay");
        check("", "");
        check("badword敏感", "*********");
    }
}
