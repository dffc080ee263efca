//! Pure rules, no I/O: keyword and regex matching for priority, keyword
//! intents, and the sensitive-word audit. Keywords match case-insensitively;
//! a keyword made of ASCII letters and digits matches only as a whole word
//! (`hi` is not found in `this`), any other keyword (Chinese, say) anywhere.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use botline_shared::message::{FaqMatch, Intent};
use regex::Regex;

/// The intent name for messages no rule recognises.
pub const UNKNOWN_INTENT: &str = "unknown";

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

/// Urgent when a keyword or a regex matches.
pub struct UrgentRules {
    keywords: KeywordSet<()>,
    patterns: Vec<Regex>,
}

impl UrgentRules {
    pub fn new(keywords: &[String], patterns: &[String]) -> Result<Self, (String, String)> {
        let keywords = KeywordSet::new(keywords.iter().map(|k| (k.clone(), ())))
            .map_err(|error| ("classify.urgent_keywords".to_string(), error))?;
        let patterns = patterns
            .iter()
            .enumerate()
            .map(|(i, pattern)| {
                Regex::new(pattern)
                    .map_err(|error| (format!("classify.urgent_patterns[{i}]"), error.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(UrgentRules { keywords, patterns })
    }

    pub fn is_urgent(&self, text: &str) -> bool {
        !self.keywords.find(text).is_empty() || self.patterns.iter().any(|p| p.is_match(text))
    }
}

/// What a model made of one message: its intent, and the FAQ entry that
/// answers it when the model matches FAQ entries and one is close enough.
#[derive(Debug, Clone, PartialEq)]
pub struct Understanding {
    pub intent: Intent,
    pub faq: Option<FaqMatch>,
}

/// Tells a message's intent: keyword rules ([`KeywordIntents`]) or sentence
/// embeddings (`crate::embedding::EmbeddingIntents`). Called off the async
/// threads, a batch at a time.
pub trait IntentModel: Send + Sync + 'static {
    fn classify(&self, texts: &[&str]) -> Vec<Intent>;

    /// Intent and FAQ match of each text, in order; what the stage calls.
    /// An error (inference failed) leaves the batch to be read again.
    fn understand(&self, texts: &[&str]) -> Result<Vec<Understanding>, String> {
        Ok(self
            .classify(texts)
            .into_iter()
            .map(|intent| Understanding { intent, faq: None })
            .collect())
    }
}

/// The intent with the most keyword hits; the first declared wins a tie.
pub struct KeywordIntents {
    keywords: KeywordSet<usize>,
    names: Vec<String>,
}

impl KeywordIntents {
    pub fn new(intents: &[(String, Vec<String>)]) -> Result<Self, String> {
        let names = intents.iter().map(|(name, _)| name.clone()).collect();
        let keywords = KeywordSet::new(
            intents
                .iter()
                .enumerate()
                .flat_map(|(index, (_, words))| words.iter().map(move |w| (w.clone(), index))),
        )?;
        Ok(KeywordIntents { keywords, names })
    }

    fn one(&self, text: &str) -> Intent {
        let mut hits = vec![0usize; self.names.len()];
        for (index, _) in self.keywords.find(text) {
            hits[index] += 1;
        }
        let best = hits
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .max_by(|(ia, a), (ib, b)| a.cmp(b).then(ib.cmp(ia)));
        match best {
            Some((index, _)) => Intent {
                name: self.names[index].clone(),
                confidence: 1.0,
            },
            None => Intent {
                name: UNKNOWN_INTENT.into(),
                confidence: 0.0,
            },
        }
    }
}

impl IntentModel for KeywordIntents {
    fn classify(&self, texts: &[&str]) -> Vec<Intent> {
        texts.iter().map(|text| self.one(text)).collect()
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
        found.dedup();
        found.sort();
        found.dedup();
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    fn urgent() -> UrgentRules {
        UrgentRules::new(
            &strings(&["紧急", "urgent", "asap", "宕机"]),
            &strings(&[r"(?i)\bp0\b", "!{3,}"]),
        )
        .unwrap()
    }

    #[test]
    fn urgency() {
        let rules = urgent();
        let check =
            |text: &str, expected: bool| assert_eq!(rules.is_urgent(text), expected, "{text:?}");
        check("紧急：服务器宕机了", true);
        check("这个很紧急", true);
        check("URGENT please", true);
        check("need it ASAP.", true);
        check("wasapi driver", false);
        check("P0 incident", true);
        check("help!!!", true);
        check("help!", false);
        check("hello there", false);
        check("", false);
    }

    fn intents() -> KeywordIntents {
        KeywordIntents::new(&[
            ("greeting".into(), strings(&["hello", "hi", "你好"])),
            (
                "refund_request".into(),
                strings(&["refund", "退款", "money back"]),
            ),
            ("thanks".into(), strings(&["thanks", "谢谢"])),
        ])
        .unwrap()
    }

    #[test]
    fn intent_by_keywords() {
        let model = intents();
        let check = |text: &str, expected: &str| {
            assert_eq!(model.classify(&[text])[0].name, expected, "{text:?}")
        };
        check("Hello!", "greeting");
        check("你好，请问", "greeting");
        check("this is it", UNKNOWN_INTENT);
        check("I want a refund, thanks", "refund_request");
        check("hi, I want my money back and a refund", "refund_request");
        check("谢谢", "thanks");
        check("HI", "greeting");
        check("", UNKNOWN_INTENT);
    }

    #[test]
    fn audit_reports_each_word_once() {
        let audit = Audit::new(&strings(&["badword", "敏感"])).unwrap();
        assert_eq!(audit.hits("BadWord 敏感 badword"), vec!["badword", "敏感"]);
        assert!(audit.hits("badwords").is_empty());
        assert!(audit.hits("fine").is_empty());
    }

    #[test]
    fn bad_patterns_are_named() {
        let error = UrgentRules::new(&[], &strings(&["ok", "(unclosed"]))
            .err()
            .unwrap();
        assert_eq!(error.0, "classify.urgent_patterns[1]");
    }
}
