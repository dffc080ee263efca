//! The web chat as a person uses it, in headless Chromium against the real
//! pipeline: type a message, see the bot's reply, reload, see both again;
//! a reply whose template names a picture shows it as an image.

use botline_shared::testing::RedisServer;
use botline_tests::browser::{Browser, Page};
use botline_tests::Pipeline;
use std::time::Duration;

/// The pipeline with `overlay`, and the web chat open and connected in
/// Chromium. Dropping it stops all.
struct Chat {
    page: Page,
    _browser: Browser,
    _pipeline: Pipeline,
    _redis: RedisServer,
}

impl Chat {
    async fn open(overlay: &str) -> Chat {
        let redis = RedisServer::start();
        let pipeline = Pipeline::start(&redis, overlay);
        pipeline.wait_ready(Duration::from_secs(60)).await;
        let browser = Browser::launch().await;
        let mut page = browser.open(&format!("{}/", pipeline.base_url())).await;
        page.wait_until(
            "document.querySelector('#status').textContent === 'connected'",
            Duration::from_secs(20),
        )
        .await;
        Chat {
            page,
            _browser: browser,
            _pipeline: pipeline,
            _redis: redis,
        }
    }
}

const TURNS: &str = "JSON.stringify([...document.querySelectorAll('#messages .turn')].map(t => [t.classList.contains('bot') ? 'bot' : 'user', t.querySelector('.text').textContent]))";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_see_the_reply_reload_see_both() {
    let chat = Chat::open("[runner]\nblock_ms = 200\n").await;
    let mut page = chat.page;
    page.eval("document.querySelector('#text').value = '你好, I am Ada'; document.querySelector('#send').click(); true").await;
    page.wait_until(
        "document.querySelectorAll('#messages .turn.bot').length === 1",
        Duration::from_secs(30),
    )
    .await;
    let before = page.eval(TURNS).await;
    let turns: Vec<(String, String)> = serde_json::from_str(before.as_str().unwrap()).unwrap();
    assert_eq!(turns[0], ("user".to_string(), "你好, I am Ada".to_string()));
    assert_eq!(turns[1].0, "bot");
    assert!(
        turns[1].1.starts_with("你好"),
        "a greeting in Chinese: {:?}",
        turns[1].1
    );

    page.reload().await;
    page.wait_until(
        "document.querySelectorAll('#messages .turn').length === 2",
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        page.eval(TURNS).await,
        before,
        "the conversation so far, after a reload"
    );

    if let Ok(path) = std::env::var("BOTLINE_SCREENSHOT") {
        page.screenshot(std::path::Path::new(&path)).await;
    }
}

/// A 1×1 PNG (a red pixel), served by a local web server for the page to load.
const PIXEL: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x02, 0x00, 0x00, 0x00, 0x90, 0x77, 0x53,
    0xde, 0x00, 0x00, 0x00, 0x0c, 0x49, 0x44, 0x41, 0x54, 0x08, 0xd7, 0x63, 0xf8, 0xcf, 0xc0, 0x00,
    0x00, 0x03, 0x01, 0x01, 0x00, 0x18, 0xdd, 0x8d, 0xb0, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e,
    0x44, 0xae, 0x42, 0x60, 0x82,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_with_a_picture_shows_it_under_the_text() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let picture = format!("http://{}/pixel.png", listener.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/pixel.png",
        axum::routing::get(|| async { ([("content-type", "image/png")], PIXEL) }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let chat = Chat::open(&format!(
        "[runner]\nblock_ms = 200\n[respond.templates.greeting]\nen = \"Hi <b>{{sender_name}}</b>\"\n\
         zh = \"你好\"\nimage = \"{picture}\"\n"
    ))
    .await;
    let mut page = chat.page;
    page.eval("document.querySelector('#name').value = 'Ada'; document.querySelector('#name').dispatchEvent(new Event('change')); document.querySelector('#text').value = 'hello'; document.querySelector('#send').click(); true").await;
    // The picture is an <img> under the text, and the browser loaded it.
    page.wait_until(
        "[...document.querySelectorAll('#messages .turn.bot img.picture')].some(img => img.complete && img.naturalWidth === 1)",
        Duration::from_secs(30),
    )
    .await;
    let shown = page
        .eval("JSON.stringify([...document.querySelectorAll('#messages .turn.bot')].map(t => [t.querySelector('.text').textContent, t.querySelectorAll('b').length, [...t.querySelectorAll('img')].map(i => i.src)]))")
        .await;
    let shown: Vec<(String, usize, Vec<String>)> =
        serde_json::from_str(shown.as_str().unwrap()).unwrap();
    assert_eq!(
        shown,
        [("Hi <b>Ada</b>".to_string(), 0, vec![picture])],
        "the text as text (no markup made of it), the picture as an image"
    );
}
