//! `propose`'s guarantees, for every engine, on the fixture cluster (kube-dns behind a ClusterIP,
//! the apiserver behind `kubernetes` on 6443, source-controller on 9090 behind port 80, Prometheus
//! and Flagger in their own namespaces, an external S3 with a DNS name, an OTLP collector):
//! the proposal admits every expected flow it came from, every non-required rule is needed by
//! some flow, unexpected flows are listed and not allowlisted, and the output names the apiserver
//! by endpoint (or entity) and uses target ports.

use std::{collections::BTreeSet, path::Path, process::Command};

use netaudit::{
    chart::{Chart, Release, Values},
    check::Check,
    inventory::Inventory,
    matrix::Matrix,
    model::FlowFile,
    policy::{self, Engine},
    propose::{self, Options, Peer, Proposal, render},
};
use netaudit_tests::{fixtures, netaudit_bin};

const VALUES: &str = "
rollbackStore: {backend: s3, s3: {endpoint: s3.example.com, bucket: rollbacks}}
controller: {tracing: {endpoint: otel-collector.observability.svc:4317}}
";
const SSH: usize = 9;

struct Fixture {
    inv: Inventory,
    flows: FlowFile,
    chart: Chart,
    matrix: Matrix,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let cluster = fixtures().join("cluster");
    let (inv, _) = Inventory::load(&cluster.join("inventory.yaml")).unwrap();
    let flows = FlowFile::read(&cluster.join("flows.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("values.yaml");
    std::fs::write(&p, VALUES).unwrap();
    let values = Values::load(&p).unwrap();
    let release = Release { name: "ssc".into(), namespace: "stageset-system".into() };
    Fixture { inv, flows, chart: Chart { values, release }, matrix: Matrix::default_matrix(), _dir: dir }
}

fn proposal(fx: &Fixture, engine: Engine, include_unexpected: bool) -> Proposal {
    let opts = Options { engine, include_unexpected, aggregate: None };
    propose::propose(&fx.flows, &fx.inv, Some(&fx.chart), &fx.matrix, &opts).unwrap()
}

/// Indexes of the flows the proposal (minus rule `skip`) cuts, checked as the chart renders it.
fn cut_by(fx: &Fixture, p: &Proposal, skip: Option<usize>) -> BTreeSet<usize> {
    let docs = render::manifests(p, &fx.chart.values, skip).unwrap();
    let (policies, rest) = policy::from_documents(docs).unwrap();
    assert!(rest.is_empty());
    let values = fx.chart.values.with_overrides(render::values(p, skip)).unwrap();
    let chart = Chart { values, release: fx.chart.release.clone() };
    let check = Check { inventory: &fx.inv, policies: &policies, chart: Some(&chart), matrix: &fx.matrix };
    let report = check.run(&fx.flows).unwrap();
    report.verdicts.iter().filter(|v| !v.allowed).map(|v| v.index).collect()
}

#[test]
fn every_engine_admits_what_was_seen_and_nothing_is_superfluous() {
    let fx = fixture();
    for engine in Engine::ALL {
        let p = proposal(&fx, engine, false);
        assert_eq!(p.unexpected.iter().map(|u| u.index).collect::<Vec<_>>(), [SSH], "{engine}");
        // Nothing expected is cut; the unexpected flow is not allowlisted.
        assert_eq!(cut_by(&fx, &p, None), BTreeSet::from([SSH]), "{engine}: the proposal cuts an expected flow");
        // Minimal: every rule but the required ones is needed by some flow.
        for (i, r) in p.egress.iter().enumerate() {
            if r.required {
                continue;
            }
            let cut = cut_by(&fx, &p, Some(i));
            assert!(cut.len() > 1, "{engine}: rule {i} ({:?}) can go without cutting anything", r.peer);
        }
        // With --include-unexpected the SSH flow is admitted too.
        let all = proposal(&fx, engine, true);
        assert_eq!(cut_by(&fx, &all, None), BTreeSet::new(), "{engine}");
    }
}

#[test]
fn apiserver_by_endpoint_target_ports_and_nothing_broader() {
    let fx = fixture();
    let p = proposal(&fx, Engine::Kubernetes, false);
    let api = &p.egress[0];
    assert!(api.required);
    assert_eq!(api.peer, Peer::Apiserver { addresses: vec!["172.18.0.2".parse().unwrap()] });
    assert_eq!(api.ports.iter().map(|x| x.port).collect::<Vec<_>>(), [6443]);
    let sc = p.egress.iter().find(|r| r.rows.contains(&"source-controller".to_string())).unwrap();
    assert_eq!(sc.ports.iter().map(|x| x.port).collect::<Vec<_>>(), [9090], "target port, not the Service's 80");
    match &sc.peer {
        Peer::Pods { namespace, labels } => {
            assert_eq!(namespace, "flux-system");
            assert_eq!(labels.keys().collect::<Vec<_>>(), ["app"], "no pod-template-hash in a selector");
        }
        other => panic!("{other:?}"),
    }
    let s3 = p.egress.iter().find(|r| r.rows.contains(&"s3-rollback-store".to_string())).unwrap();
    assert_eq!(
        s3.peer,
        Peer::Addresses { nets: vec!["198.51.100.20/32".parse().unwrap()], names: vec!["s3.example.com".into()] }
    );
    // Ingress: Prometheus's and Flagger's namespaces; webhook and health stay open, with reasons.
    let port = |n: &str| p.ingress.iter().find(|i| i.name == n).unwrap();
    assert!(!port("metrics").open && !port("gate").open);
    assert!(port("webhook").open && port("webhook").why.contains("apiserver"));
    assert!(port("health").open && port("health").why.contains("kubelet"));

    for engine in Engine::ALL {
        let p = proposal(&fx, engine, false);
        let yaml = render::values_yaml(&p).unwrap();
        let manifests = render::manifests_yaml(&render::manifests(&p, &fx.chart.values, None).unwrap()).unwrap();
        for text in [&yaml, &manifests] {
            let allow_all = text.matches("0.0.0.0/0").count();
            // Only ClusterNetworkPolicy's final Deny names everything, and it denies.
            let expected = usize::from(engine == Engine::ClusterNetworkPolicy);
            assert_eq!(allow_all, expected, "{engine}: {text}");
        }
        match engine {
            Engine::Kubernetes => {
                assert!(
                    yaml.contains("    to:\n") && yaml.contains("cidr: 172.18.0.2/32") && yaml.contains("port: 6443"),
                    "{yaml}"
                );
            }
            Engine::Cilium => {
                assert!(yaml.contains("  cilium:\n    egress:\n") && yaml.contains("kube-apiserver"), "{yaml}");
                assert!(yaml.contains("matchName: s3.example.com"), "{yaml}");
                assert!(!yaml.contains("172.18.0.2/32"), "Cilium never matches the apiserver by CIDR: {yaml}");
            }
            Engine::Calico => {
                assert!(yaml.contains("  calico:\n    egress:\n") && yaml.contains("dns: false"), "{yaml}");
                assert!(yaml.contains("k8s-app == 'kube-dns'"), "DNS narrowed to the DNS pods: {yaml}");
            }
            Engine::ClusterNetworkPolicy => {
                assert!(yaml.contains("  clusterNetworkPolicy:\n    egress:\n") && yaml.contains("networks"), "{yaml}");
            }
        }
    }
}

#[test]
fn manifests_are_valid_api_objects() {
    let fx = fixture();
    for engine in Engine::ALL {
        let p = proposal(&fx, engine, false);
        let docs = render::manifests(&p, &fx.chart.values, None).unwrap();
        assert!(!docs.is_empty());
        for d in &docs {
            if engine == Engine::Kubernetes {
                let np: k8s_openapi::api::networking::v1::NetworkPolicy =
                    serde_json::from_value(d.value.clone()).unwrap();
                assert_eq!(np.metadata.namespace.as_deref(), Some("stageset-system"));
            }
        }
        // Every object parses back through the evaluator's own readers (types, CIDRs, ports).
        let text = render::manifests_yaml(&docs).unwrap();
        let values = netaudit::input::parse_values(&text).unwrap();
        let reparsed: Vec<_> =
            values.into_iter().map(|value| netaudit::input::Document { origin: "out".into(), value }).collect();
        let (policies, rest) = policy::from_documents(reparsed).unwrap();
        assert!(rest.is_empty() && policies.iter().all(|p| p.id.engine == engine), "{engine}");
    }
}

#[test]
fn aggregation_only_when_asked() {
    let fx = fixture();
    let mut flows = fx.flows.clone();
    let mut extra = flows.flows[3].clone();
    extra.dst.ip = "198.51.100.21".parse().unwrap();
    extra.dst.names = vec![];
    flows.flows.push(extra);
    let run = |aggregate| {
        let opts = Options { engine: Engine::Kubernetes, include_unexpected: false, aggregate };
        propose::propose(&flows, &fx.inv, Some(&fx.chart), &fx.matrix, &opts).unwrap()
    };
    let nets = |p: &Proposal| -> Vec<String> {
        p.egress
            .iter()
            .filter_map(|r| match &r.peer {
                Peer::Addresses { nets, .. } => Some(nets.iter().map(|n| n.to_string())),
                _ => None,
            })
            .flatten()
            .collect()
    };
    assert_eq!(nets(&run(None)), ["198.51.100.20/32", "198.51.100.21/32"]);
    assert_eq!(nets(&run(Some("prefix=24".parse().unwrap()))), ["198.51.100.0/24"]);
    assert_eq!(nets(&run(Some("prefix=24,min=3".parse().unwrap()))), ["198.51.100.20/32", "198.51.100.21/32"]);
    assert!("prefix=0".parse::<propose::Aggregate>().is_err());
}

#[test]
fn cli_output_is_deterministic_and_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = fixtures().join("cluster");
    let values = dir.path().join("values.yaml");
    std::fs::write(&values, VALUES).unwrap();
    let out = dir.path().join("proposal.yaml");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let args = |fmt: &str| {
        vec![
            "propose".to_string(),
            "--flows".into(),
            s(&cluster.join("flows.json")),
            "--inventory".into(),
            s(&cluster.join("inventory.yaml")),
            "--values".into(),
            s(&values),
            "--engine".into(),
            "cilium".into(),
            "--format".into(),
            fmt.into(),
        ]
    };
    let first = Command::new(netaudit_bin()).args(args("values")).output().unwrap();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let second = Command::new(netaudit_bin()).args(args("values")).output().unwrap();
    assert_eq!(first.stdout, second.stdout);
    let mut with_out = args("manifests");
    with_out.extend(["--output".into(), s(&out)]);
    let r = Command::new(netaudit_bin()).args(&with_out).output().unwrap();
    assert!(r.status.success() && r.stdout.is_empty(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(std::fs::read_to_string(&out).unwrap().contains("kind: CiliumNetworkPolicy"));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "no temporary file left behind");
    // Bad input: exit 2, the output file untouched.
    for (flag, value, want) in [("--aggregate", "prefix=0", "never /0"), ("--engine", "istio", "not an engine")] {
        let mut a = args("values");
        a.retain(|x| x != "--engine" && x != "cilium");
        a.extend([flag.into(), value.into(), "--output".into(), s(&out)]);
        let r = Command::new(netaudit_bin()).args(&a).output().unwrap();
        assert_eq!(r.status.code(), Some(2), "{flag} {value}");
        assert!(String::from_utf8_lossy(&r.stderr).contains(want), "{}", String::from_utf8_lossy(&r.stderr));
        assert!(std::fs::read_to_string(&out).unwrap().contains("kind: CiliumNetworkPolicy"));
    }
}

#[test]
fn the_printed_values_read_back_as_the_proposals_values() {
    let fx = fixture();
    for engine in Engine::ALL {
        for include_unexpected in [false, true] {
            let p = proposal(&fx, engine, include_unexpected);
            let text = render::values_yaml(&p).unwrap();
            let docs = netaudit::input::parse_values(&text).unwrap();
            assert_eq!(docs.len(), 1, "{engine}: {text}");
            assert_eq!(docs[0], render::values(&p, None), "{engine}: the comments must not change the values:\n{text}");
        }
    }
}
