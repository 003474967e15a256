//! `cargo xtask bench agent` (root): the agent's memory and start-up time against the size of the
//! cluster it watches, with an empty cluster as the baseline in the same run.
//!
//! A private real control plane (etcd + kube-apiserver, tests/src/cluster.rs, the bundle applied)
//! holds a synthetic cluster in the shape real objects have (pods with annotations, env, volumes
//! and their status written through the status subresource; Services with EndpointSlices;
//! NetworkPolicies), written once per size through the API. The real `netaudit agent` binary,
//! under the bundle's ServiceAccount, loads the real programs and watches it; its target matches
//! no pod, so what is measured is the inventory's cost. Figures:
//! time until `/readyz` answers (every first list arrived) and the agent's resident memory then
//! and 5 s later (VmRSS, VmHWM from /proc). Three rounds each; the median is printed.
//!
//! First, without a control plane, one look at a full flow map, in its two halves:
//! - judging: the synthetic cluster and 100 000 flows of `bench check` (tests/src/synthetic.rs),
//!   the judge in watch mode with the chart's values; one look with every flow new (the first
//!   look, or one after a policy change) against looks where 1 % of the flows are new;
//! - draining: a real capture of one lab pod that sent a datagram to each of 100 000
//!   (address, port) pairs, 1 % of them one more between looks; the drain (fold and map read),
//!   then the enrichment from the synthetic inventory (both ends known: the worst case) and the
//!   audited pods' list — the agent's own code for each (a pod's own flow file is made only
//!   when it is published).
//!
//! `netaudit-bench-agent look` stops after these (no control plane is started).

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use netaudit::{
    agent::{
        cluster::PodRef,
        drift::{Detector, Limits},
        judge::{Against, Generations, Judge},
        look::audited_pods,
    },
    capture::{Capture, CaptureConfig, Changed},
    chart::Values,
    inventory::Inventory,
    matrix::Matrix,
    policy,
};
use netaudit_tests::{
    Bpffs, DNS_V4, Lab, PEER_V4, POD_V4,
    cluster::TestCluster,
    free_ports, helper, http_get, netaudit_bin,
    synthetic::{FLOWS, Lcg, cluster as synthetic_cluster, doc, flows},
    test_cgroup,
};
use serde_json::{Value, json};

const SIZES: [usize; 3] = [0, 2_000, 10_000];
const ROUNDS: usize = 3;

fn cluster(pods: usize) -> Vec<Value> {
    let namespaces = (pods / 50).max(1);
    let mut out = Vec::new();
    for n in 0..namespaces {
        let ns = format!("ns-{n}");
        out.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}}}));
    }
    for i in 0..20 {
        out.push(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{i}")},
            "status": {"addresses": [{"type": "InternalIP", "address": format!("198.51.100.{i}")}]}}));
    }
    for i in 0..pods {
        let ns = format!("ns-{}", i % namespaces);
        let app = format!("app-{}", i % 500);
        let ip = format!("10.{}.{}.{}", 64 + i / 65536, (i / 256) % 256, i % 256);
        out.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": format!("{app}-{i:06}"), "namespace": ns,
                "labels": {"app": app, "pod-template-hash": "6b7d9c8f5"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x".repeat(1500)},
                "managedFields": [{"manager": "kube-controller-manager", "operation": "Update",
                    "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}}}, "f:spec": {"f:containers": {"x": "y".repeat(800)}}}}],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-6b7d9c8f5"), "uid": "u", "controller": true}],
            },
            "spec": {
                "nodeName": format!("node-{}", i % 20), "serviceAccountName": "default",
                "containers": [{"name": "main", "image": "registry.example.com/app:1.2.3",
                    "args": ["--log-level=info", "--metrics-addr=:8080"],
                    "env": (0..10).map(|e| json!({"name": format!("ENV_{e}"), "value": "value"})).collect::<Vec<_>>(),
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                    "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]}],
                "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}],
                "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
            },
            "status": {
                "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "qosClass": "Burstable",
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-24T00:00:00Z"}],
                "containerStatuses": [{"name": "main", "ready": true, "restartCount": 0, "image": "registry.example.com/app:1.2.3",
                    "imageID": "registry.example.com/app@sha256:0123456789abcdef", "containerID": "containerd://0123456789abcdef"}],
            },
        }));
    }
    for s in 0..pods / 10 {
        let ns = format!("ns-{}", s % namespaces);
        let name = format!("svc-{s}");
        // 10.97/16: inside the Service range, clear of 10.96.0.1 (`kubernetes`).
        out.push(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": format!("10.97.{}.{}", s / 250, s % 250 + 1), "selector": {"app": format!("app-{}", s % 500)},
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}]}}));
        out.push(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-abcde"), "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "endpoints": (0..3).map(|e| json!({"addresses": [format!("10.64.{}.{}", s % 256, e)], "conditions": {"ready": true}})).collect::<Vec<_>>(),
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}));
        out.push(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": format!("np-{s}"), "namespace": ns},
            "spec": {"podSelector": {"matchLabels": {"app": format!("app-{}", s % 500)}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 8080}]}]}}));
    }
    out
}

/// Writes the objects as a user and the missing kubelet would: the objects by server-side apply,
/// then pods' and nodes' status through the status subresource, in chunks.
fn write_cluster(cluster: &TestCluster, mut objects: Vec<Value>) {
    let mut statuses = Vec::new();
    for o in &mut objects {
        if matches!(o["kind"].as_str(), Some("Pod" | "Node"))
            && let Some(status) = o.as_object_mut().and_then(|m| m.remove("status"))
        {
            let mut s = json!({"apiVersion": o["apiVersion"], "kind": o["kind"], "metadata": {"name": o["metadata"]["name"]}, "status": status});
            if let Some(ns) = o["metadata"]["namespace"].as_str() {
                s["metadata"]["namespace"] = ns.into();
            }
            statuses.push(s);
        }
        // The server keeps its own record of who wrote what.
        if let Some(m) = o["metadata"].as_object_mut() {
            m.remove("managedFields");
        }
    }
    for chunk in objects.chunks(2_000) {
        cluster.apply(chunk);
    }
    for chunk in statuses.chunks(2_000) {
        let list = json!({"apiVersion": "v1", "kind": "List", "items": chunk}).to_string();
        cluster.kubectl_with_input(
            &["apply", "--server-side", "--subresource=status", "--field-manager=kubelet", "-f", "-"],
            Some(&list),
        );
    }
}

fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// (seconds to ready, RSS at ready, RSS 5 s later, peak RSS), KiB.
fn round(kubeconfig: &std::path::Path) -> (f64, u64, u64, u64) {
    let bpffs = Bpffs::mount();
    let state = tempfile::tempdir().unwrap();
    let (port, flows) = free_ports();
    let started = Instant::now();
    let mut child = Command::new(netaudit_bin())
        .args(["agent", "--node-name", "node-0", "--target", "bench=bench-target/app=none"])
        .arg("--pin-dir")
        .arg(bpffs.0.path().join("netaudit"))
        .arg("--state-dir")
        .arg(state.path())
        .args(["--listen", &format!("127.0.0.1:{port}"), "--flows-listen", &format!("127.0.0.1:{flows}")])
        .env("KUBECONFIG", kubeconfig)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while http_get(port, "/readyz").is_none() {
        assert!(started.elapsed() < Duration::from_secs(120), "the agent never became ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ready = started.elapsed().as_secs_f64();
    let at_ready = memory_kib(child.id(), "VmRSS:");
    std::thread::sleep(Duration::from_secs(5));
    let later = memory_kib(child.id(), "VmRSS:");
    let peak = memory_kib(child.id(), "VmHWM:");
    let _ = child.kill();
    let _ = child.wait();
    (ready, at_ready, later, peak)
}

fn median<T: PartialOrd + Copy>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// One look's judging at a full flow map: every flow new, against 1 % new. Returns the medians
/// (seconds).
fn looks() -> (f64, f64, usize) {
    let mut rng = Lcg(42);
    let (inventory, rest) = Inventory::from_documents(synthetic_cluster(&mut rng)).unwrap();
    let (policies, _) = policy::from_documents(rest).unwrap();
    let base = flows(&mut rng);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("values.yaml");
    std::fs::write(&p, "networkPolicy: {enabled: true, egress: {enabled: true}}\n").unwrap();
    let values = Values::load(&p).unwrap();
    let (mut full, mut incremental) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS as u64 {
        let mut judge = Judge::new(Some(values.clone()), Matrix::default_matrix(), Detector::new(Limits::default()));
        let against = Against { inventory: &inventory, policies: &policies, generations: Generations::default() };
        let t = Instant::now();
        let first = Changed { seq: 1, flows: None };
        judge.look(&base, Some(&first), against, std::iter::empty(), Instant::now()).unwrap();
        full.push(t.elapsed().as_secs_f64());
        for step in 1..=3u64 {
            // 1 % of the flows grew (new packets): judged again; the rest keep their verdicts.
            // The capture says which (as the agent's looks have it).
            let mut file = base.clone();
            let grown: Vec<usize> = (((round * 3 + step) % 100) as usize..FLOWS).step_by(100).collect();
            for &i in &grown {
                file.flows[i].packets += step;
            }
            let changed = Changed { seq: 1 + step, flows: Some(grown) };
            let t = Instant::now();
            let look = judge.look(&file, Some(&changed), against, std::iter::empty(), Instant::now()).unwrap();
            incremental.push(t.elapsed().as_secs_f64());
            assert_eq!(look.judged, FLOWS / 100);
        }
    }
    (median(full), median(incremental), policies.len())
}

/// The synthetic inventory, plus pods at the lab's two addresses (so enrichment names both ends
/// of every drained flow).
fn inventory_with_lab() -> Inventory {
    let mut documents = synthetic_cluster(&mut Lcg(42));
    for (name, ip) in [("audited", POD_V4), ("peer", PEER_V4)] {
        documents.push(doc(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "lab", "labels": {"app": name}},
            "spec": {"nodeName": "node-0", "containers": [{"name": "c"}]}, "status": {"podIP": ip}})));
    }
    Inventory::from_documents(documents).unwrap().0
}

/// One look's drain, and its enrichment, at FLOWS flows in the real kernel. Returns
/// the medians (seconds).
fn drains() -> (f64, f64) {
    let inventory = inventory_with_lab();
    let lab = Lab::new().unwrap();
    let cg = test_cgroup().unwrap();
    let max_flows = (FLOWS as u32).next_power_of_two();
    let mut capture =
        Capture::start(&CaptureConfig { max_flows, ..CaptureConfig::new(vec![cg.path.clone()]) }).unwrap();
    let send = |ip: &str, base: usize, n: usize| {
        helper(&lab.pod, Some(&cg.path), &["udp-ports", ip, &base.to_string(), &n.to_string()])
            .unwrap()
            .finish()
            .unwrap();
    };
    // One datagram to each of FLOWS (address, port) pairs: as many flows.
    for ip in [PEER_V4, DNS_V4] {
        send(ip, 1000, FLOWS / 2);
    }
    let cgroup = capture.snapshot().unwrap().sources[0].cgroup.clone();
    let pod =
        PodRef { target: "bench".into(), namespace: "lab".into(), name: "audited".into(), uid: "u".into(), qos: None };
    let audited = BTreeMap::from([(cgroup, pod)]);
    let (mut drain, mut split) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS * 3 {
        // 1 % of the flows grow by a datagram.
        send(PEER_V4, 1000 + round * FLOWS / 100, FLOWS / 100);
        let t = Instant::now();
        let file = capture.snapshot().unwrap();
        drain.push(t.elapsed().as_secs_f64());
        assert!(file.flows.len() >= FLOWS, "{} flows drained", file.flows.len());
        let t = Instant::now();
        let mut file = file;
        inventory.enrich(&mut file);
        let pods = audited_pods(&audited);
        split.push(t.elapsed().as_secs_f64());
        let own = file.flows.iter().filter(|f| f.cgroup.as_deref() == Some(pods[0].cgroups[0].as_str())).count();
        assert_eq!(own, file.flows.len(), "every flow is the audited pod's");
    }
    (median(drain), median(split))
}

fn main() {
    let (full, incremental, policies) = looks();
    println!(
        "netaudit agent: one look at {FLOWS} flows (medians: {ROUNDS} looks with every flow new, {} with 1 %)",
        ROUNDS * 3
    );
    println!("  judging, {policies} policies: every flow new (first look, or a policy change) {:>8.1} ms", full * 1e3);
    println!("  judging: 1 % of the flows new or grown                               {:>8.1} ms", incremental * 1e3);
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the agent benchmark loads eBPF programs: run it as root (cargo xtask bench agent)");
        std::process::exit(2);
    }
    let (drain, split) = drains();
    println!("  drain from the kernel (fold, flow map read, decode)                  {:>8.1} ms", drain * 1e3);
    println!("  enrichment from the inventory, audited pods                          {:>8.1} ms", split * 1e3);
    println!(
        "  one look with 1 % new: drain + enrichment + judging                  {:>8.1} ms",
        (drain + split + incremental) * 1e3
    );
    println!();
    if std::env::args().nth(1).as_deref() == Some("look") {
        return;
    }
    println!("netaudit agent: start-up and memory vs. cluster size (median of {ROUNDS})");
    println!(
        "{:>8} {:>9} {:>10} {:>12} {:>13} {:>11}",
        "pods", "objects", "ready s", "RSS ready", "RSS +5 s", "peak RSS"
    );
    for pods in SIZES {
        let objects = cluster(pods);
        let n = objects.len();
        let cluster = TestCluster::start();
        let written = Instant::now();
        write_cluster(&cluster, objects);
        eprintln!("({pods} pods: {n} objects written through the API in {:.0?})", written.elapsed());
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = cluster.agent_kubeconfig(dir.path());
        let rounds: Vec<_> = (0..ROUNDS).map(|_| round(&kubeconfig)).collect();
        let mib = |k: u64| format!("{:.1} MiB", k as f64 / 1024.0);
        println!(
            "{pods:>8} {n:>9} {:>10.2} {:>12} {:>13} {:>11}",
            median(rounds.iter().map(|r| r.0).collect()),
            mib(median(rounds.iter().map(|r| r.1).collect())),
            mib(median(rounds.iter().map(|r| r.2).collect())),
            mib(median(rounds.iter().map(|r| r.3).collect())),
        );
    }
}
