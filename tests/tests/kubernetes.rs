//! The Kubernetes manifests in compose/kubernetes, checked as far as this
//! machine allows without a cluster: every YAML parses, every kustomization
//! lists files that exist (and every manifest is listed), every Deployment
//! has probes on the real health endpoints, requests and limits, a grace
//! period longer than the shutdown deadline and scrape annotations; every
//! ScaledObject scales an existing Deployment on a stream and group botline
//! really uses; and `kubectl kustomize` builds it when kubectl is installed.
//! Redis: its ConfigMap is compose/redis's ACL and start script byte for
//! byte, it starts from them (on the local redis-server) with its
//! StatefulSet's flags and probe, every stage logs in as `botline` with the
//! Secret's password, and KEDA too, through a TriggerAuthentication, as a
//! user that may run every command the scaler sends.

use botline_shared::config::{RunnerSettings, Settings};
use botline_shared::streams::{group, Streams};
use botline_tests::redis_start::ScriptedRedis;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("compose")
        .join("kubernetes")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml")
        {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// Every document of a YAML file, as JSON values.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    parse_documents(&text).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

fn parse_documents(text: &str) -> Result<Vec<Value>, String> {
    serde_norway::Deserializer::from_str(text)
        .map(|document| {
            let value = serde_norway::Value::deserialize(document).map_err(|e| e.to_string())?;
            serde_json::to_value(value).map_err(|e| e.to_string())
        })
        .filter(|value| !matches!(value, Ok(Value::Null)))
        .collect()
}

/// Every object the base defines (what kustomize would emit, less its edits).
fn objects() -> Vec<Value> {
    yaml_files(&root())
        .iter()
        .filter(|path| !is_kustomization(path))
        .flat_map(|path| documents(path))
        .collect()
}

fn is_kustomization(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|name| name == "kustomization.yaml")
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects
        .iter()
        .filter(|object| object["kind"] == kind)
        .collect()
}

fn name(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap()
}

#[test]
fn every_manifest_parses_and_every_kustomization_lists_what_exists() {
    let files = yaml_files(&root());
    let kustomizations: Vec<&PathBuf> =
        files.iter().filter(|path| is_kustomization(path)).collect();
    assert!(
        !kustomizations.is_empty(),
        "no kustomization.yaml under {}",
        root().display()
    );
    for path in &files {
        let docs = documents(path);
        assert!(!docs.is_empty(), "{} is empty", path.display());
        for doc in &docs {
            assert!(
                doc["apiVersion"].is_string() && doc["kind"].is_string(),
                "{}: {doc}",
                path.display()
            );
        }
    }
    let mut listed = BTreeSet::new();
    for kustomization in kustomizations {
        let dir = kustomization.parent().unwrap();
        let doc = &documents(kustomization)[0];
        for resource in doc["resources"].as_array().expect("resources") {
            let path = dir.join(resource.as_str().unwrap());
            assert!(
                path.exists(),
                "{} lists {}, which does not exist",
                kustomization.display(),
                path.display()
            );
            listed.insert(path.canonicalize().unwrap());
        }
    }
    for path in &files {
        if !is_kustomization(path) {
            assert!(
                listed.contains(&path.canonicalize().unwrap()),
                "{} is in no kustomization's resources",
                path.display()
            );
        }
    }
    let garbage = parse_documents("a: [unclosed\n");
    assert!(garbage.is_err(), "the parser does refuse broken YAML");
}

#[test]
fn every_deployment_has_probes_resources_grace_and_scrape_annotations() {
    let objects = objects();
    let deployments = of_kind(&objects, "Deployment");
    let names: BTreeSet<&str> = deployments.iter().map(|d| name(d)).collect();
    assert_eq!(
        names,
        BTreeSet::from(["classify", "egress", "ingest", "respond"])
    );
    let runner: RunnerSettings = Settings::from_overlay(None)
        .unwrap()
        .section("runner")
        .unwrap();
    let deadline = runner.shutdown_deadline().as_secs();
    for deployment in deployments {
        let stage = name(deployment);
        let template = &deployment["spec"]["template"];
        assert_eq!(
            deployment["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"], stage,
            "{stage}: selector"
        );
        assert_eq!(
            template["metadata"]["labels"]["app.kubernetes.io/name"], stage,
            "{stage}: labels"
        );
        let annotations = &template["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true", "{stage}");
        assert_eq!(annotations["prometheus.io/port"], "9100", "{stage}");
        assert_eq!(annotations["prometheus.io/path"], "/metrics", "{stage}");
        let grace = template["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30);
        assert!(
            grace > deadline,
            "{stage}: grace period {grace}s must exceed the {deadline}s shutdown deadline"
        );
        let container = &template["spec"]["containers"][0];
        assert_eq!(
            container["command"][0],
            format!("botline-{stage}"),
            "{stage}: command"
        );
        let env = |wanted: &str| {
            container["env"]
                .as_array()
                .unwrap()
                .iter()
                .find(|var| var["name"] == wanted)
                .map(|var| var["value"].clone())
        };
        assert_eq!(
            env("BOTLINE_METRICS_ADDR"),
            Some(Value::from("0.0.0.0:9100")),
            "{stage}"
        );
        assert!(
            env("BOTLINE_REDIS_URL").is_some(),
            "{stage}: BOTLINE_REDIS_URL"
        );
        let metrics_port = container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|port| port["containerPort"] == 9100)
            .unwrap_or_else(|| panic!("{stage}: no container port 9100"));
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &container[probe]["httpGet"];
            assert_eq!(get["path"], path, "{stage}: {probe}");
            assert!(
                get["port"] == 9100 || get["port"] == metrics_port["name"],
                "{stage}: {probe} port {}",
                get["port"]
            );
        }
        for bound in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                assert!(
                    container["resources"][bound][resource].is_string(),
                    "{stage}: resources.{bound}.{resource}"
                );
            }
        }
        // Secrets come from the Secret, never written in the manifest.
        for var in container["env"].as_array().unwrap() {
            let var_name = var["name"].as_str().unwrap();
            if var_name.ends_with("_SECRET") || var_name.ends_with("_PASSWORD") {
                assert_eq!(
                    var["valueFrom"]["secretKeyRef"]["name"], "botline-secrets",
                    "{stage}: {var}"
                );
            }
        }
    }
}

#[test]
fn scaled_objects_scale_real_deployments_on_real_streams_and_groups() {
    let objects = objects();
    let deployments: BTreeSet<&str> = of_kind(&objects, "Deployment")
        .into_iter()
        .map(name)
        .collect();
    let services: BTreeSet<&str> = of_kind(&objects, "Service").into_iter().map(name).collect();
    let streams = Streams::default();
    // The stream each group reads, from the names the stages use.
    // egress's senders today; a new platform adds its stream here and a trigger.
    let platforms = ["web", "webhook"];
    let mut reads: Vec<(String, &str)> = Vec::new();
    for p in streams.all() {
        reads.push((streams.inbound(p), group::CLASSIFY));
        reads.push((streams.queue(p), group::RESPOND));
        reads.extend(platforms.map(|platform| (streams.outbound(p, platform), group::EGRESS)));
    }

    let scaled = of_kind(&objects, "ScaledObject");
    let mut covered = BTreeSet::new();
    for object in &scaled {
        let target = object["spec"]["scaleTargetRef"]["name"].as_str().unwrap();
        assert!(
            deployments.contains(target),
            "{} scales {target}, no such Deployment",
            name(object)
        );
        assert!(
            object["spec"]["minReplicaCount"].as_u64().unwrap_or(0) >= 1,
            "{target}: never scaled to 0"
        );
        assert!(
            object["spec"]["maxReplicaCount"]
                .as_u64()
                .unwrap_or(u64::MAX)
                <= u64::from(streams.partitions()),
            "{target}: more replicas than partitions would only stand by"
        );
        for trigger in object["spec"]["triggers"].as_array().unwrap() {
            assert_eq!(trigger["type"], "redis-streams", "{target}");
            let metadata = &trigger["metadata"];
            let stream = metadata["stream"].as_str().unwrap();
            let group = metadata["consumerGroup"].as_str().unwrap();
            assert!(
                reads.iter().any(|(s, g)| s == stream && *g == group),
                "{target}: no botline group {group} reads {stream}"
            );
            assert_eq!(group, target, "{target} must scale on its own group");
            for field in ["lagCount", "activationLagCount"] {
                let value = metadata[field]
                    .as_str()
                    .unwrap_or_else(|| panic!("{target}: {field}"));
                assert!(
                    value.parse::<u64>().is_ok_and(|n| n > 0),
                    "{target}: {field} = {value}"
                );
            }
            let address = metadata["address"].as_str().unwrap();
            let host = address.split(['.', ':']).next().unwrap();
            assert!(
                services.contains(host),
                "{target}: {address} names no Service"
            );
            covered.insert(stream.to_string());
        }
    }
    let all: BTreeSet<String> = reads.iter().map(|(stream, _)| stream.clone()).collect();
    assert_eq!(covered, all, "every stream a stage reads scales that stage");
    let scaled_targets: BTreeSet<&str> = scaled
        .iter()
        .map(|o| o["spec"]["scaleTargetRef"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        scaled_targets,
        BTreeSet::from(["classify", "egress", "respond"])
    );

    let hpas = of_kind(&objects, "HorizontalPodAutoscaler");
    assert_eq!(hpas.len(), 1);
    assert_eq!(hpas[0]["spec"]["scaleTargetRef"]["name"], "ingest");
    assert_eq!(hpas[0]["spec"]["metrics"][0]["resource"]["name"], "cpu");
}

#[test]
fn disruption_budgets_services_redis_config_and_secret_hold_together() {
    let objects = objects();
    let deployments: Vec<&Value> = of_kind(&objects, "Deployment");
    let budgets = of_kind(&objects, "PodDisruptionBudget");
    for deployment in &deployments {
        let labels =
            &deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"];
        assert!(
            budgets
                .iter()
                .any(|b| &b["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == labels),
            "{}: no PodDisruptionBudget",
            name(deployment)
        );
    }
    let pod_labels: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "Deployment" || o["kind"] == "StatefulSet")
        .map(|o| &o["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"])
        .collect();
    for service in of_kind(&objects, "Service") {
        let selector = &service["spec"]["selector"]["app.kubernetes.io/name"];
        assert!(
            pod_labels.contains(&selector),
            "Service {} selects no pods",
            name(service)
        );
    }
    assert!(of_kind(&objects, "Service")
        .iter()
        .any(|s| name(s) == "ingest"));

    let redis = of_kind(&objects, "StatefulSet");
    assert_eq!(redis.len(), 1);
    let args: Vec<&str> = redis[0]["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for pair in [
        ["--appendonly", "yes"],
        ["--appendfsync", "everysec"],
        ["--maxmemory-policy", "noeviction"],
    ] {
        assert!(
            args.windows(2).any(|w| w == pair),
            "redis args {args:?} lack {pair:?}"
        );
    }
    assert!(
        redis[0]["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
            .is_string()
    );

    let config = named(&objects, "ConfigMap", "botline-config");
    let toml = config["data"]["botline.toml"].as_str().unwrap();
    Settings::from_overlay(Some(toml)).expect("the ConfigMap's botline.toml is a valid overlay");
    for secret in of_kind(&objects, "Secret") {
        for (key, value) in secret["stringData"].as_object().unwrap() {
            if key == "BOTLINE_REDIS_USERNAME" {
                // No secret: the ACL's user, which KEDA takes from a Secret only.
                assert_eq!(value, "botline", "{key}");
            } else {
                assert_eq!(value, "", "{key}: the placeholder must hold no real secret");
            }
        }
    }
}

/// The one object of `kind` named `wanted`.
fn named<'a>(objects: &'a [Value], kind: &str, wanted: &str) -> &'a Value {
    let found: Vec<&Value> = of_kind(objects, kind)
        .into_iter()
        .filter(|object| name(object) == wanted)
        .collect();
    assert_eq!(found.len(), 1, "{kind} {wanted}: {} of them", found.len());
    found[0]
}

/// The keys the Secret `secret` defines.
fn secret_keys(objects: &[Value], secret: &str) -> BTreeSet<String> {
    named(objects, "Secret", secret)["stringData"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

/// The `$(NAME)`s a value refers to (Kubernetes' dependent variables).
fn references(value: &str) -> Vec<&str> {
    value
        .split("$(")
        .skip(1)
        .filter_map(|rest| rest.split_once(')').map(|(name, _)| name))
        .collect()
}

/// Each stage's BOTLINE_REDIS_URL logs in as `botline` with
/// `$(BOTLINE_REDIS_PASSWORD)`, defined earlier in the same env list (else
/// Kubernetes leaves the text as it is) from a key the Secret defines; so is
/// every other `$(…)` in an env value; Redis gets its password from the
/// same key.
#[test]
fn every_stage_logs_in_to_redis_as_botline_with_the_secrets_password() {
    let objects = objects();
    let keys = secret_keys(&objects, "botline-secrets");
    let from_the_secret = |var: &Value, key: &str| {
        let reference = &var["valueFrom"]["secretKeyRef"];
        assert_eq!(reference["name"], "botline-secrets", "{var}");
        assert_eq!(reference["key"], key, "{var}");
        assert!(keys.contains(key), "the Secret has no {key}");
        assert!(
            reference.get("optional").is_none_or(|o| o == false),
            "{var}: without it nothing logs in"
        );
    };
    let deployments = of_kind(&objects, "Deployment");
    assert_eq!(deployments.len(), 4);
    for deployment in deployments {
        let stage = name(deployment);
        let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap();
        let position = |wanted: &str| {
            env.iter()
                .position(|var| var["name"] == wanted)
                .unwrap_or_else(|| panic!("{stage}: no {wanted}"))
        };
        let url_at = position("BOTLINE_REDIS_URL");
        assert_eq!(
            env[url_at]["value"], "redis://botline:$(BOTLINE_REDIS_PASSWORD)@redis:6379/",
            "{stage}"
        );
        let password_at = position("BOTLINE_REDIS_PASSWORD");
        from_the_secret(&env[password_at], "BOTLINE_REDIS_PASSWORD");
        for (at, var) in env.iter().enumerate() {
            for reference in references(var["value"].as_str().unwrap_or_default()) {
                let defined_at = position(reference);
                assert!(
                    defined_at < at,
                    "{stage}: {} refers to {reference}, defined after it",
                    var["name"]
                );
            }
        }
    }
    let redis = named(&objects, "StatefulSet", "redis");
    let env = redis["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    let password = env
        .iter()
        .find(|var| var["name"] == "BOTLINE_REDIS_PASSWORD")
        .expect("redis gets BOTLINE_REDIS_PASSWORD");
    from_the_secret(password, "BOTLINE_REDIS_PASSWORD");
    assert_eq!(
        references("a $(ONE) b $(TWO)"),
        ["ONE", "TWO"],
        "the references are found"
    );
}

/// Every ScaledObject trigger logs in through a TriggerAuthentication whose
/// `username` and `password` are keys the Secret defines: the user the
/// stages log in as, and the password Redis is given.
#[test]
fn every_scaled_object_logs_in_through_a_trigger_authentication_of_the_secret() {
    let objects = objects();
    let authentications = of_kind(&objects, "TriggerAuthentication");
    assert!(!authentications.is_empty(), "no TriggerAuthentication");
    let mut triggers = 0;
    for scaled in of_kind(&objects, "ScaledObject") {
        for trigger in scaled["spec"]["triggers"].as_array().unwrap() {
            triggers += 1;
            let reference = &trigger["authenticationRef"];
            let wanted = reference["name"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: a trigger without authenticationRef", name(scaled)));
            // A ClusterTriggerAuthentication would be outside the base.
            assert!(
                reference
                    .get("kind")
                    .is_none_or(|kind| kind == "TriggerAuthentication"),
                "{reference}"
            );
            let authentication = named(&objects, "TriggerAuthentication", wanted);
            let mut parameters = BTreeSet::new();
            for target in authentication["spec"]["secretTargetRef"]
                .as_array()
                .unwrap()
            {
                let secret = target["name"].as_str().unwrap();
                let key = target["key"].as_str().unwrap();
                assert!(
                    secret_keys(&objects, secret).contains(key),
                    "{wanted}: Secret {secret} has no {key}"
                );
                let expected_key = match target["parameter"].as_str().unwrap() {
                    "username" => "BOTLINE_REDIS_USERNAME",
                    "password" => "BOTLINE_REDIS_PASSWORD",
                    other => panic!("{wanted}: parameter {other}"),
                };
                assert_eq!(key, expected_key, "{wanted}");
                parameters.insert(target["parameter"].as_str().unwrap());
            }
            assert_eq!(
                parameters,
                BTreeSet::from(["password", "username"]),
                "{wanted}: KEDA's redis-streams login"
            );
        }
    }
    // in, q, out:web and out:webhook, each in every partition.
    assert_eq!(
        triggers,
        4 * Streams::default().partitions() as usize,
        "triggers"
    );
    let secret = named(&objects, "Secret", "botline-secrets");
    assert_eq!(
        secret["stringData"]["BOTLINE_REDIS_USERNAME"], "botline",
        "the user of every stage's BOTLINE_REDIS_URL and of the ACL"
    );
}

fn compose_redis_file(file: &str) -> String {
    let path = root().join("..").join("redis").join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// kustomize reads no file outside the base, so the base holds copies.
#[test]
fn the_redis_configmap_is_compose_redis_byte_for_byte() {
    let objects = objects();
    let config = named(&objects, "ConfigMap", "redis-start");
    let data = config["data"].as_object().unwrap();
    assert_eq!(data.len(), 2, "{:?}", data.keys());
    for file in ["start.sh", "botline-acl.conf"] {
        let copy = data[file].as_str().unwrap();
        assert!(
            copy == compose_redis_file(file),
            "compose/kubernetes/base/redis-start.yaml's {file} differs from compose/redis/{file}: copy it there"
        );
    }
}

/// The files of a ConfigMap, written into a folder removed on drop.
struct Mounted(PathBuf);

impl Mounted {
    fn new(data: &serde_json::Map<String, Value>) -> Self {
        let dir = std::env::temp_dir().join(format!("botline-configmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (file, text) in data {
            std::fs::write(dir.join(file), text.as_str().unwrap()).unwrap();
        }
        Mounted(dir)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Redis as the StatefulSet runs it (its command from the ConfigMap it
/// mounts, its flags, the passwords from its env) on the local
/// redis-server: the readiness probe passes only with the right password,
/// and the Secret's user may run every command KEDA's redis-streams scaler
/// sends for each trigger (PING, INFO, XINFO GROUPS, XLEN; XPENDING with
/// pendingEntriesCount), with no refusal in Redis's ACL LOG.
#[test]
fn redis_starts_from_its_configmap_and_lets_the_keda_scaler_read_the_lag() {
    const PASSWORD: &str = "k8s-test-password-0c5e";
    const ADMIN_PASSWORD: &str = "k8s-test-admin-91ab";
    let objects = objects();
    let redis = named(&objects, "StatefulSet", "redis");
    let pod = &redis["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let strings = |value: &Value| -> Vec<String> {
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let command = strings(&container["command"]);
    assert_eq!(command[0], "sh", "{command:?}");
    let (mount_path, script) = command[1].rsplit_once('/').unwrap();
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|mount| mount["mountPath"] == mount_path)
        .unwrap_or_else(|| panic!("nothing mounted at {mount_path}"));
    assert_eq!(mount["readOnly"], true);
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|volume| volume["name"] == mount["name"])
        .unwrap();
    let config_name = volume["configMap"]["name"].as_str().unwrap();
    let config = named(&objects, "ConfigMap", config_name);
    let mounted = Mounted::new(config["data"].as_object().unwrap());
    let env = [
        ("BOTLINE_REDIS_PASSWORD", PASSWORD),
        ("BOTLINE_REDIS_ADMIN_PASSWORD", ADMIN_PASSWORD),
    ];
    // The pod's /data is not here: the test's own --dir stands in for it
    // (Redis changes into a --dir as it reads it, so it cannot stay).
    let args = strings(&container["args"]);
    let dir_at = args.iter().position(|arg| arg == "--dir").expect("--dir");
    let flags: Vec<String> = args
        .iter()
        .enumerate()
        .filter(|(at, _)| *at != dir_at && *at != dir_at + 1)
        .map(|(_, arg)| arg.clone())
        .collect();
    let server = ScriptedRedis::start(&mounted.0.join(script), &flags, &env);

    let probe = strings(&container["readinessProbe"]["exec"]["command"]);
    assert_eq!(probe[..2], ["sh", "-c"], "{probe:?}");
    assert!(
        server.check_passes(&probe[2], &env),
        "readiness probe {probe:?}"
    );
    assert!(
        !server.check_passes(&probe[2], &[("BOTLINE_REDIS_PASSWORD", "wrong")]),
        "the readiness probe passes with a wrong password: {probe:?}"
    );

    // The wrong password's refusal is in the ACL LOG: start it afresh.
    let mut admin = server.connect(Some(("admin", ADMIN_PASSWORD))).unwrap();
    let _: () = redis::cmd("ACL")
        .arg("LOG")
        .arg("RESET")
        .query(&mut admin)
        .unwrap();

    let user = named(&objects, "Secret", "botline-secrets")["stringData"]["BOTLINE_REDIS_USERNAME"]
        .as_str()
        .unwrap();
    let mut keda = server.connect(Some((user, PASSWORD))).unwrap();
    for scaled in of_kind(&objects, "ScaledObject") {
        for trigger in scaled["spec"]["triggers"].as_array().unwrap() {
            let stream = trigger["metadata"]["stream"].as_str().unwrap();
            let group = trigger["metadata"]["consumerGroup"].as_str().unwrap();
            // Before the stage made its group: XINFO GROUPS on no stream,
            // then XLEN (what KEDA reads while the group is missing).
            let _ = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(stream)
                .query::<redis::Value>(&mut keda);
            let _: u64 = redis::cmd("XLEN").arg(stream).query(&mut keda).unwrap();
            // As the stage does (the runner's XGROUP CREATE … MKSTREAM).
            let _: () = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg(group)
                .arg("0")
                .arg("MKSTREAM")
                .query(&mut keda)
                .unwrap();
            let _: String = redis::cmd("PING").query(&mut keda).unwrap();
            let info: String = redis::cmd("INFO").query(&mut keda).unwrap();
            assert!(
                info.contains("redis_version:7"),
                "KEDA needs Redis 7 for the lag"
            );
            let groups: redis::Value = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(stream)
                .query(&mut keda)
                .unwrap();
            assert!(format!("{groups:?}").contains("lag"), "{groups:?}");
            let _: u64 = redis::cmd("XLEN").arg(stream).query(&mut keda).unwrap();
            let _: redis::Value = redis::cmd("XPENDING")
                .arg(stream)
                .arg(group)
                .query(&mut keda)
                .unwrap();
        }
    }
    let refused: Vec<redis::Value> = redis::cmd("ACL").arg("LOG").query(&mut admin).unwrap();
    assert!(refused.is_empty(), "commands the ACL refused: {refused:?}");
}

#[test]
fn kustomize_builds_the_base_when_kubectl_is_installed() {
    let base = root().join("base");
    let built = Command::new("kubectl").arg("kustomize").arg(&base).output();
    let output = match built {
        Ok(output) => output,
        Err(error) => {
            eprintln!("kubectl not installed ({error}): `kubectl kustomize` skipped; the other checks still ran");
            return;
        }
    };
    assert!(
        output.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let documents = parse_documents(&String::from_utf8(output.stdout).unwrap()).unwrap();
    let mut kinds: Vec<String> = documents
        .iter()
        .map(|d| d["kind"].as_str().unwrap().to_string())
        .collect();
    let mut expected: Vec<String> = objects()
        .iter()
        .map(|d| d["kind"].as_str().unwrap().to_string())
        .collect();
    kinds.sort();
    expected.sort();
    assert_eq!(kinds, expected, "kustomize emits every object once");
    for document in &documents {
        if document["kind"] != "Namespace" {
            assert_eq!(
                document["metadata"]["namespace"],
                "botline",
                "{}",
                name(document)
            );
        }
    }
}
