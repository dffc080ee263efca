//! The connections every binary makes, against real redis-servers secured
//! with an ACL user and with TLS only: the pool, the hot-path connection and
//! the dedicated blocking connection all log in and speak TLS, and the start
//! check tells bad settings (stop, naming them) from a Redis not there yet.

use botline_shared::config::ProcessConfig;
use botline_shared::redis_conn;
use botline_shared::testing::{free_port, RedisServer, Security, TestCa};
use std::sync::Arc;
use std::time::Duration;

const PASSWORD: &str = "connections-secret-3e9a";

fn secured(tls: Option<Arc<TestCa>>) -> RedisServer {
    RedisServer::start_secured(
        Security {
            acl: Some(format!(
                "user default off\nuser botline on >{PASSWORD} ~* &* +@all\n"
            )),
            login: Some(("botline".into(), PASSWORD.into())),
            tls,
        },
        &[],
    )
}

fn process(env: &[(String, String)]) -> ProcessConfig {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    ProcessConfig::from_env(&env, "127.0.0.1:0").unwrap()
}

/// `env` with `name` set to `value`.
fn with(env: &[(String, String)], name: &str, value: String) -> Vec<(String, String)> {
    let mut env: Vec<_> = env.iter().filter(|(k, _)| k != name).cloned().collect();
    env.push((name.into(), value));
    env
}

/// What the start check says for `env`: `Ok` or the error's text.
async fn start_check(env: &[(String, String)]) -> Result<(), String> {
    let client = redis_conn::client(&process(env)).unwrap();
    redis_conn::check_at_start(&client)
        .await
        .map_err(|error| error.to_string())
}

/// The start check for `env` with `BOTLINE_REDIS_URL` = `url`.
async fn start_check_url(env: &[(String, String)], url: String) -> Result<(), String> {
    start_check(&with(env, "BOTLINE_REDIS_URL", url)).await
}

/// Every kind of connection a stage holds works with `env`.
async fn every_connection_works(env: &[(String, String)]) {
    let process = process(env);
    start_check(env).await.unwrap();
    let client = redis_conn::Redis::connect(&process).unwrap();
    let pool = client.pool(2).unwrap();
    let mut pooled = pool.get().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg("{botline}:k")
        .arg("v")
        .query_async(&mut pooled)
        .await
        .unwrap();
    drop(pooled);
    // A recycled pool connection (UNWATCH + PING) still answers.
    let mut pooled = pool.get().await.unwrap();
    let value: String = redis::cmd("GET")
        .arg("{botline}:k")
        .query_async(&mut pooled)
        .await
        .unwrap();
    assert_eq!(value, "v");
    let mut commands = client.commands().unwrap();
    let pong: String = redis::cmd("PING").query_async(&mut commands).await.unwrap();
    assert_eq!(pong, "PONG");
    let mut blocking = client.blocking(Duration::from_millis(200)).await.unwrap();
    let nothing: redis::Value = redis::cmd("XREAD")
        .arg("BLOCK")
        .arg(200)
        .arg("STREAMS")
        .arg("{botline}:empty")
        .arg("$")
        .query_async(&mut blocking)
        .await
        .unwrap();
    assert_eq!(nothing, redis::Value::Nil);
}

#[tokio::test]
async fn every_connection_works_on_a_cluster() {
    let cluster = botline_shared::testing::RedisCluster::start();
    let env = cluster.env();
    assert!(
        env[0].1.starts_with("redis+cluster://127.0.0.1:"),
        "{env:?}"
    );
    let process = process(&env);
    assert!(redis_conn::Redis::connect(&process).unwrap().is_cluster());
    every_connection_works(&env).await;
}

#[tokio::test]
async fn an_acl_user_logs_in_and_a_wrong_password_is_named_without_it() {
    let redis = secured(None);
    every_connection_works(&redis.env()).await;
    let wrong = "wrong-password-8d1f";
    let error = start_check_url(
        &redis.env(),
        format!("redis://botline:{wrong}@127.0.0.1:{}", redis.port()),
    )
    .await
    .unwrap_err();
    assert!(
        error.starts_with("setting BOTLINE_REDIS_URL: Redis refused its user name and password"),
        "{error}"
    );
    assert!(!error.contains(wrong), "{error}");
    let anonymous = start_check_url(&redis.env(), format!("redis://127.0.0.1:{}", redis.port()))
        .await
        .unwrap_err();
    assert!(
        anonymous.starts_with("setting BOTLINE_REDIS_URL"),
        "{anonymous}"
    );
}

#[tokio::test]
async fn over_tls_every_connection_works_and_tls_mistakes_are_named() {
    let ca = Arc::new(TestCa::new());
    let redis = secured(Some(ca.clone()));
    assert!(redis.url().starts_with("rediss://"));
    every_connection_works(&redis.env()).await;

    let other = TestCa::new();
    let wrong_ca = start_check(&with(
        &redis.env(),
        "BOTLINE_REDIS_CA_FILE",
        other.ca_file().display().to_string(),
    ))
    .await
    .unwrap_err();
    assert!(
        wrong_ca.starts_with("setting BOTLINE_REDIS_URL: TLS with Redis failed")
            && wrong_ca.contains("BOTLINE_REDIS_CA_FILE"),
        "{wrong_ca}"
    );
    let plain_to_tls = start_check_url(
        &[],
        format!("redis://botline:{PASSWORD}@127.0.0.1:{}", redis.port()),
    )
    .await
    .unwrap_err();
    assert!(
        plain_to_tls.starts_with("setting BOTLINE_REDIS_URL") && plain_to_tls.contains("rediss://"),
        "{plain_to_tls}"
    );
    assert!(!plain_to_tls.contains(PASSWORD));
    // Without the client certificate Redis (tls-auth-clients yes) hangs up.
    let no_client_cert: Vec<_> = redis
        .env()
        .into_iter()
        .filter(|(k, _)| !k.ends_with("CERT_FILE") && !k.ends_with("KEY_FILE"))
        .collect();
    let refused = start_check(&no_client_cert).await.unwrap_err();
    assert!(
        refused.starts_with("setting BOTLINE_REDIS_URL: TLS with Redis failed")
            && refused.contains("BOTLINE_REDIS_CERT_FILE"),
        "{refused}"
    );

    let plain = secured(None);
    let tls_to_plain = start_check_url(
        &redis.env(),
        format!("rediss://botline:{PASSWORD}@127.0.0.1:{}", plain.port()),
    )
    .await
    .unwrap_err();
    assert_eq!(
        tls_to_plain,
        "setting BOTLINE_REDIS_URL: the port answers plain Redis, not TLS: use a redis:// URL, or Redis's TLS port"
    );
}

#[tokio::test]
async fn a_redis_not_there_yet_is_no_bad_setting() {
    let nobody = format!("redis://botline:{PASSWORD}@127.0.0.1:{}", free_port());
    assert_eq!(start_check_url(&[], nobody).await, Ok(()));
}
