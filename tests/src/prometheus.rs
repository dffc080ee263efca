//! A throwaway Prometheus (Debian's `prometheus` package; `scripts/install
//! prometheus`): its own port, folder and storage, scraping the given
//! targets every second and evaluating the given rule file every second,
//! stopped (and its folder removed) on drop, its log printed if the test
//! failed. Also where `compose/` is, and a way to run `promtool`.

use botline_shared::testing::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The repository's `compose/` folder.
pub fn compose_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose")
}

/// Run a tool from Debian's packages; a missing tool names the install step.
pub fn run_tool(program: &str, args: &[&str], current_dir: &Path) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(current_dir)
        .output()
        .unwrap_or_else(|error| {
            panic!("running {program}: {error} (scripts/test installs it: scripts/install prometheus compose)")
        })
}

/// `alerts.yml` with every `for:` duration replaced by `for_duration`, so a
/// test sees an alert fire in seconds; expressions and thresholds as written.
/// Returns the text and how many `for:` lines it replaced.
pub fn rules_with_for(rules: &str, for_duration: &str) -> (String, usize) {
    let mut replaced = 0;
    let lines: Vec<String> = rules
        .lines()
        .map(|line| {
            let trimmed = line.trim_start();
            if trimmed.starts_with("for:") {
                replaced += 1;
                let indent = &line[..line.len() - trimmed.len()];
                format!("{indent}for: {for_duration}")
            } else {
                line.to_string()
            }
        })
        .collect();
    (lines.join("\n") + "\n", replaced)
}

/// One alert as `/api/v1/alerts` reports it.
#[derive(Debug, Clone)]
pub struct Alert {
    pub labels: serde_json::Map<String, serde_json::Value>,
    /// `pending` or `firing`.
    pub state: String,
}

impl Alert {
    pub fn label(&self, name: &str) -> &str {
        self.labels
            .get(name)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
    }

    /// Is this `alertname` in `firing` state with every `(label, value)` given?
    pub fn is_firing(&self, alertname: &str, labels: &[(&str, &str)]) -> bool {
        self.state == "firing"
            && self.label("alertname") == alertname
            && labels.iter().all(|(k, v)| self.label(k) == *v)
    }
}

pub struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
    http: reqwest::Client,
}

impl Prometheus {
    /// Start with one job per `(job, "host:port")` target, scraped every
    /// second, and `rules` (the text of a rule file) evaluated every second.
    pub fn start(targets: &[(&str, String)], rules: &str) -> Self {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("botline-prometheus-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("prometheus folder");
        std::fs::write(dir.join("alerts.yml"), rules).expect("rules");
        let jobs: String = targets
            .iter()
            .map(|(job, target)| {
                format!("  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n")
            })
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - alerts.yml\nscrape_configs:\n{jobs}"
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("config");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|error| {
                panic!("starting prometheus: {error} (scripts/install prometheus installs it)")
            });
        Prometheus {
            child,
            port,
            dir,
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    async fn get_json(&self, path: &str, query: &[(&str, &str)]) -> Option<serde_json::Value> {
        let response = self
            .http
            .get(format!("{}{path}", self.url()))
            .query(query)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        response.json().await.ok()
    }

    /// Wait until Prometheus answers `/-/ready` and has loaded `rules` rules.
    pub async fn wait_ready(&mut self, rules: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                panic!("prometheus exited with {status}:\n{}", self.log());
            }
            let loaded = self
                .get_json("/api/v1/rules", &[])
                .await
                .map(|body| {
                    body["data"]["groups"]
                        .as_array()
                        .map(|groups| {
                            groups
                                .iter()
                                .map(|g| g["rules"].as_array().map_or(0, Vec::len))
                                .sum::<usize>()
                        })
                        .unwrap_or(0)
                })
                .unwrap_or(0);
            if loaded == rules {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready with {rules} rules within {within:?} ({loaded} loaded); log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every alert Prometheus holds now (pending or firing), from its own API.
    pub async fn alerts(&self) -> Vec<Alert> {
        let Some(body) = self.get_json("/api/v1/alerts", &[]).await else {
            return Vec::new();
        };
        body["data"]["alerts"]
            .as_array()
            .map(|alerts| {
                alerts
                    .iter()
                    .map(|alert| Alert {
                        labels: alert["labels"].as_object().cloned().unwrap_or_default(),
                        state: alert["state"].as_str().unwrap_or_default().to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Wait until `done(alerts)` holds; the alerts seen last are in the panic.
    pub async fn wait_alerts(
        &self,
        what: &str,
        within: Duration,
        mut done: impl FnMut(&[Alert]) -> bool,
    ) {
        let deadline = Instant::now() + within;
        loop {
            let alerts = self.alerts().await;
            if done(&alerts) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {within:?} waiting for {what}; alerts now: {alerts:#?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// An instant query: `Ok(result)` or `Err(Prometheus' error)`.
    pub async fn query(&self, expr: &str) -> Result<serde_json::Value, String> {
        let body = self
            .get_json("/api/v1/query", &[("query", expr)])
            .await
            .ok_or_else(|| "no answer".to_string())?;
        if body["status"] == "success" {
            Ok(body["data"]["result"].clone())
        } else {
            Err(format!("{}: {}", body["errorType"], body["error"]))
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- prometheus ---\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
