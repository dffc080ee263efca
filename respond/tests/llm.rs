//! The LLM backend against a local server speaking the Chat Completions wire
//! format, through the real respond stage and a real redis-server.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use botline_shared::codec;
use botline_shared::message::{
    Attachment, ChatKind, ClassifiedMessage, FaqMatch, Intent, Priority, Reply, Role, Turn,
};
use botline_shared::streams::Streams;
use botline_shared::testing::{add_entry, read_stream, sample_message, wait_for, RedisServer};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How the stand-in answers the next request.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Answer,
    Slow,
    TooMany,
    ServerError,
    Malformed,
}

#[derive(Default)]
struct Recorded {
    requests: Vec<(Value, String)>,
    mode: Option<Mode>,
}

type Shared = Arc<Mutex<Recorded>>;

async fn completions(
    State(state): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> impl IntoResponse {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let mode = {
        let mut recorded = state.lock().unwrap();
        recorded.requests.push((body.clone(), auth));
        recorded.mode.unwrap_or(Mode::Answer)
    };
    let last = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .map(|m| m["content"].as_str().unwrap_or_default().to_string());
    match mode {
        Mode::Answer => (StatusCode::OK, json!({"choices": [{"message": {"role": "assistant", "content": format!("LLM says: {}", last.unwrap_or_default())}}]}).to_string()),
        Mode::Slow => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            (StatusCode::OK, json!({"choices": [{"message": {"content": "too late"}}]}).to_string())
        }
        Mode::TooMany => (StatusCode::TOO_MANY_REQUESTS, "{\"error\": \"slow down\"}".to_string()),
        Mode::ServerError => (StatusCode::INTERNAL_SERVER_ERROR, "{\"error\": \"boom\"}".to_string()),
        Mode::Malformed => (StatusCode::OK, "{\"choices\": [".to_string()),
    }
}

struct Setup {
    redis: RedisServer,
    state: Shared,
    streams: Streams,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), botline_shared::Error>>,
    next: usize,
}

impl Setup {
    /// `respond_overlay` goes in `[respond]`, `llm_overlay` in `[respond.llm]`.
    async fn start(respond_overlay: &str, llm_overlay: &str) -> Setup {
        let state: Shared = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let app = Router::new()
            .route("/v1/chat/completions", post(completions))
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let redis = RedisServer::start();
        let overlay = format!(
            "[runner]\nblock_ms = 100\n[respond]\nbackends = [\"faq\", \"llm\"]\nfaq_min_score = 0.99\n{respond_overlay}[respond.routes]\ngreeting = [\"templates\"]\n[respond.llm]\nbase_url = \"{url}\"\nmodel = \"test-model\"\ntimeout_ms = 1000\nbudget_ms = 2000\nbackoff_base_ms = 10\n{llm_overlay}"
        );
        let (settings, plumbing) = redis.plumbing(&overlay);
        let streams = plumbing.streams.clone();
        let shutdown = CancellationToken::new();
        static ENV: [(&str, &str); 1] = [("BOTLINE_LLM_API_KEY", "sk-test-secret-key")];
        let task = tokio::spawn(respond::run_with_env(
            settings,
            &ENV,
            plumbing,
            shutdown.clone(),
        ));
        Setup {
            redis,
            state,
            streams,
            shutdown,
            task,
            next: 0,
        }
    }

    fn mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = Some(mode);
    }

    fn requests(&self) -> Vec<(Value, String)> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Send one message and wait for its reply's text.
    async fn ask(
        &mut self,
        chat: &str,
        text: &str,
        adjust: impl FnOnce(&mut ClassifiedMessage),
    ) -> String {
        self.ask_reply(chat, text, adjust).await.text
    }

    /// Send one message and wait for its reply.
    async fn ask_reply(
        &mut self,
        chat: &str,
        text: &str,
        adjust: impl FnOnce(&mut ClassifiedMessage),
    ) -> Reply {
        self.next += 1;
        let mut message = sample_message(self.next, text);
        message.id = format!("m{:03}", self.next);
        message.chat.id = chat.into();
        message.sender.id = "u1".into();
        let mut classified = ClassifiedMessage {
            message,
            priority: Priority::Normal,
            intent: Intent {
                name: "unknown".into(),
                confidence: 0.0,
            },
            audit: vec![],
            faq: None,
        };
        adjust(&mut classified);
        let mut connection = self.redis.connection();
        let p = self
            .streams
            .partition_of(&classified.message.platform, &classified.message.chat.id);
        add_entry(
            &mut connection,
            &self.streams.queue(p),
            &codec::encode(&classified),
        );
        let out = self.streams.outbound(p, "web");
        let id = classified.message.id.clone();
        let mut found = None;
        wait_for("the reply", Duration::from_secs(20), || {
            found = read_stream::<Reply>(&mut connection, &out)
                .into_iter()
                .find(|r| r.in_reply_to == id);
            found.is_some()
        })
        .await;
        found.unwrap()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn roles_and_contents(body: &Value) -> Vec<(String, String)> {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_string(),
                m["content"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_carries_prompt_context_in_order_and_faq_grounding() {
    let mut setup = Setup::start("", "context_budget_chars = 60\n").await;
    assert_eq!(
        setup.ask("a", "first question", |_| {}).await,
        "LLM says: first question"
    );
    assert_eq!(
        setup.ask("a", "second question", |_| {}).await,
        "LLM says: second question"
    );
    let third = setup
        .ask("a", "how do refunds work?", |c| {
            c.faq = Some(FaqMatch {
                question: "How do I get a refund?".into(),
                answer: "Within 30 days.".into(),
                score: 0.8,
            })
        })
        .await;
    assert_eq!(third, "LLM says: how do refunds work?");

    let requests = setup.requests();
    assert_eq!(requests.len(), 3);
    assert!(requests
        .iter()
        .all(|(_, auth)| auth == "Bearer sk-test-secret-key"));
    assert_eq!(requests[0].0["model"], "test-model");
    let first = roles_and_contents(&requests[0].0);
    assert_eq!(first[0].0, "system");
    assert!(first[0].1.starts_with("You are botline"), "{}", first[0].1);
    assert_eq!(first[1], ("user".into(), "first question".into()));
    // The third: system, FAQ grounding, the context oldest first (trimmed to
    // 60 characters: 25 + 15 fit, the 24 of the first answer would not), then the message.
    let third = roles_and_contents(&requests[2].0);
    assert_eq!(third[1].0, "system");
    assert!(third[1].1.contains("Within 30 days."), "{}", third[1].1);
    let context: Vec<(String, String)> = third[2..third.len() - 1].to_vec();
    assert_eq!(
        context,
        vec![
            ("user".to_string(), "second question".to_string()),
            (
                "assistant".to_string(),
                "LLM says: second question".to_string()
            ),
        ]
    );
    assert_eq!(
        third.last().unwrap(),
        &("user".to_string(), "how do refunds work?".to_string())
    );
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_turns_name_their_speaker_and_routes_pick_backends() {
    let mut setup = Setup::start("", "").await;
    let group = |c: &mut ClassifiedMessage| {
        c.message.chat.kind = ChatKind::Group;
        c.message.mentions.bot = true;
        c.message.sender.name = "Ann".into();
    };
    setup.ask("g", "hi all", group).await;
    setup.ask("g", "what now?", group).await;
    let last = roles_and_contents(&setup.requests().last().unwrap().0);
    assert_eq!(last[1], ("user".into(), "Ann: hi all".into()));
    assert_eq!(
        last.last().unwrap(),
        &("user".to_string(), "Ann: what now?".to_string())
    );
    // greeting is routed to templates only: the LLM is not asked.
    let before = setup.requests().len();
    let greeting = setup
        .ask("d", "hello", |c| c.intent.name = "greeting".into())
        .await;
    assert!(greeting.starts_with("Hello Ada"), "{greeting}");
    assert_eq!(setup.requests().len(), before);
    // A confident FAQ match answers before the LLM.
    let faq = setup
        .ask("d", "refund?", |c| {
            c.faq = Some(FaqMatch {
                question: "q".into(),
                answer: "Within 30 days.".into(),
                score: 0.995,
            })
        })
        .await;
    assert_eq!(faq, "Within 30 days.");
    assert_eq!(setup.requests().len(), before);
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_gets_the_fallback_then_the_breaker_then_recovery() {
    let mut setup = Setup::start("", "breaker_failures = 3\nbreaker_open_ms = 1500\n").await;
    for mode in [
        Mode::Slow,
        Mode::TooMany,
        Mode::ServerError,
        Mode::Malformed,
    ] {
        setup.mode(mode);
        let reply = setup.ask("f", "anything", |_| {}).await;
        assert!(
            reply.starts_with("Sorry Ada"),
            "{mode:?}: the fallback answers: {reply}"
        );
        // After three failed replies the breaker opens: no more calls.
        if mode == Mode::ServerError {
            let calls = setup.requests().len();
            setup.mode(Mode::Malformed);
            let reply = setup.ask("f", "while open", |_| {}).await;
            assert!(reply.starts_with("Sorry Ada"));
            assert_eq!(
                setup.requests().len(),
                calls,
                "an open breaker does not call"
            );
            break;
        }
    }
    // Once the breaker's pause is over and the endpoint answers, replies come from it again.
    setup.mode(Mode::Answer);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reply = setup.ask("f", "better now?", |_| {}).await;
        if reply == "LLM says: better now?" {
            break;
        }
        assert!(reply.starts_with("Sorry Ada"), "{reply}");
        assert!(
            std::time::Instant::now() < deadline,
            "the breaker never closed"
        );
    }
    // The key never reaches the context, the replies or a dead letter.
    let mut connection = setup.redis.connection();
    let context: Vec<Turn> = read_stream(&mut connection, &setup.streams.context("web", "f"));
    assert!(context.iter().all(|t| !t.text.contains("sk-test")));
    assert!(context.iter().any(|t| t.role == Role::Bot));
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_clears_the_context() {
    let mut setup = Setup::start("", "").await;
    setup.ask("r", "remember this", |_| {}).await;
    let reset = setup.ask("r", " /RESET ", |_| {}).await;
    assert!(reset.starts_with("Done, Ada"), "{reset}");
    setup.ask("r", "fresh start", |_| {}).await;
    let last = roles_and_contents(&setup.requests().last().unwrap().0);
    assert_eq!(
        last.len(),
        2,
        "system prompt and the message only: {last:?}"
    );
    let reset_zh = setup.ask("r", "重置", |_| {}).await;
    assert!(reset_zh.starts_with("好的"), "{reset_zh}");
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensitive_words_in_llm_output_follow_the_policy() {
    // The stand-in echoes the message, so the message decides what the LLM "says".
    let mut masked = Setup::start("", "").await;
    let reply = masked.ask("m", "you shit 傻逼", |_| {}).await;
    assert_eq!(reply, "LLM says: you **** **");
    masked.stop().await;

    let mut replaced = Setup::start(
        "output_audit = \"replace\"\noutput_replacement = \"No.\"\n",
        "",
    )
    .await;
    assert_eq!(replaced.ask("m", "you shit", |_| {}).await, "No.");
    assert_eq!(
        replaced.ask("m", "all fine", |_| {}).await,
        "LLM says: all fine"
    );
    replaced.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pictures_leave_llm_text_for_attachments_and_faq_entries_bring_theirs() {
    let faq = "[[classify.faq]]\nquestion = \"Where are you?\"\nanswer = \"Main street 1.\"\n\
               image = \"https://x.test/map.png\"\n";
    let mut setup = Setup::start(faq, "").await;
    // The stand-in echoes the message: the LLM "answers" with Markdown images.
    let reply = setup
        .ask_reply(
            "p",
            "our shop ![the shop](https://x.test/shop.jpg) and ![](javascript:alert(1))",
            |_| {},
        )
        .await;
    assert_eq!(
        reply.text,
        "LLM says: our shop and ![](javascript:alert(1))"
    );
    assert_eq!(
        reply.attachments,
        [Attachment::image(
            "https://x.test/shop.jpg",
            Some("the shop".into())
        )]
    );
    // The bot's turn in the context keeps the picture too.
    let mut connection = setup.redis.connection();
    let context: Vec<Turn> = read_stream(&mut connection, &setup.streams.context("web", "p"));
    assert_eq!(context.last().unwrap().attachments, reply.attachments);
    let answered = setup
        .ask_reply("p", "where is it?", |c| {
            c.faq = Some(FaqMatch {
                question: "Where are you?".into(),
                answer: "Main street 1.".into(),
                score: 0.995,
            })
        })
        .await;
    assert_eq!(answered.text, "Main street 1.");
    assert_eq!(
        answered.attachments,
        [Attachment::image("https://x.test/map.png", None)]
    );
    setup.stop().await;
}
