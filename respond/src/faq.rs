//! Answers with the FAQ entry classify matched to the message, when its
//! score clears `[respond] faq_min_score`. An entry of `[[classify.faq]]`
//! may name a picture sent with its answer, `image = "https://…"`: classify
//! matches the question, respond (reading the same table) finds the entry's
//! image by its question. Anything but an http(s) URL there stops respond
//! at start, naming the entry.

use crate::backend::{self, BackendError, Draft, ReplyBackend, ReplyRequest};
use botline_shared::Error;
use futures_util::future::BoxFuture;
use serde::Deserialize;
use std::collections::HashMap;

/// The part of a `[[classify.faq]]` entry respond reads (classify reads
/// the rest).
#[derive(Debug, Clone, Deserialize)]
pub struct FaqImage {
    pub question: String,
    #[serde(default)]
    pub image: Option<String>,
}

pub struct FaqBackend {
    min_score: f32,
    /// Question → the picture sent with its answer.
    images: HashMap<String, String>,
}

impl FaqBackend {
    /// Checks every entry's image, so a bad one stops respond at start.
    pub fn new(min_score: f32, entries: &[FaqImage]) -> Result<Self, Error> {
        let mut images = HashMap::new();
        for (index, entry) in entries.iter().enumerate() {
            if let Some(image) = &entry.image {
                let url = backend::image_url(&format!("classify.faq[{index}].image"), image)?;
                images.entry(entry.question.clone()).or_insert(url);
            }
        }
        Ok(FaqBackend { min_score, images })
    }
}

impl ReplyBackend for FaqBackend {
    fn name(&self) -> &'static str {
        "faq"
    }

    fn wants_context(&self) -> bool {
        false
    }

    fn reply<'a>(
        &'a self,
        request: &'a ReplyRequest<'a>,
    ) -> BoxFuture<'a, Result<Option<Draft>, BackendError>> {
        let answer = request
            .message
            .faq
            .as_ref()
            .filter(|faq| faq.score >= self.min_score)
            .map(|faq| {
                let image = self.images.get(&faq.question).map(String::as_str);
                Draft::with_image(faq.answer.clone(), image)
            });
        Box::pin(async move { Ok(answer) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use botline_shared::message::{Attachment, ClassifiedMessage, FaqMatch, Intent, Priority};

    fn entry(question: &str, image: Option<&str>) -> FaqImage {
        FaqImage {
            question: question.into(),
            image: image.map(str::to_string),
        }
    }

    async fn answer(backend: &FaqBackend, matched: Option<(&str, f32)>) -> Option<Draft> {
        let classified = ClassifiedMessage {
            message: botline_shared::testing::sample_message(1, "where is the store?"),
            priority: Priority::Normal,
            intent: Intent {
                name: "unknown".into(),
                confidence: 0.0,
            },
            audit: vec![],
            faq: matched.map(|(question, score)| FaqMatch {
                question: question.into(),
                answer: format!("answer to {question}"),
                score,
            }),
        };
        let request = ReplyRequest {
            message: &classified,
            context: &[],
            bot_name: "botline",
        };
        backend.reply(&request).await.unwrap()
    }

    #[tokio::test]
    async fn an_entry_with_an_image_sends_it_with_its_answer() {
        let backend = FaqBackend::new(
            0.5,
            &[
                entry("Where is the store?", Some("https://x.test/map.png")),
                entry("When are you open?", None),
            ],
        )
        .unwrap();
        let with = answer(&backend, Some(("Where is the store?", 0.9)))
            .await
            .unwrap();
        assert_eq!(with.text, "answer to Where is the store?");
        assert_eq!(
            with.attachments,
            [Attachment::image("https://x.test/map.png", None)]
        );
        let without = answer(&backend, Some(("When are you open?", 0.9)))
            .await
            .unwrap();
        assert_eq!(
            without,
            Draft::from("answer to When are you open?".to_string())
        );
        assert_eq!(
            answer(&backend, Some(("Where is the store?", 0.4))).await,
            None
        );
        assert_eq!(answer(&backend, None).await, None);
    }

    #[test]
    fn a_bad_image_stops_respond_naming_the_entry() {
        let error = FaqBackend::new(
            0.0,
            &[
                entry("a", Some("https://x.test/a.png")),
                entry("b", None),
                entry("c", Some("images/c.png")),
            ],
        )
        .err()
        .unwrap();
        assert_eq!(
            error.to_string(),
            "setting classify.faq[2].image: \"images/c.png\" is not an http(s) URL"
        );
    }
}
