//! Pure rules, no I/O: keyword and regex matching for priority and keyword
//! intents; the keyword matcher and the sensitive-word audit live in
//! `botline_shared::keywords` (respond audits LLM output with the same).

pub use botline_shared::keywords::{Audit, KeywordSet};
use botline_shared::message::{FaqMatch, Intent};
use regex::Regex;

/// The intent name for messages no rule recognises.
pub const UNKNOWN_INTENT: &str = "unknown";

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
/// embeddings (`crate::cascade::Cascade`). Called off the async
/// threads, a batch at a time.
pub trait IntentModel: Send + Sync + 'static {
    /// Intent and FAQ match of each text, in order; what the stage calls.
    /// An error (inference failed) leaves the batch to be read again.
    fn understand(&self, texts: &[&str]) -> Result<Vec<Understanding>, String>;

    /// [`IntentModel::understand`] for a read that came back full, so
    /// more is waiting: a model may do less costly work then (the
    /// cascade's `cascade_backlog_share`).
    fn understand_behind(&self, texts: &[&str]) -> Result<Vec<Understanding>, String> {
        self.understand(texts)
    }

    /// The intent of each text; on an error, `unknown` with no confidence.
    fn classify(&self, texts: &[&str]) -> Vec<Intent> {
        match self.understand(texts) {
            Ok(understood) => understood.into_iter().map(|u| u.intent).collect(),
            Err(_) => vec![
                Intent {
                    name: UNKNOWN_INTENT.into(),
                    confidence: 0.0,
                };
                texts.len()
            ],
        }
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
    fn understand(&self, texts: &[&str]) -> Result<Vec<Understanding>, String> {
        Ok(texts
            .iter()
            .map(|text| Understanding {
                intent: self.one(text),
                faq: None,
            })
            .collect())
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
    fn bad_patterns_are_named() {
        let error = UrgentRules::new(&[], &strings(&["ok", "(unclosed"]))
            .err()
            .unwrap();
        assert_eq!(error.0, "classify.urgent_patterns[1]");
    }
}
