//! Headless Chromium driven over the DevTools protocol (a WebSocket of JSON
//! commands), enough to type into a page, click, reload and read it back,
//! as a person would. Uses Debian's `chromium` (scripts/test installs it).

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Browser {
    child: Child,
    dir: PathBuf,
    port: u16,
}

pub struct Page {
    socket: Socket,
    next_id: u64,
}

fn chromium() -> String {
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .into_iter()
    .find(|path| std::path::Path::new(path).exists())
    .unwrap_or("chromium")
    .to_string()
}

impl Browser {
    pub async fn launch() -> Browser {
        let port = botline_shared::testing::free_port();
        let dir =
            std::env::temp_dir().join(format!("botline-chromium-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("profile folder");
        let log = std::fs::File::create(dir.join("chromium.log")).expect("log");
        let child = Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-allow-origins=*",
            ])
            .arg(format!("--remote-debugging-port={port}"))
            .arg(format!("--user-data-dir={}", dir.join("profile").display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("chromium starts (scripts/test installs Debian's chromium)");
        let browser = Browser { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while reqwest::get(browser.endpoint("/json/version"))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "chromium did not open its DevTools port; log:\n{}",
                browser.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        browser
    }

    fn endpoint(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("chromium.log")).unwrap_or_default()
    }

    /// A new tab showing `url`, loaded.
    pub async fn open(&self, url: &str) -> Page {
        let target: Value = reqwest::Client::new()
            .put(self.endpoint("/json/new?about:blank"))
            .send()
            .await
            .expect("new tab")
            .json()
            .await
            .expect("tab description");
        let socket_url = target["webSocketDebuggerUrl"]
            .as_str()
            .expect("tab socket")
            .to_string();
        let (socket, _) = tokio_tungstenite::connect_async(socket_url.as_str())
            .await
            .expect("tab socket connects");
        let mut page = Page { socket, next_id: 0 };
        page.call("Page.enable", json!({})).await;
        page.call("Runtime.enable", json!({})).await;
        page.navigate(url).await;
        page
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Page {
    /// Send a DevTools command and wait for its result (events in between are dropped).
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let command = json!({ "id": id, "method": method, "params": params }).to_string();
        self.socket
            .send(Message::text(command))
            .await
            .expect("command sent");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = tokio::time::timeout(left, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("{method}: no answer from chromium"))
                .expect("socket open")
                .expect("frame");
            let Message::Text(text) = frame else { continue };
            let reply: Value = serde_json::from_str(&text).expect("JSON from chromium");
            if reply["id"].as_u64() == Some(id) {
                if let Some(error) = reply.get("error") {
                    panic!("{method} failed: {error}");
                }
                return reply["result"].clone();
            }
        }
    }

    /// Load `url` and wait for its `load` event.
    pub async fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url })).await;
        self.wait_until(
            "document.readyState === 'complete'",
            Duration::from_secs(20),
        )
        .await;
    }

    pub async fn reload(&mut self) {
        self.call("Page.reload", json!({ "ignoreCache": true }))
            .await;
        // The old document may still answer `complete` for a moment: wait for a new one.
        self.wait_until(
            "performance.now() < 10000 && document.readyState === 'complete'",
            Duration::from_secs(20),
        )
        .await;
    }

    /// The value of a JavaScript expression (promises awaited).
    pub async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression} threw: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Wait until a JavaScript expression is true.
    pub async fn wait_until(&mut self, expression: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if self.eval(expression).await == Value::Bool(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {within:?} waiting for `{expression}`"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Save a PNG of the page.
    pub async fn screenshot(&mut self, path: &std::path::Path) {
        use base64::Engine;
        let shot = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("image data"))
            .expect("base64");
        std::fs::write(path, png).expect("screenshot written");
    }
}
