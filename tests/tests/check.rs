//! `netaudit check` and `netaudit lint` through the real binary: the stageset-controller chart's
//! values under each engine against the fixture cluster (tests/fixtures/cluster: the apiserver on
//! 6443 behind 443, source-controller on 9090 behind 80, CoreDNS behind kube-dns, Prometheus,
//! Flagger, an OTLP collector, an external S3 with a DNS name, and one unexpected SSH flow), plus
//! the exit-code and bad-input contract.

use std::{collections::BTreeSet, path::Path, process::Command};

use netaudit_tests::{fixtures, netaudit_bin};
use serde_json::Value;

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn netaudit(args: &[&str]) -> Run {
    let o = Command::new(netaudit_bin()).args(args).output().unwrap();
    Run {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into(),
        stderr: String::from_utf8_lossy(&o.stderr).into(),
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Values for the fixture release `ssc`: the S3 store and the OTLP collector are in use.
const BASE: &str = "
rollbackStore: {backend: s3, s3: {endpoint: s3.example.com, bucket: rollbacks}}
controller: {tracing: {endpoint: otel-collector.observability.svc:4317}}
";

/// Runs `check --format json` with these values against the fixture cluster.
fn check_values(values: &str, inventory: Option<&str>) -> (Option<i32>, Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let v = dir.path().join("values.yaml");
    std::fs::write(&v, format!("{BASE}{values}")).unwrap();
    let cluster = fixtures().join("cluster");
    let inv = match inventory {
        Some(text) => {
            let p = dir.path().join("inventory.yaml");
            std::fs::write(&p, text).unwrap();
            p
        }
        None => cluster.join("inventory.yaml"),
    };
    let flows = cluster.join("flows.json");
    let r = netaudit(&[
        "check",
        "--flows",
        path(&flows),
        "--inventory",
        path(&inv),
        "--values",
        path(&v),
        "--format",
        "json",
    ]);
    assert!(r.code == Some(0) || r.code == Some(1), "{}", r.stderr);
    (r.code, serde_json::from_str(&r.stdout).expect("json report"), r.stderr)
}

fn cut(report: &Value) -> BTreeSet<u64> {
    report["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["allowed"] == false)
        .map(|v| v["index"].as_u64().unwrap())
        .collect()
}

fn lint_codes(report: &Value) -> BTreeSet<String> {
    report["lint"].as_array().unwrap().iter().map(|f| f["code"].as_str().unwrap().to_string()).collect()
}

const APISERVER: u64 = 1;
const SOURCE_CONTROLLER: u64 = 2;
const S3: u64 = 3;
const OTLP: u64 = 4;
const SSH: u64 = 9;

#[test]
fn kubernetes_engine_cuts_the_apiserver_when_the_rule_names_the_service_port() {
    // The chart documentation's example egress block: the apiserver as an ipBlock on 443.
    let docs_example = "
networkPolicy:
  enabled: true
  egress:
    enabled: true
    to:
      - to: [{ipBlock: {cidr: 172.18.0.2/32}}]
        ports: [{protocol: TCP, port: 443}]
      - to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: flux-system}}}]
      - to: [{ipBlock: {cidr: 198.51.100.0/24}}]
        ports: [{protocol: TCP, port: 443}]
      - to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: observability}}}]
        ports: [{protocol: TCP, port: 4317}]
";
    let (code, report, _) = check_values(docs_example, None);
    assert_eq!(code, Some(1));
    assert_eq!(cut(&report), BTreeSet::from([APISERVER, SSH]));
    let api = &report["verdicts"][APISERVER as usize];
    assert_eq!(api["decided_by"], serde_json::json!(["egress"]));
    assert_eq!(api["matrix"]["row"], "apiserver");
    assert!(api["service"]["note"].as_str().unwrap().contains("172.18.0.2:6443"), "{api:#}");
    assert!(api["reason"].as_str().unwrap().contains("isolated for egress"), "{api:#}");
    assert!(
        api["fix"].as_str().unwrap().contains("172.18.0.2/32") && api["fix"].as_str().unwrap().contains("6443"),
        "{api:#}"
    );
    // Named ports in the chart's ingress rules resolve on the controller pod; the kubelet's probe
    // comes from the pod's own node.
    for i in [5, 6, 7, 8] {
        assert_eq!(report["verdicts"][i]["allowed"], true, "{:#}", report["verdicts"][i]);
    }
    assert_eq!(report["verdicts"][5]["sides"][0]["tier"], "own-node");
    assert_eq!(report["unexpected"], serde_json::json!([SSH]));

    // With the endpoint port the apiserver passes; only the unexpected flow is cut.
    let fixed = docs_example.replacen("port: 443}]", "port: 6443}]", 1);
    let (code, report, _) = check_values(&fixed, None);
    assert_eq!((code, cut(&report)), (Some(1), BTreeSet::from([SSH])));
}

#[test]
fn kubernetes_engine_ingress_from_knobs_restrict_sources() {
    let values = "
networkPolicy:
  enabled: true
  metrics: {from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}]}
  gate: {from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}]}
";
    let (code, report, _) = check_values(values, None);
    assert_eq!(code, Some(1));
    // Flagger (flagger-system) polls the gate: cut at the controller's ingress.
    assert_eq!(cut(&report), BTreeSet::from([8]));
    assert_eq!(report["verdicts"][8]["decided_by"], serde_json::json!(["ingress"]));
}

#[test]
fn cilium_engine_needs_the_apiserver_entity_and_real_dns_labels() {
    let cidr = "
networkPolicy:
  enabled: true
  engine: cilium
  egress:
    enabled: true
  cilium:
    egress:
      - toCIDR: [172.18.0.2/32]
        toPorts: [{ports: [{port: '6443', protocol: TCP}]}]
      - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: flux-system}}]
      - toFQDNs: [{matchName: s3.example.com}]
        toPorts: [{ports: [{port: '443', protocol: TCP}]}]
      - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: observability}}]
        toPorts: [{ports: [{port: '4317', protocol: TCP}]}]
";
    let (_, report, _) = check_values(cidr, None);
    assert_eq!(cut(&report), BTreeSet::from([APISERVER, SSH]));
    assert!(lint_codes(&report).contains("cilium-cidr-apiserver"), "{:#}", report["lint"]);
    assert!(report["verdicts"][APISERVER as usize]["fix"].as_str().unwrap().contains("kube-apiserver"));
    // S3 is allowed by the name the controller resolved.
    assert_eq!(report["verdicts"][S3 as usize]["allowed"], true);

    let entity = cidr.replace("- toCIDR: [172.18.0.2/32]", "- toEntities: [kube-apiserver]");
    let (_, report, _) = check_values(&entity, None);
    assert_eq!(cut(&report), BTreeSet::from([SSH]));
    assert!(!lint_codes(&report).contains("cilium-cidr-apiserver"));

    // DNS pods labelled otherwise than k8s-app=kube-dns: the chart's own DNS rule cuts DNS.
    let inv = std::fs::read_to_string(fixtures().join("cluster/inventory.yaml")).unwrap();
    let relabelled = inv.replace(
        "labels: {k8s-app: kube-dns, pod-template-hash: 5d78c9869d}",
        "labels: {k8s-app: coredns, pod-template-hash: 5d78c9869d}",
    );
    let relabelled = relabelled.replace("selector: {k8s-app: kube-dns}", "selector: {k8s-app: coredns}");
    let (_, report, _) = check_values(&entity, Some(&relabelled));
    assert_eq!(cut(&report), BTreeSet::from([0, SSH]));
    assert!(lint_codes(&report).contains("cilium-dns-selector-matches-nothing"), "{:#}", report["lint"]);
}

#[test]
fn calico_engine_opens_dns_everywhere_and_cuts_what_is_not_listed() {
    let values = "
networkPolicy:
  enabled: true
  engine: calico
  egress:
    enabled: true
  calico:
    egress:
      - {action: Allow, protocol: TCP, destination: {nets: [172.18.0.2/32], ports: [6443]}}
      - {action: Allow, protocol: TCP, destination: {namespaceSelector: \"kubernetes.io/metadata.name == 'flux-system'\"}}
      - {action: Allow, protocol: TCP, destination: {nets: [198.51.100.20/32], ports: [443]}}
";
    let (code, report, _) = check_values(values, None);
    assert_eq!(code, Some(1));
    assert_eq!(cut(&report), BTreeSet::from([OTLP, SSH]));
    assert!(lint_codes(&report).contains("calico-dns-any-destination"));
}

#[test]
fn cluster_network_policy_default_deny_covers_pods_only() {
    let values = "
networkPolicy:
  enabled: true
  engine: clusterNetworkPolicy
  defaultDeny: {enabled: true}
  egress:
    enabled: true
";
    let (_, report, _) = check_values(values, None);
    // The Baseline Deny to `namespaces: {}` cuts pods (source-controller, the OTLP collector) but
    // lets the apiserver, S3 and even the unexpected SSH flow through.
    assert_eq!(cut(&report), BTreeSet::from([SOURCE_CONTROLLER, OTLP]));
    let codes = lint_codes(&report);
    assert!(codes.contains("cnp-priority-range") && codes.contains("cnp-deny-pods-only"), "{codes:?}");
}

#[test]
fn lint_command_reports_the_charts_known_defects() {
    let dir = tempfile::tempdir().unwrap();
    let v = dir.path().join("values.yaml");
    std::fs::write(
        &v,
        "networkPolicy: {enabled: true, engine: cilium, defaultDeny: {enabled: true}, egress: {enabled: true}}\n",
    )
    .unwrap();
    let r = netaudit(&["lint", "--values", path(&v)]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stdout.contains("cilium-empty-list-enforces-nothing"), "{}", r.stdout);
    std::fs::write(&v, "networkPolicy: {enabled: true, engine: kubernetes, egress: {enabled: true}}\n").unwrap();
    let r = netaudit(&["lint", "--values", path(&v)]);
    assert_eq!((r.code, r.stdout.trim()), (Some(0), "no findings in 1 policies"), "{}", r.stderr);
}

#[test]
fn minimal_hand_written_flows_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let flows = dir.path().join("flows.json");
    std::fs::write(
        &flows,
        r#"{"version": 1, "flows": [
            {"protocol": "UDP", "src": {"ip": "10.0.0.5"}, "dst": {"ip": "10.0.0.10", "port": 53}},
            {"protocol": "TCP", "src": {"ip": "10.0.0.5"}, "dst": {"ip": "192.0.2.7", "port": 443}}
        ]}"#,
    )
    .unwrap();
    // No policy: nothing is cut.
    let r = netaudit(&["check", "--flows", path(&flows)]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.starts_with("OK: 0 of 2 flows cut"), "{}", r.stdout);
    // Egress on with only DNS: the audited address is taken for the chart's pod and the HTTPS flow is cut.
    let v = dir.path().join("values.yaml");
    std::fs::write(&v, "networkPolicy: {enabled: true, egress: {enabled: true, dns: false, to: [{ports: [{protocol: UDP, port: 53}]}]}}\n").unwrap();
    let r = netaudit(&["check", "--flows", path(&flows), "--values", path(&v), "--format", "json"]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    let report: Value = serde_json::from_str(&r.stdout).unwrap();
    let verdicts = report["verdicts"].as_array().unwrap();
    assert_eq!(verdicts.len(), 2);
    assert_eq!((verdicts[0]["index"].as_u64(), verdicts[0]["allowed"].as_bool()), (Some(0), Some(true)));
    assert_eq!((verdicts[1]["index"].as_u64(), verdicts[1]["allowed"].as_bool()), (Some(1), Some(false)));
    assert!(
        verdicts[1]["reason"]
            .as_str()
            .unwrap()
            .contains("isolated for egress by NetworkPolicy default/stageset-controller"),
        "{:#}",
        verdicts[1]
    );
    // Table output lists cut flows first.
    let r = netaudit(&["check", "--flows", path(&flows), "--values", path(&v)]);
    let first = r.stdout.lines().find(|l| l.starts_with("CUT ") || l.starts_with("ok ")).unwrap();
    assert!(first.starts_with("CUT   #1"), "{}", r.stdout);
}

#[test]
fn bad_input_exits_2_with_file_object_and_field_and_nothing_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = fixtures().join("cluster");
    let flows = cluster.join("flows.json");
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let bad_policy = write(
        "policy.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {}\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/40}}]\n",
    );
    let bad_yaml = write("broken.yaml", "networkPolicy:\n  enabled: [true\n");
    let bad_engine = write("engine.yaml", "networkPolicy: {enabled: true, engine: istio}\n");
    let bad_flows = write(
        "flows.json",
        r#"{"version": 1, "flows": [{"protocol": "TCP", "src": {"ip": "10.0.0.1"}, "dst": {"ip": "10.0.0.2", "port": 99999}}]}"#,
    );
    let bad_port = write(
        "port.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: a}\nspec: {ports: [{port: 0}]}\n",
    );
    let bad_matrix =
        write("matrix.yaml", "workload: x\nrows: [{id: a, direction: egress, peer: {kind: everywhere}}]\n");
    let f = path(&flows);
    for (args, want) in [
        (
            vec!["check", "--flows", f, "--policy", path(&bad_policy)],
            vec!["policy.yaml", "NetworkPolicy a/p", "spec.egress[0].to[0].ipBlock.cidr", "10.0.0.0/40"],
        ),
        (vec!["check", "--flows", f, "--values", path(&bad_yaml)], vec!["broken.yaml", "invalid YAML"]),
        (
            vec!["check", "--flows", f, "--values", path(&bad_engine)],
            vec!["engine.yaml", "networkPolicy.engine", "istio", "kubernetes, cilium, calico, clusterNetworkPolicy"],
        ),
        (vec!["check", "--flows", path(&bad_flows)], vec!["flows.json", "flows[0].dst.port"]),
        (
            vec!["check", "--flows", f, "--inventory", path(&bad_port)],
            vec!["port.yaml", "Service a/s", "spec.ports[0].port"],
        ),
        (vec!["check", "--flows", f, "--matrix", path(&bad_matrix)], vec!["matrix.yaml", "rows[0].peer"]),
        (vec!["check", "--flows", "/nonexistent/flows.json"], vec!["/nonexistent/flows.json"]),
        (
            vec!["check", "--flows", f, "--inventory", "/nonexistent/inv.yaml"],
            vec!["/nonexistent/inv.yaml", "cannot read"],
        ),
        (vec!["check", "--flows", f, "--format", "xml"], vec!["xml"]),
    ] {
        let r = netaudit(&args);
        assert_eq!(r.code, Some(2), "{args:?}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{args:?} printed to stdout: {}", r.stdout);
        for w in want {
            assert!(r.stderr.contains(w), "{args:?}: `{w}` missing from: {}", r.stderr);
        }
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    }
}

#[test]
fn hand_written_flows_take_their_direction_from_the_workload_with_or_without_values() {
    // The fixture's flows without their `direction`: as a new user writes them by hand.
    let cluster = fixtures().join("cluster");
    let mut file: Value = serde_json::from_str(&std::fs::read_to_string(cluster.join("flows.json")).unwrap()).unwrap();
    let recorded: Vec<Value> = file["flows"].as_array().unwrap().iter().map(|f| f["direction"].clone()).collect();
    for f in file["flows"].as_array_mut().unwrap() {
        f.as_object_mut().unwrap().remove("direction");
    }
    let dir = tempfile::tempdir().unwrap();
    let flows = dir.path().join("flows.json");
    std::fs::write(&flows, file.to_string()).unwrap();
    let values = dir.path().join("values.yaml");
    std::fs::write(&values, BASE).unwrap();
    let inv = cluster.join("inventory.yaml");
    let judged = |extra: &[&str]| {
        let mut args = vec!["check", "--flows", path(&flows), "--inventory", path(&inv), "--format", "json"];
        args.extend(extra);
        let r = netaudit(&args);
        assert!(r.code == Some(0) || r.code == Some(1), "{}", r.stderr);
        let report: Value = serde_json::from_str(&r.stdout).unwrap();
        let v = report["verdicts"].as_array().unwrap().clone();
        v.iter().map(|v| (v["direction"].clone(), v["matrix"]["row"].clone())).collect::<Vec<_>>()
    };
    for extra in [&[][..], &["--values", path(&values)]] {
        let verdicts = judged(extra);
        let directions: Vec<Value> = verdicts.iter().map(|(d, _)| d.clone()).collect();
        assert_eq!(directions, recorded, "{extra:?}: the values must not change who opened a connection");
        // The clients of the controller's ports are classified against its ingress rows.
        let rows: Vec<&str> = verdicts[5..9].iter().map(|(_, r)| r.as_str().unwrap_or("none")).collect();
        assert_eq!(rows, ["health", "webhook", "metrics", "gate"], "{extra:?}");
    }
}
