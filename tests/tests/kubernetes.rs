//! The Kubernetes manifests in compose/kubernetes, checked as far as this
//! machine allows without a cluster: every YAML parses, every kustomization
//! lists files that exist (and every manifest is listed), every Deployment
//! has probes on the real health endpoints, requests and limits, a grace
//! period longer than the shutdown deadline and scrape annotations; every
//! ScaledObject scales an existing Deployment on a stream and group botline
//! really uses; and `kubectl kustomize` builds it when kubectl is installed.

use botline_shared::config::{RunnerSettings, Settings};
use botline_shared::message::Priority;
use botline_shared::streams::{group, Streams};
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
            if var["name"].as_str().unwrap().ends_with("_SECRET") {
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
    let mut reads: Vec<(String, &str)> = vec![(streams.inbound(), group::CLASSIFY)];
    reads.extend(Priority::ALL.map(|priority| (streams.queue(priority), group::RESPOND)));
    // egress's senders today; a new platform adds its stream here and a trigger.
    let platforms = ["web", "webhook"];
    reads.extend(platforms.map(|platform| (streams.outbound(platform), group::EGRESS)));

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

    let config = of_kind(&objects, "ConfigMap");
    let toml = config[0]["data"]["botline.toml"].as_str().unwrap();
    Settings::from_overlay(Some(toml)).expect("the ConfigMap's botline.toml is a valid overlay");
    for secret in of_kind(&objects, "Secret") {
        for (key, value) in secret["stringData"].as_object().unwrap() {
            assert_eq!(value, "", "{key}: the placeholder must hold no real secret");
        }
    }
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
