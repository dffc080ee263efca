//! The web chat as a person uses it, in headless Chromium against the real
//! pipeline: type a message, see the bot's reply, reload, see both again.

use botline_shared::testing::RedisServer;
use botline_tests::browser::Browser;
use botline_tests::Pipeline;
use std::time::Duration;

const TURNS: &str = "JSON.stringify([...document.querySelectorAll('#messages .turn')].map(t => [t.classList.contains('bot') ? 'bot' : 'user', t.querySelector('.text').textContent]))";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_see_the_reply_reload_see_both() {
    let redis = RedisServer::start();
    let pipeline = Pipeline::start(&redis, "[runner]\nblock_ms = 200\n");
    pipeline.wait_ready(Duration::from_secs(60)).await;
    let browser = Browser::launch().await;
    let mut page = browser.open(&format!("{}/", pipeline.base_url())).await;

    page.wait_until(
        "document.querySelector('#status').textContent === 'connected'",
        Duration::from_secs(20),
    )
    .await;
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
