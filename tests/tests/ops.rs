//! What operators run, proven: the compose file (Debian's docker-compose)
//! and its Redis, started by its start script with the botline ACL,
//! the alert rules (promtool's unit tests, then a real Prometheus firing the
//! lag alert while a stage is stopped and resolving it once the stage is
//! back), and that the rules and the Grafana dashboard only use metric names
//! the binaries export.

use botline_shared::streams::Streams;
use botline_shared::testing::{add_entry, wait_for, RedisServer};
use botline_tests::prometheus::{compose_dir, rules_with_for, run_tool, Alert, Prometheus};
use botline_tests::redis_start::ScriptedRedis;
use botline_tests::sink::{Answer, Sink};
use botline_tests::{ApiClient, Pipeline, WEBHOOK_SECRET};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Short timeouts and frequent stream metrics, so alerts move within seconds.
const FAST: &str = "[runner]\nblock_ms = 200\nlease_ttl_ms = 3000\n\
                    [streams]\nmetrics_interval_ms = 250\n";

fn overlay(sink: &Sink) -> String {
    format!("{FAST}[egress.webhook]\nurl = \"{}\"\n", sink.url)
}

fn assert_success(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn read_compose(path: &str) -> String {
    std::fs::read_to_string(compose_dir().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn alert_rules_pass_their_promtool_tests() {
    let dir = compose_dir();
    let checked = run_tool(
        "promtool",
        &["check", "rules", "prometheus/alerts.yml"],
        &dir,
    );
    assert_success("promtool check rules", &checked);
    let tested = run_tool(
        "promtool",
        &["test", "rules", "prometheus/alerts_test.yml"],
        &dir,
    );
    assert_success("promtool test rules", &tested);

    // Every rule has a case that fires and one that stays silent.
    let rules = read_compose("prometheus/alerts.yml");
    let tests = read_compose("prometheus/alerts_test.yml");
    let alertnames: Vec<&str> = rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .collect();
    assert_eq!(alertnames.len(), 9, "rules in alerts.yml: {alertnames:?}");
    for alertname in alertnames {
        let cases: Vec<&str> = tests
            .split("alertname: ")
            .skip(1)
            .filter(|case| case.starts_with(&format!("{alertname}\n")))
            .collect();
        let silent = cases
            .iter()
            .filter(|c| c.contains("exp_alerts: []"))
            .count();
        assert!(
            silent >= 1 && cases.len() > silent,
            "{alertname}: {} firing and {silent} silent cases in alerts_test.yml",
            cases.len() - silent
        );
    }
}

#[test]
fn compose_prometheus_config_is_valid() {
    let dir = compose_dir();
    let checked = run_tool(
        "promtool",
        &["check", "config", "prometheus/prometheus.yml"],
        &dir,
    );
    assert_success("promtool check config", &checked);
    // Every stage's replicas are found through Docker's DNS on the metrics port.
    let config = read_compose("prometheus/prometheus.yml");
    for stage in botline_tests::STAGES {
        assert!(
            config.contains(&format!(
                "- job_name: {stage}\n    dns_sd_configs:\n      - names: [{stage}]\n        type: A\n        port: 9100"
            )),
            "prometheus.yml discovers {stage}"
        );
    }
}

/// The variables of the shell that interpolate the compose file: the tests
/// see its defaults unless they set one.
const COMPOSE_VARIABLES: [&str; 2] = ["BOTLINE_REDIS_PASSWORD", "BOTLINE_REDIS_ADMIN_PASSWORD"];

/// `docker-compose config` (Debian's docker-compose 1.29) as JSON: its YAML
/// read by the python3-yaml that docker-compose itself depends on.
fn compose_config() -> serde_json::Value {
    compose_config_with(&[])
}

/// [`compose_config`] with `variables` set in docker-compose's environment.
fn compose_config_with(variables: &[(&str, &str)]) -> serde_json::Value {
    let dir = compose_dir();
    let docker_compose = |args: &[&str]| {
        let mut command = std::process::Command::new("docker-compose");
        for name in COMPOSE_VARIABLES {
            command.env_remove(name);
        }
        command
            .args(["-f", "docker-compose.yml"])
            .args(args)
            .envs(variables.iter().copied())
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|error| {
                panic!("running docker-compose: {error} (scripts/test installs it: scripts/install compose)")
            })
    };
    assert_success(
        "docker-compose config -q",
        &docker_compose(&["config", "-q"]),
    );
    let config = docker_compose(&["config"]);
    assert_success("docker-compose config", &config);
    let mut python = std::process::Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (docker-compose's own dependency)");
    use std::io::Write;
    python
        .stdin
        .take()
        .unwrap()
        .write_all(&config.stdout)
        .unwrap();
    let json = python.wait_with_output().unwrap();
    assert_success("yaml to json", &json);
    serde_json::from_slice(&json.stdout).expect("compose config as JSON")
}

fn seconds(duration: &str) -> u64 {
    let (number, unit) = duration.split_at(duration.len() - 1);
    let number: u64 = number.parse().unwrap_or_else(|_| panic!("{duration}"));
    match unit {
        "s" => number,
        "m" => number * 60,
        _ => panic!("unexpected duration {duration}"),
    }
}

#[test]
fn compose_file_is_valid_and_every_stage_can_be_scaled() {
    let config = compose_config();
    let services = config["services"].as_object().expect("services");
    for (name, service) in services {
        assert!(
            service.get("container_name").is_none(),
            "{name} has a fixed container name: it could not be scaled"
        );
    }
    let redis_password = services["redis"]["environment"]["BOTLINE_REDIS_PASSWORD"]
        .as_str()
        .expect("redis gets BOTLINE_REDIS_PASSWORD");
    assert!(!redis_password.is_empty(), "a local default password");
    let shutdown_deadline_s = 10; // runner.shutdown_deadline_ms in shared/defaults.toml
    for stage in botline_tests::STAGES {
        let service = &services[stage];
        assert_eq!(service["image"], "botline:latest", "{stage}");
        assert_eq!(
            service["build"]["dockerfile"], "compose/Dockerfile",
            "{stage}"
        );
        assert_eq!(
            service["command"],
            serde_json::json!([format!("botline-{stage}")]),
            "{stage}"
        );
        // As the ACL user `botline`, with the password Redis is given.
        assert_eq!(
            service["environment"]["BOTLINE_REDIS_URL"],
            format!("redis://botline:{redis_password}@redis:6379/"),
            "{stage}"
        );
        let grace = seconds(
            service["stop_grace_period"]
                .as_str()
                .expect("stop_grace_period"),
        );
        assert!(
            grace > shutdown_deadline_s,
            "{stage}: stop_grace_period {grace}s must exceed the shutdown deadline"
        );
        let health = service["healthcheck"]["test"].to_string();
        assert!(health.contains("/readyz"), "{stage} health check: {health}");
        let ports = service["ports"].as_array().cloned().unwrap_or_default();
        if stage == "ingest" {
            // A range of host ports, so replicas do not fight over one.
            assert_eq!(ports.len(), 1, "ingest ports: {ports:?}");
            assert!(
                ports[0].to_string().contains("8080-8089"),
                "ingest publishes a range: {ports:?}"
            );
        } else {
            assert!(
                ports.is_empty(),
                "{stage} publishes {ports:?}: it could not be scaled"
            );
        }
    }
    let redis = services["redis"]["command"].to_string();
    for setting in [
        r#""--appendonly","yes""#,
        r#""--appendfsync","everysec""#,
        r#""--maxmemory-policy","noeviction""#,
    ] {
        assert!(
            redis.contains(setting),
            "redis command {redis} lacks {setting}"
        );
    }
    assert!(
        services["redis"]["volumes"].to_string().contains(":/data"),
        "redis keeps its data in a volume"
    );
    assert!(
        services["redis"].get("ports").is_none(),
        "redis publishes no host port"
    );
    // The health check logs in as the stages do, and fails on a refusal
    // (redis-cli itself exits 0 on NOAUTH):
    // compose_redis_starts_with_the_acl_and_only_the_logins_it_defines runs it.
    let health = &services["redis"]["healthcheck"]["test"];
    assert_eq!(health[0], "CMD-SHELL", "redis health check: {health}");
    let health = health[1].as_str().unwrap();
    for part in ["--user botline", "$$BOTLINE_REDIS_PASSWORD", "PONG"] {
        assert!(
            health.contains(part),
            "redis health check {health} lacks {part}"
        );
    }

    // The passwords come from the shell (or .env) when set there.
    let config = compose_config_with(&[
        ("BOTLINE_REDIS_PASSWORD", "from-the-shell-3f9a"),
        ("BOTLINE_REDIS_ADMIN_PASSWORD", "admin-from-the-shell-77c1"),
    ]);
    let services = config["services"].as_object().expect("services");
    let redis_env = &services["redis"]["environment"];
    assert_eq!(redis_env["BOTLINE_REDIS_PASSWORD"], "from-the-shell-3f9a");
    assert_eq!(
        redis_env["BOTLINE_REDIS_ADMIN_PASSWORD"],
        "admin-from-the-shell-77c1"
    );
    for stage in botline_tests::STAGES {
        assert_eq!(
            services[stage]["environment"]["BOTLINE_REDIS_URL"],
            "redis://botline:from-the-shell-3f9a@redis:6379/",
            "{stage}"
        );
    }
    for mounted in ["prometheus/alerts.yml", "prometheus/prometheus.yml"] {
        assert!(
            services["prometheus"]["volumes"]
                .to_string()
                .contains(mounted),
            "prometheus mounts {mounted}"
        );
    }
    assert!(
        services["grafana"]["volumes"]
            .to_string()
            .contains("grafana/dashboards"),
        "grafana gets the dashboard"
    );
}

/// The compose file's redis service, to run on this machine: the host path
/// of its start script (from the read-only mount its command names), the
/// flags its command gives the script, and its environment.
struct ComposeRedis {
    script: PathBuf,
    flags: Vec<String>,
    password: String,
    admin_password: String,
    health_check: String,
    /// A stage's BOTLINE_REDIS_URL.
    stage_url: String,
}

fn compose_redis() -> ComposeRedis {
    let config = compose_config();
    let redis = &config["services"]["redis"];
    let command: Vec<String> = redis["command"]
        .as_array()
        .expect("redis command")
        .iter()
        .map(|arg| arg.as_str().unwrap().to_string())
        .collect();
    assert_eq!(command[0], "sh", "redis command {command:?}");
    let (mount_target, script_name) = command[1].rsplit_once('/').expect("a script path");
    let mount = redis["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|volume| volume.as_str().unwrap())
        .find(|volume| volume.ends_with(&format!(":{mount_target}:ro")))
        .unwrap_or_else(|| panic!("redis mounts no folder at {mount_target}, read-only"));
    let source = Path::new(mount.split(':').next().unwrap());
    assert_eq!(
        source.canonicalize().unwrap(),
        compose_dir().join("redis").canonicalize().unwrap(),
        "the script comes from compose/redis"
    );
    let text = |value: &serde_json::Value| value.as_str().expect("a string").to_string();
    ComposeRedis {
        script: source.join(script_name),
        flags: command[2..].to_vec(),
        password: text(&redis["environment"]["BOTLINE_REDIS_PASSWORD"]),
        admin_password: text(&redis["environment"]["BOTLINE_REDIS_ADMIN_PASSWORD"]),
        // What the container's shell runs: `$$` is compose's escaped `$`.
        health_check: text(&redis["healthcheck"]["test"][1]).replace("$$", "$"),
        stage_url: text(&config["services"]["classify"]["environment"]["BOTLINE_REDIS_URL"]),
    }
}

/// Whether logging in was refused (a wrong password, or no such user).
fn login_refused(result: &redis::RedisResult<redis::Connection>) -> bool {
    matches!(result, Err(error) if error.kind() == redis::ErrorKind::AuthenticationFailed
        || error.code() == Some("WRONGPASS"))
}

fn refused_code<T: std::fmt::Debug>(what: &str, result: redis::RedisResult<T>) -> String {
    let error = result.expect_err(what);
    error
        .code()
        .unwrap_or_else(|| panic!("{what}: {error}"))
        .to_string()
}

/// compose/redis/start.sh with the compose file's command, environment and
/// health check, on the local redis-server: the default user is off,
/// `botline` (as the stages' URL logs in) may use the pipeline's streams
/// and nothing beyond, `admin` may do anything; the flags reach Redis; the
/// health check passes only with the right password; the rendered ACL holds
/// no password.
#[test]
fn compose_redis_starts_with_the_acl_and_only_the_logins_it_defines() {
    let compose = compose_redis();
    let env = [
        ("BOTLINE_REDIS_PASSWORD", compose.password.as_str()),
        (
            "BOTLINE_REDIS_ADMIN_PASSWORD",
            compose.admin_password.as_str(),
        ),
    ];
    let redis = ScriptedRedis::start(&compose.script, &compose.flags, &env);

    let mut anonymous = redis.connect(None).unwrap();
    let code = refused_code(
        "PING without logging in",
        redis::cmd("PING").query::<String>(&mut anonymous),
    );
    assert_eq!(code, "NOAUTH");
    let wrong = redis.connect(Some(("botline", "not-the-password")));
    assert!(
        login_refused(&wrong),
        "a wrong password: {:?}",
        wrong.map(|_| ())
    );

    // The stages' URL, pointed at this server.
    let url = compose
        .stage_url
        .replace("@redis:6379/", &format!("@127.0.0.1:{}/", redis.port()));
    assert_ne!(url, compose.stage_url, "{url}");
    let mut botline = redis::Client::open(url).unwrap().get_connection().unwrap();
    let pong: String = redis::cmd("PING").query(&mut botline).unwrap();
    assert_eq!(pong, "PONG");
    let inbound = Streams::default().inbound(0);
    let _: String = redis::cmd("XADD")
        .arg(&inbound)
        .arg("*")
        .arg("v")
        .arg("1")
        .query(&mut botline)
        .unwrap();
    for (what, command) in [
        ("FLUSHALL", redis::cmd("FLUSHALL")),
        (
            "CONFIG GET",
            redis::cmd("CONFIG").arg("GET").arg("*").clone(),
        ),
        (
            "a key outside {botline}:",
            redis::cmd("SET").arg("other").arg("1").clone(),
        ),
    ] {
        let code = refused_code(what, command.query::<redis::Value>(&mut botline));
        assert_eq!(code, "NOPERM", "{what}");
    }

    let mut admin = redis
        .connect(Some(("admin", &compose.admin_password)))
        .unwrap();
    let config: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query(&mut admin)
        .unwrap();
    assert_eq!(
        config,
        ["maxmemory-policy", "noeviction"],
        "the flags reach Redis"
    );
    let config: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendonly")
        .query(&mut admin)
        .unwrap();
    assert_eq!(config, ["appendonly", "yes"]);
    let length: u64 = redis::cmd("XLEN").arg(&inbound).query(&mut admin).unwrap();
    assert_eq!(length, 1, "admin sees botline's stream");
    let info: String = redis::cmd("INFO").arg("server").query(&mut admin).unwrap();
    assert!(info.contains("redis_version"), "{info}");

    assert!(
        redis.check_passes(&compose.health_check, &env),
        "the health check {} fails on a healthy Redis",
        compose.health_check
    );
    assert!(
        !redis.check_passes(
            &compose.health_check,
            &[("BOTLINE_REDIS_PASSWORD", "not-the-password")]
        ),
        "the health check {} passes with a wrong password",
        compose.health_check
    );

    let rendered = redis.rendered_acl();
    assert!(rendered.contains("user botline on #"), "{rendered}");
    assert!(
        !rendered.contains(&compose.password) && !rendered.contains(&compose.admin_password),
        "the rendered ACL holds a password"
    );
}

/// The start script refuses a password it cannot make work (empty, or one
/// BOTLINE_REDIS_URL would need percent-encoded), naming the variable; an
/// empty admin password makes no `admin` user.
#[test]
fn compose_redis_start_script_refuses_an_unusable_password() {
    let compose = compose_redis();
    for password in ["", "has@and/in-it", "with space"] {
        let refused = ScriptedRedis::try_start(
            &compose.script,
            &compose.flags,
            &[("BOTLINE_REDIS_PASSWORD", password)],
        );
        match refused {
            Ok(redis) => panic!("started with password {password:?}: {}", redis.output()),
            Err(said) => assert!(
                said.contains("BOTLINE_REDIS_PASSWORD"),
                "{password:?}: the refusal names the variable: {said}"
            ),
        }
    }

    let redis = ScriptedRedis::start(
        &compose.script,
        &compose.flags,
        &[
            ("BOTLINE_REDIS_PASSWORD", compose.password.as_str()),
            ("BOTLINE_REDIS_ADMIN_PASSWORD", ""),
        ],
    );
    assert!(redis.connect(Some(("botline", &compose.password))).is_ok());
    let admin = redis.connect(Some(("admin", &compose.admin_password)));
    assert!(
        login_refused(&admin),
        "no admin user: {:?}",
        admin.map(|_| ())
    );
}

/// The `expr`s of the Grafana dashboard.
fn dashboard_exprs() -> Vec<String> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read_compose("grafana/dashboards/botline.json"))
            .expect("dashboard JSON");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().expect("expr").to_string());
        }
    }
    assert!(exprs.len() >= 10, "dashboard exprs: {exprs:?}");
    exprs
}

/// Tokens that start `botline_` in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("botline_") {
        let before = rest[..at].chars().next_back();
        let token: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(token.clone());
        }
        rest = &rest[at + token.len()..];
    }
    names
}

/// Messages through the API, one every `every`, until `stop`; counts them.
fn trickle(
    client: ApiClient,
    prefix: &'static str,
    every: Duration,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            let event = format!("{prefix}-{n}");
            client
                .send(
                    &event,
                    &format!("{prefix}-chat-{}", n % 4),
                    "hello",
                    Duration::from_secs(30),
                )
                .await
                .unwrap();
            sent.fetch_add(1, Ordering::Relaxed);
            n += 1;
            tokio::time::sleep(every).await;
        }
    })
}

fn firing(alerts: &[Alert], alertname: &str, labels: &[(&str, &str)]) -> bool {
    alerts.iter().any(|a| a.is_firing(alertname, labels))
}

/// The real Prometheus with the real rules (every `for:` cut to 2s): while
/// classify is stopped and messages keep coming, its lag alert fires (from
/// ingest's export of `in`, the only stream another stage also exports);
/// once classify is back, it resolves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_alert_fires_in_prometheus_while_a_stage_is_stopped_and_resolves() {
    let redis = RedisServer::start();
    let sink = Sink::start(WEBHOOK_SECRET).await;
    let mut pipeline = Pipeline::start(&redis, &overlay(&sink));
    pipeline.wait_ready(Duration::from_secs(60)).await;
    let client = ApiClient::new(&pipeline.base_url());

    let (rules, replaced) = rules_with_for(&read_compose("prometheus/alerts.yml"), "2s");
    assert_eq!(replaced, 7, "every rule but BotlineDeadLetters has a for:");
    let targets: Vec<(&str, String)> = pipeline
        .processes
        .iter()
        .map(|p| (p.stage, format!("127.0.0.1:{}", p.metrics_port)))
        .collect();
    let mut prometheus = Prometheus::start(&targets, &rules);
    prometheus.wait_ready(9, Duration::from_secs(30)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let sender = trickle(
        client.clone(),
        "lag",
        Duration::from_millis(40),
        stop.clone(),
        sent.clone(),
    );
    // A healthy start: every stage scraped and answering, no alert firing.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let up = prometheus.query("sum(up)").await.unwrap_or_default();
        if up[0]["value"][1] == "4" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the four stages are not all scraped: sum(up) = {up}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    prometheus
        .wait_alerts("a quiet pipeline", Duration::from_secs(30), |alerts| {
            alerts.iter().all(|a| a.state != "firing")
        })
        .await;

    // Every dashboard query is valid PromQL for this Prometheus.
    for expr in dashboard_exprs() {
        let expr = expr.replace("$__rate_interval", "5s");
        if let Err(error) = prometheus.query(&expr).await {
            panic!("dashboard query {expr} is refused: {error}");
        }
    }

    // Stop classify (SIGTERM: it leaves the group, nothing pending) while
    // messages keep coming.
    let status = pipeline
        .stage("classify")
        .terminate(Duration::from_secs(15));
    assert!(status.success(), "classify exited with {status}");
    let stopped = std::time::Instant::now();
    // Lag growing, the scrape failing and the group left without consumers
    // each fire on their own evaluation: wait for all three.
    prometheus
        .wait_alerts(
            "classify's lag, stage-down and no-consumers alerts",
            Duration::from_secs(45),
            |alerts| {
                firing(
                    alerts,
                    "BotlineLagGrowing",
                    &[("stream", "in"), ("group", "classify")],
                ) && firing(alerts, "BotlineStageDown", &[("job", "classify")])
                    && firing(
                        alerts,
                        "BotlineGroupWithoutConsumers",
                        &[("stream", "in"), ("group", "classify")],
                    )
            },
        )
        .await;
    let alerts = prometheus.alerts().await;
    assert!(
        !alerts.iter().any(|a| a.state == "firing"
            && a.label("group") != "classify"
            && a.label("job") != "classify"),
        "only classify's alerts fire: {alerts:#?}"
    );

    let fired_after = stopped.elapsed();
    pipeline.stage("classify").start_again();
    let restarted = std::time::Instant::now();
    prometheus
        .wait_alerts(
            "classify's alerts to resolve",
            Duration::from_secs(45),
            |alerts| {
                !alerts.iter().any(|a| {
                    a.state == "firing"
                        && (a.label("group") == "classify" || a.label("job") == "classify")
                })
            },
        )
        .await;
    eprintln!(
        "classify stopped: lag alert firing after {fired_after:?}; restarted: resolved after {:?}",
        restarted.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    sender.await.unwrap();
    let sent = sent.load(Ordering::Relaxed);
    wait_for("a reply to every message", Duration::from_secs(30), || {
        sink.replies_per_message().len() == sent
    })
    .await;
}

/// Every metric name in the alert rules and the dashboard is exported by
/// the binaries once traffic went through: replies, a retry (the platform
/// answers 503), a dead letter (an entry that does not decode) and a loop
/// error (Redis drops the stages' connections).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_and_dashboard_use_is_exported() {
    let redis = RedisServer::start();
    let sink = Sink::start(WEBHOOK_SECRET).await;
    let pipeline = Pipeline::start(&redis, &overlay(&sink));
    pipeline.wait_ready(Duration::from_secs(60)).await;
    let client = ApiClient::new(&pipeline.base_url());

    // A reply that is first refused with 503, then delivered: a retry.
    sink.answer_with(Answer::Status(503));
    client
        .send("drift-0", "drift", "hello", Duration::from_secs(10))
        .await
        .unwrap();
    let metrics_of = |stage: &str| {
        let process = pipeline
            .processes
            .iter()
            .find(|p| p.stage == stage)
            .expect("stage");
        process.metrics()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !metrics_of("egress")
        .await
        .contains("botline_egress_retries_total")
    {
        assert!(std::time::Instant::now() < deadline, "egress never retried");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sink.answer_with(Answer::Ok);
    for n in 1..=3 {
        client
            .send(
                &format!("drift-{n}"),
                "drift",
                "hello",
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    wait_for("four replies", Duration::from_secs(30), || {
        sink.replies_per_message().len() == 4
    })
    .await;

    // An entry that does not decode: classify sends it to dead.
    let mut connection = redis.connection();
    add_entry(
        &mut connection,
        &Streams::default().inbound(0),
        &[
            ("v".to_string(), b"1".to_vec()),
            ("body".to_string(), b"\x93\xff garbage".to_vec()),
        ],
    );
    // Redis drops every client: each stage's read loop fails once and reconnects.
    let _: () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query(&mut connection)
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let classify = metrics_of("classify").await;
        let dead = botline_tests::metric_value(
            &classify,
            r#"botline_stage_messages_total{stage="classify",outcome="dead"}"#,
        );
        if dead.unwrap_or(0.0) > 0.0 && classify.contains("botline_stage_errors_total") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "classify never reported the dead letter and the loop error:\n{classify}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // What the binaries export: sample names, and the histogram families.
    let mut exported = String::new();
    for process in &pipeline.processes {
        exported.push_str(&process.metrics().await);
    }
    let samples: BTreeSet<String> = exported
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();
    let histograms: BTreeSet<String> = exported
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.strip_suffix(" histogram"))
        .map(str::to_string)
        .collect();

    let mut used = metric_names(&read_compose("prometheus/alerts.yml"));
    used.extend(metric_names(&dashboard_exprs().join("\n")));
    assert!(
        used.len() >= 12,
        "names found in the rules and dashboard: {used:?}"
    );
    let missing: Vec<&String> = used
        .iter()
        .filter(|name| {
            // A histogram is named in a rule's text by its family, in a
            // query by its `_bucket`/`_sum`/`_count` series.
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|family| histograms.contains(*family));
            !(samples.contains(*name) || histograms.contains(*name) || family.is_some())
        })
        .collect();
    assert!(
        missing.is_empty(),
        "used by compose/ but not exported: {missing:?}\nexported: {samples:?}"
    );
}
