//! Answers with the FAQ entry classify matched to the message, when its
//! score clears `[respond] faq_min_score`.

use crate::backend::{BackendError, ReplyBackend, ReplyRequest};
use futures_util::future::BoxFuture;

pub struct FaqBackend {
    pub min_score: f32,
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
    ) -> BoxFuture<'a, Result<Option<String>, BackendError>> {
        let answer = request
            .message
            .faq
            .as_ref()
            .filter(|faq| faq.score >= self.min_score)
            .map(|faq| faq.answer.clone());
        Box::pin(async move { Ok(answer) })
    }
}
