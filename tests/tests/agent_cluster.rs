//! `netaudit agent` end to end against a real control plane (etcd + kube-apiserver, started
//! privately for the test by tests/src/cluster.rs) with the install bundle applied as committed:
//! the agent runs under the bundle's ServiceAccount and ClusterRole, with a token from the
//! TokenRequest API. The target pod's cgroup is a real kubelet-layout cgroup holding a real
//! process that makes real connections:
//!
//! - the agent finds the pod through a node-local watch (the replica on another node is left
//!   alone), attaches to its cgroup, records its flows and enriches them with identities;
//! - in watch mode a flow the chart's policy cuts raises a `FlowCut` Event on the pod, one the
//!   matrix does not expect an `UnexpectedFlow` Event, each with a metric and a JSON log line;
//!   the pod's FlowReport is published by server-side apply (and accepted by the CRD's schema);
//! - SIGKILL mid-recording loses nothing: connections made while no agent ran are counted when
//!   the next one resumes;
//! - `netaudit report` and `propose --from-cluster` read the FlowReports back through the API;
//! - a deleted pod is detached; SIGTERM leaves the pins; `agent --cleanup` removes them.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use netaudit::{
    agent::cgroups::{Driver, QosClass, pod_path},
    model::FlowFile,
};
use netaudit_tests::{
    Bpffs, KubeletTree, Lab, PEER_V4, PEER_V6, POD_V4, Partition, cluster::TestCluster, fixtures, free_ports, helper,
    http_get, netaudit_bin, require_kernel, start_peer_services,
};
use serde_json::{Value, json};

const POD: &str = "ssc-stageset-controller-6b7d9-q2w3e";
const OTHER_REPLICA: &str = "ssc-stageset-controller-6b7d9-zzzzz";
const NS: &str = "stageset-system";
const NODE: &str = "worker";

/// The test cluster's objects (tests/fixtures/cluster) written through the API, with the
/// controller pod running here (on the lab's address, in a cgroup the test makes from the UID
/// the server gave it) and source-controller as the lab's peer. Returns the pod's UID.
fn install_cluster(cluster: &TestCluster) -> String {
    let docs = netaudit::input::read_objects(&fixtures().join("cluster/inventory.yaml")).unwrap();
    let (mut objects, mut node_status) = (Vec::new(), Vec::new());
    for d in docs {
        let mut v = d.value;
        match (v["kind"].as_str().unwrap(), v["metadata"]["name"].as_str().unwrap()) {
            // The apiserver owns the `kubernetes` Service; kube-root-ca.crt is the controller-manager's.
            ("Service", "kubernetes") | ("ConfigMap", _) => continue,
            ("Pod", POD) => {
                // A second replica on the other node: another agent's business.
                let mut other = v.clone();
                other["metadata"]["name"] = OTHER_REPLICA.into();
                other["spec"]["nodeName"] = "cp".into();
                objects.push(other);
            }
            _ => {}
        }
        // Pods' and Nodes' status is the kubelet's: written through the subresource below.
        if let Some(status) = v.as_object_mut().and_then(|m| m.remove("status"))
            && v["kind"] == "Node"
        {
            node_status.push((v["metadata"]["name"].as_str().unwrap().to_string(), status));
        }
        objects.push(v);
    }
    cluster.apply(&objects);
    for (node, status) in node_status {
        let patch = json!({"status": status}).to_string();
        cluster.kubectl(&["patch", "node", &node, "--subresource=status", "--type=merge", "-p", &patch]);
    }
    let running = |ip: &str| json!({"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]});
    cluster.set_pod_status(NS, POD, running(POD_V4));
    cluster.set_pod_status(NS, OTHER_REPLICA, running("10.244.0.9"));
    cluster.set_pod_status("flux-system", "source-controller-7c9f8d-xyz12", running(PEER_V4));
    for (ns, name, ip) in [
        ("kube-system", "coredns-5d78c9869d-abcde", "10.244.0.2"),
        ("monitoring", "prometheus-0", "10.244.1.20"),
        ("flagger-system", "flagger-6d8f-abc", "10.244.0.30"),
        ("observability", "otel-collector-0", "10.244.1.40"),
    ] {
        cluster.set_pod_status(ns, name, running(ip));
    }
    let pod = cluster.get("pod", NS, POD);
    // The server computed the QoS class from the requests: the cgroup below must agree.
    assert_eq!(pod["status"]["qosClass"], "Burstable", "{pod:#}");
    pod["metadata"]["uid"].as_str().unwrap().to_string()
}

fn wait<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The value of a metric line starting with `series` (`name{labels}`).
fn metric(port: u16, series: &str) -> Option<f64> {
    http_get(port, "/metrics")?.lines().find(|l| l.starts_with(series))?.rsplit(' ').next()?.parse().ok()
}

struct Agent {
    child: Child,
    metrics: u16,
    flows: u16,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the agent with JSON logs appended to `log`.
fn start_agent(kubeconfig: &Path, args: &[&str], log: &Path) -> Agent {
    let (metrics, flows) = free_ports();
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let child = Command::new(netaudit_bin())
        .arg("agent")
        .args(args)
        .args(["--listen", &format!("127.0.0.1:{metrics}"), "--flows-listen", &format!("127.0.0.1:{flows}")])
        .args(["--log", "info", "--log-format", "json"])
        .env("KUBECONFIG", kubeconfig)
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Agent { child, metrics, flows }
}

/// The flow to the peer's port 80 in the agent's /flows.
fn peer_flow(agent: &Agent) -> Option<Value> {
    let file: Value = serde_json::from_str(&http_get(agent.flows, "/flows")?).ok()?;
    file["flows"].as_array()?.iter().find(|f| f["dst"]["ip"] == PEER_V4 && f["dst"]["port"] == 80).cloned()
}

/// One audited pod on node `worker`, its real cgroup and network namespace, a private control
/// plane holding the test cluster, and the agent's arguments (watch mode against `values`).
struct Setup {
    lab: Lab,
    _peer: netaudit_tests::Actor,
    container: std::path::PathBuf,
    cluster: TestCluster,
    kubeconfig: std::path::PathBuf,
    pins: std::path::PathBuf,
    state: std::path::PathBuf,
    log: std::path::PathBuf,
    args: Vec<String>,
    /// The agent reaches the API server through it.
    partition: Partition,
    // Dropped last: the cgroups, the bpffs and the directory outlive every process using them.
    tree: KubeletTree,
    _bpffs: Bpffs,
    _dir: tempfile::TempDir,
}

impl Setup {
    /// `values`: the chart's values to judge by besides the live policies (`--values`).
    fn new(values: Option<&str>) -> Setup {
        let lab = Lab::new().unwrap();
        let peer = start_peer_services(&lab).unwrap();
        let cluster = TestCluster::start();
        let uid = install_cluster(&cluster);
        let tree = KubeletTree::new("api");
        let pod_dir = tree.mkdir(&pod_path(Driver::Systemd, QosClass::Burstable, &uid));
        let container = tree.mkdir(&pod_dir.strip_prefix(&tree.root).unwrap().join("cri-containerd-aaaa1111.scope"));
        let dir = tempfile::tempdir().unwrap();
        let partition = Partition::start(([127, 0, 0, 1], cluster.cp.apiserver_port).into());
        let kubeconfig = cluster.agent_kubeconfig_via(dir.path(), &format!("https://127.0.0.1:{}", partition.port));
        let bpffs = Bpffs::mount();
        let pins = bpffs.0.path().join("netaudit");
        let state = dir.path().join("state");
        let path = |p: &Path| p.to_str().unwrap().to_string();
        let mut args: Vec<String> = [
            "--node-name",
            NODE,
            "--target",
            "ssc=stageset-system/app.kubernetes.io/name=stageset-controller",
            "--mode",
            "watch",
            "--cgroup-root",
            &path(&tree.root),
            "--pin-dir",
            &path(&pins),
            "--state-dir",
            &path(&state),
            "--interval",
            "1s",
            "--report-interval",
            "1s",
        ]
        .map(String::from)
        .to_vec();
        if let Some(values) = values {
            let file = dir.path().join("values.yaml");
            std::fs::write(&file, values).unwrap();
            args.extend(["--values".into(), path(&file)]);
        }
        Setup {
            log: dir.path().join("agent.log"),
            lab,
            _peer: peer,
            container,
            cluster,
            kubeconfig,
            pins,
            state,
            args,
            partition,
            tree,
            _bpffs: bpffs,
            _dir: dir,
        }
    }

    fn start_agent(&self) -> Agent {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        start_agent(&self.kubeconfig, &args, &self.log)
    }

    /// `n` TCP connections from the pod to the peer's port 80.
    fn connect(&self, n: &str) {
        helper(&self.lab.pod, Some(&self.container), &["tcp", &format!("{PEER_V4}:80"), n]).unwrap().finish().unwrap();
    }

    /// One UDP request/response from the pod to `addr`.
    fn udp(&self, addr: &str) {
        helper(&self.lab.pod, Some(&self.container), &["udp", addr, "1"]).unwrap().finish().unwrap();
    }

    fn wait_attached(&self, agent: &Agent) {
        wait("the agent to attach to the pod", Duration::from_secs(30), || {
            (metric(agent.metrics, "netaudit_attached_pods{target=\"ssc\"}")? == 1.0).then_some(())
        });
    }
}

impl Drop for Setup {
    /// A failed test shows what the agent said (its warnings and errors), for CI's log.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let said: Vec<&str> = log.lines().filter(|l| !l.contains("\"level\":\"INFO\"")).collect();
            eprintln!(
                "--- the agent's warnings and errors ({}):\n{}",
                self.log.display(),
                said[said.len().saturating_sub(40)..].join("\n")
            );
        }
    }
}

/// The chart's policy with egress on: DNS only, so the connection to the peer is cut.
const EGRESS_DNS_ONLY: &str = "networkPolicy: {enabled: true, egress: {enabled: true}}\n";

#[test]
fn the_agent_audits_target_pods_through_the_api_alerts_publishes_and_survives_sigkill() {
    if !require_kernel() {
        return;
    }
    let s = Setup::new(Some(EGRESS_DNS_ONLY));
    // One engine's CRD comes later: the agent's CRD watch must notice it (least privilege below
    // sees every grant used).
    install_engine_crds(&s.cluster, LATER_CRD);
    let agent = s.start_agent();
    s.wait_attached(&agent);
    node_local_discovery(&s);
    late_cgroup(&s, &agent);
    recorded_and_enriched(&s, &agent);
    watch_mode_alerts_and_report(&s, &agent);
    let agent = sigkill_and_resume(&s, agent);
    cluster_wide_view(&s);
    detach_sigterm_cleanup(&s, agent);
    // Least privilege, measured on the real server's audit log of all of the above.
    assert_least_privilege(&s.cluster);
}

/// The engine CRD the main scenario installs while the agent runs.
const LATER_CRD: &str = "policy.networking.k8s.io_clusternetworkpolicies.yaml";

/// Discovery through the API: this node's replica is attached, the other node's is not; a CRD
/// installed now is watched.
fn node_local_discovery(s: &Setup) {
    let (cluster, log) = (&s.cluster, &s.log);
    // 1. Discovery through the API: this node's replica is attached, the other node's is not.
    let watches: Vec<String> = cluster
        .agent_requests()
        .iter()
        .filter(|e| e["verb"] == "watch" && e["objectRef"]["resource"] == "pods")
        .filter_map(|e| e["requestURI"].as_str().map(String::from))
        .collect();
    assert!(
        watches.iter().any(|r| r.starts_with("/api/v1/namespaces/stageset-system/pods?")
            && r.contains("fieldSelector=spec.nodeName%3Dworker")
            && r.contains("labelSelector=app.kubernetes.io%2Fname%3Dstageset-controller")),
        "a node-local, label-selected watch: {watches:#?}"
    );
    assert!(
        cluster.objects("flowreports", Some(NS)).iter().all(|r| r["metadata"]["name"] != OTHER_REPLICA),
        "the other node's replica is not audited here"
    );
    cluster.kubectl(&["apply", "--server-side", "-f", &shared_crd(LATER_CRD)]);
    wait("the agent to watch ClusterNetworkPolicies", Duration::from_secs(30), || {
        std::fs::read_to_string(log)
            .ok()
            .filter(|l| l.contains("ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2) is served"))
    });
}

/// A pod whose cgroup appears only after its object (the kubelet is slower than the API): not
/// attached until then, attached once it exists; deleted, it is detached.
fn late_cgroup(s: &Setup, agent: &Agent) {
    let attached = || metric(agent.metrics, "netaudit_attached_pods{target=\"ssc\"}");
    let mut late = s.cluster.get("pod", NS, POD);
    let meta = late["metadata"].as_object_mut().unwrap();
    meta.retain(|k, _| ["name", "namespace", "labels"].contains(&k.as_str()));
    meta.insert("name".into(), "ssc-late".into());
    late.as_object_mut().unwrap().remove("status");
    s.cluster.apply(&[late]);
    s.cluster.set_pod_status(NS, "ssc-late", json!({"phase": "Running", "podIP": "10.244.1.77"}));
    let uid = s.cluster.get("pod", NS, "ssc-late")["metadata"]["uid"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(attached(), Some(1.0), "no cgroup yet: not attached");
    s.tree.mkdir(&pod_path(Driver::Systemd, QosClass::Burstable, &uid));
    wait("the late pod to be attached", Duration::from_secs(10), || (attached()? == 2.0).then_some(()));
    s.cluster.delete_pod(NS, "ssc-late");
    wait("the late pod to be detached", Duration::from_secs(10), || (attached()? == 1.0).then_some(()));
}

/// Real traffic, recorded and enriched.
fn recorded_and_enriched(s: &Setup, agent: &Agent) {
    // 2. Real traffic, recorded and enriched: TCP to the peer's port 80 (a source-controller port
    // in the matrix) and UDP to its port 7 (no matrix row: unexpected).
    s.connect("2");
    helper(&s.lab.pod, Some(&s.container), &["udp", &format!("{PEER_V4}:7"), "1"]).unwrap().finish().unwrap();
    let flow =
        wait("the flow in /flows", Duration::from_secs(20), || peer_flow(agent).filter(|f| f["connections"] == 2));
    assert_eq!(flow["direction"], "egress");
    assert_eq!(flow["src"]["identity"]["name"], POD, "{flow:#}");
    assert_eq!(flow["dst"]["identity"]["kind"], "pod");
    assert_eq!(flow["dst"]["identity"]["namespace"], "flux-system");
    assert!(http_get(agent.flows, &format!("/flows/{NS}/{POD}")).is_some(), "per-pod flows");
    assert!(http_get(agent.metrics, "/flows").is_none(), "flows are not on the metrics port");
}

/// Watch mode: Events, metrics, the structured log line, the FlowReport.
fn watch_mode_alerts_and_report(s: &Setup, agent: &Agent) {
    let (cluster, log) = (&s.cluster, &s.log);
    // 3. Watch mode: the cut flow raises an Event on the pod, a metric, and a FlowReport appears.
    let events = cluster.wait_for(EVENTS, Some(NS), "a FlowCut Event", Duration::from_secs(20), |evs| {
        evs.iter().any(|e| e["reason"] == "FlowCut" && e["regarding"]["name"] == POD)
    });
    let cut = events.iter().find(|e| e["reason"] == "FlowCut" && e["note"].as_str().unwrap().contains(":80")).unwrap();
    assert_eq!(cut["type"], "Warning");
    assert!(cut["note"].as_str().unwrap().contains(&format!("{PEER_V4}:80")), "{cut:#}");
    assert!(metric(agent.metrics, "netaudit_alerts_total{target=\"ssc\",kind=\"cut\"}").unwrap() >= 1.0);
    let events = cluster.wait_for(EVENTS, Some(NS), "an UnexpectedFlow Event", Duration::from_secs(20), |evs| {
        evs.iter().any(|e| e["reason"] == "UnexpectedFlow" && e["regarding"]["name"] == POD)
    });
    let unexpected: Vec<&Value> = events.iter().filter(|e| e["reason"] == "UnexpectedFlow").collect();
    assert_eq!(unexpected.len(), 1, "only the UDP flow is unexpected: {unexpected:#?}");
    assert!(
        unexpected[0]["note"].as_str().unwrap().contains(&format!("UDP {POD_V4} -> {PEER_V4}:7")),
        "{unexpected:#?}"
    );
    assert!(metric(agent.metrics, "netaudit_alerts_total{target=\"ssc\",kind=\"unexpected\"}").unwrap() >= 1.0);
    // The log line is structured: one JSON object with the alert's fields.
    let logs = std::fs::read_to_string(log).unwrap();
    let line: Value = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["fields"]["alert"] == "Cut")
        .unwrap_or_else(|| panic!("a JSON drift line in {logs}"));
    assert_eq!(line["level"], "WARN");
    assert_eq!(line["fields"]["pod"], format!("{NS}/{POD}"));
    assert_eq!(line["fields"]["flow"], format!("egress TCP {POD_V4} -> {PEER_V4}:80"));
    let reports = cluster.wait_for("flowreports", Some(NS), "the pod's FlowReport", Duration::from_secs(20), |rs| {
        rs.iter().any(|r| r["metadata"]["name"] == POD && r["flowCount"].as_u64() >= Some(1))
    });
    // Only this node's pods have reports (the controller, and the late pod audited before).
    let names: std::collections::BTreeSet<&str> =
        reports.iter().filter_map(|r| r["metadata"]["name"].as_str()).collect();
    assert_eq!(names, [POD, "ssc-late"].into(), "only this node's pods have a report");
    assert!(reports.iter().all(|r| r["metadata"]["labels"]["netaudit.dev/node"] == NODE), "{reports:#?}");
}

/// SIGKILL mid-recording; the next agent resumes without losing or repeating anything.
fn sigkill_and_resume(s: &Setup, agent: Agent) -> Agent {
    let (cluster, state) = (&s.cluster, &s.state);
    // 4. SIGKILL mid-recording; the pod keeps talking while no agent runs; the next agent resumes.
    // (Killed between raising an alert and saving that it did, an agent raises it again: an
    // alert repeated beats an alert lost. So the kill waits for the record.)
    wait("the judged flows to be saved", Duration::from_secs(20), || {
        std::fs::read_to_string(state.join("agent-seen.json")).ok().filter(|s| s.contains(PEER_V4))
    });
    drop(agent);
    s.connect("3");
    let agent = s.start_agent();
    s.wait_attached(&agent);
    let flow =
        wait("the resumed flow", Duration::from_secs(30), || peer_flow(&agent).filter(|f| f["connections"] == 5));
    assert_eq!(flow["packets_from_src"].as_u64().map(|p| p > 0), Some(true));
    // The flow was judged before the kill: the next agent does not raise it again.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(cut_events(cluster), 1, "one Event for one cut flow, across the restart");
    cluster.wait_for("flowreports", Some(NS), "the updated FlowReport", Duration::from_secs(20), |rs| {
        rs.iter().any(|r| {
            r["flows"]["flows"]
                .as_array()
                .is_some_and(|fs| fs.iter().any(|f| f["dst"]["ip"] == PEER_V4 && f["connections"] == 5))
        })
    });

    agent
}

/// `report`, `propose --from-cluster` and `check --from-cluster` through the API.
fn cluster_wide_view(s: &Setup) {
    let cluster = &s.cluster;
    // 5. The cluster-wide view through the API.
    let out = Command::new(netaudit_bin())
        .args(["report", "--namespace", NS, "--target", "ssc"])
        .env("KUBECONFIG", cluster.cp.kubeconfig())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let merged = FlowFile::parse(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert!(merged.flows.iter().any(|f| f.dst.ip.to_string() == PEER_V4 && f.connections == 5), "{merged:#?}");
    let out = Command::new(netaudit_bin())
        .args(["propose", "--from-cluster", "--target", "ssc", "--engine", "kubernetes", "--namespace", NS])
        .env("KUBECONFIG", cluster.cp.kubeconfig())
        .output()
        .unwrap();
    let proposal = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(proposal.contains("flux-system"), "the peer is proposed by its namespace: {proposal}");
    // "Would these values cut what the agents saw?" in one command: exit 1, the flow named.
    let values = s.args.iter().skip_while(|a| *a != "--values").nth(1).unwrap();
    let out = Command::new(netaudit_bin())
        .args(["check", "--from-cluster", "--target", "ssc", "--namespace", NS, "--values", values])
        .env("KUBECONFIG", cluster.cp.kubeconfig())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{table}{}", String::from_utf8_lossy(&out.stderr));
    assert!(table.lines().any(|l| l.starts_with("CUT") && l.contains(PEER_V4) && l.contains("/80")), "{table}");
}

/// The pod goes (detached, links unpinned); SIGTERM keeps the pins; `--cleanup` removes them.
fn detach_sigterm_cleanup(s: &Setup, agent: Agent) {
    let (cluster, pins, state) = (&s.cluster, &s.pins, &s.state);
    // 6. The pod goes: detached, its link pins released.
    let links = pins.join(format!("v{}", netaudit_ebpf::LAYOUT_VERSION)).join("links");
    assert!(std::fs::read_dir(&links).unwrap().count() > 0);
    cluster.delete_pod(NS, POD);
    wait("the agent to detach", Duration::from_secs(20), || {
        (metric(agent.metrics, "netaudit_attached_pods{target=\"ssc\"}")? == 0.0).then_some(())
    });
    assert_eq!(std::fs::read_dir(&links).unwrap().count(), 0, "links of a gone pod are unpinned");

    // 7. SIGTERM: a clean exit that keeps the recording pinned; --cleanup removes it.
    let mut agent = agent;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGTERM) };
    let status = agent.child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(pins.join(format!("v{}", netaudit_ebpf::LAYOUT_VERSION)).join("maps").join("FLOWS").exists());
    let ok = Command::new(netaudit_bin())
        .args(["agent", "--cleanup", "--pin-dir", pins.to_str().unwrap(), "--state-dir", state.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(ok.success());
    assert!(!pins.join(format!("v{}", netaudit_ebpf::LAYOUT_VERSION)).exists());
}

/// Every engine's published CRD (../shared/crds) but `except`, so the agent watches every kind.
fn install_engine_crds(cluster: &TestCluster, except: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/crds");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml") && !p.ends_with(except));
    files.sort();
    for f in &files {
        cluster.kubectl(&["apply", "--server-side", "-f", f.to_str().unwrap()]);
    }
    let crds = cluster.kubectl(&["get", "crd", "-o", "name"]);
    let names: Vec<&str> =
        crds.lines().map(|l| l.trim_start_matches("customresourcedefinition.apiextensions.k8s.io/")).collect();
    cluster.wait_established(&names);
}

/// (verb, API group, resource[/subresource]).
type Access = (String, String, String);

/// What the agent asked the API server for, from the audit log; panics on a refused request.
fn agent_access(cluster: &TestCluster) -> std::collections::BTreeSet<Access> {
    let mut used = std::collections::BTreeSet::new();
    for e in cluster.agent_requests() {
        let code = e["responseStatus"]["code"].as_u64().unwrap_or(0);
        assert_ne!(code, 403, "the agent was refused a request: {e:#}");
        let Some(r) = e["objectRef"]["resource"].as_str() else { continue };
        let resource = match e["objectRef"]["subresource"].as_str() {
            Some(sub) => format!("{r}/{sub}"),
            None => r.to_string(),
        };
        let group = e["objectRef"]["apiGroup"].as_str().unwrap_or_default().to_string();
        used.insert((e["verb"].as_str().unwrap().to_string(), group, resource));
    }
    used
}

/// What the committed bundle's ClusterRole grants, one (verb, group, resource) each.
fn granted() -> std::collections::BTreeSet<Access> {
    let bundle = netaudit::input::read_objects(&xtask::controlplane::workspace_root().join("deploy/netaudit.yaml"));
    let role = bundle.unwrap().into_iter().find(|d| d.value["kind"] == "ClusterRole").unwrap().value;
    let strings =
        |v: &Value| -> Vec<String> { v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect() };
    let mut out = std::collections::BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        for g in strings(&rule["apiGroups"]) {
            for r in strings(&rule["resources"]) {
                for v in strings(&rule["verbs"]) {
                    out.insert((v, g.clone(), r.clone()));
                }
            }
        }
    }
    out
}

/// Least privilege, measured: the agent used only what its ClusterRole grants (the server
/// refused nothing), and every grant was used or is one the bundle's generator says why it
/// keeps (`agent::manifests::GRANTS`, `unexercised`).
fn assert_least_privilege(cluster: &TestCluster) {
    let used = agent_access(cluster);
    let granted = granted();
    let beyond: Vec<&Access> = used.difference(&granted).collect();
    assert!(beyond.is_empty(), "the agent used what its ClusterRole does not grant: {beyond:#?}");
    let justified: std::collections::BTreeSet<Access> = netaudit::agent::manifests::GRANTS
        .iter()
        .flat_map(|g| {
            g.unexercised
                .iter()
                .flat_map(move |v| g.resources.iter().map(move |r| (v.to_string(), g.group.to_string(), r.to_string())))
        })
        .collect();
    let unused: Vec<&Access> = granted.difference(&used).filter(|a| !justified.contains(*a)).collect();
    assert!(unused.is_empty(), "granted but never used (and not justified in GRANTS): {unused:#?}\nused: {used:#?}");
}

/// The controller's egress policy, live in the cluster: DNS, and (when `allow_peer`) the
/// source-controller pods' port 80.
fn egress_policy(allow_peer: bool) -> Value {
    let ns = |name: &str| json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}});
    let dns_ports = json!([{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]);
    let mut egress = vec![json!({"to": [ns("kube-system")], "ports": dns_ports})];
    if allow_peer {
        egress.push(json!({"to": [ns("flux-system")], "ports": [{"protocol": "TCP", "port": 80}]}));
    }
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "ssc-egress", "namespace": NS},
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "stageset-controller"}},
            "policyTypes": ["Egress"],
            "egress": egress,
        },
    })
}

/// Events with `reason` whose note names `flow` (e.g. `2001:db8::2:7` or `192.0.2.2:80`).
fn events_for(cluster: &TestCluster, reason: &str, flow: &str) -> usize {
    cluster
        .objects(EVENTS, Some(NS))
        .iter()
        .filter(|e| e["reason"] == reason && e["note"].as_str().is_some_and(|n| n.contains(flow)))
        .count()
}

/// The connections of the peer flow in the pod's FlowReport.
fn reported_connections(cluster: &TestCluster) -> Option<u64> {
    let report = cluster.objects("flowreports", Some(NS)).into_iter().find(|r| r["metadata"]["name"] == POD)?;
    report["flows"]["flows"].as_array()?.iter().find(|f| f["dst"]["ip"] == PEER_V4)?["connections"].as_u64()
}

fn ready(agent: &Agent) -> bool {
    http_get(agent.metrics, "/readyz").is_some()
}

/// The agent's lists of NetworkPolicies so far (the first, and every relist after a 410).
fn policy_lists(cluster: &TestCluster) -> usize {
    let requests = cluster.agent_requests();
    requests.iter().filter(|e| e["verb"] == "list" && e["objectRef"]["resource"] == "networkpolicies").count()
}

/// The control plane misbehaves under a running agent: kube-apiserver restarted mid-recording;
/// then a minute without the API (a partition), during which the live policy changes, etcd is
/// compacted and kube-apiserver restarts again, so the agent's watches resume from expired
/// resourceVersions (410 Gone) and must relist. Recording never stops, no flow is lost, no
/// alert is repeated, alerts raised while the API was away are delivered after, `/readyz` says
/// when the API is away, and the FlowReport catches up.
#[test]
fn the_agent_rides_out_apiserver_restarts_compaction_and_a_minute_without_the_api() {
    if !require_kernel() {
        return;
    }
    let mut s = Setup::new(None);
    s.cluster.apply(&[egress_policy(true)]);
    let agent = s.start_agent();
    s.wait_attached(&agent);
    s.connect("2");
    // An unexpected flow (no matrix row for UDP 7), also cut by the policy: two alerts.
    let v4_udp = format!("{PEER_V4}:7");
    s.udp(&v4_udp);
    s.cluster.wait_for(EVENTS, Some(NS), "the UDP flow's alerts", Duration::from_secs(30), |evs| {
        let n = |reason: &str| evs.iter().filter(|e| e["reason"] == reason).count();
        n("UnexpectedFlow") == 1 && n("FlowCut") == 1
    });
    wait("the FlowReport", Duration::from_secs(20), || (reported_connections(&s.cluster)? == 2).then_some(()));

    // 1. kube-apiserver restarts; the pod talks meanwhile.
    s.cluster.cp.stop_apiserver();
    s.connect("1");
    s.udp(&v4_udp);
    s.cluster.cp.start_apiserver().unwrap();
    wait("the FlowReport after the restart", Duration::from_secs(60), || {
        (reported_connections(&s.cluster)? == 3).then_some(())
    });
    wait("/readyz after the restart", Duration::from_secs(30), || ready(&agent).then_some(()));
    assert_eq!(events_for(&s.cluster, "FlowCut", ":80"), 0, "the policy allows the peer");
    assert_eq!(events_for(&s.cluster, "UnexpectedFlow", &v4_udp), 1, "no alert repeated across the restart");

    // 2. A minute without the API: recording goes on, /readyz says why not.
    let outage = Instant::now();
    s.partition.cut();
    wait("/readyz to say the API is away", Duration::from_secs(20), || (!ready(&agent)).then_some(()));
    s.connect("1");
    // A new unexpected flow while the API is away: its Events wait for it.
    // (Events name it as `2001:db8::2:7`, the traffic helper takes `[2001:db8::2]:7`.)
    let v6_udp = format!("{PEER_V6}:7");
    s.udp(&format!("[{PEER_V6}]:7"));
    wait("the flow recorded while the API is away", Duration::from_secs(20), || {
        peer_flow(&agent).filter(|f| f["connections"] == 4)
    });
    // Meanwhile the policy changes (the peer is cut now), etcd forgets the history the agent's
    // watches would resume from, and kube-apiserver restarts with a fresh watch cache.
    s.cluster.apply(&[egress_policy(false)]);
    let revision = s.cluster.cp.compact_etcd().unwrap();
    s.cluster.cp.restart_apiserver().unwrap();
    std::thread::sleep(Duration::from_secs(60).saturating_sub(outage.elapsed()));
    assert!(!ready(&agent), "still not ready while the API is away");
    let lists_before = policy_lists(&s.cluster);
    s.partition.heal();
    wait("/readyz again", Duration::from_secs(30), || ready(&agent).then_some(()));

    // The watches expired and were relisted: the new policy is the one judged by. (The server
    // answers a watch resumed from before the compaction with a 410 Gone ERROR event inside
    // the stream, audited as 200; kube's watcher relists only on that.) After a minute of
    // failures its backoff (30 s, with as much jitter again) may hold the next try for a minute.
    wait(&format!("a relist of NetworkPolicies (etcd compacted at {revision})"), Duration::from_secs(120), || {
        (policy_lists(&s.cluster) > lists_before).then_some(())
    });
    s.connect("1");
    let cut = format!("{PEER_V4}:80");
    s.cluster.wait_for(EVENTS, Some(NS), "the cut under the new policy", Duration::from_secs(30), |evs| {
        evs.iter().any(|e| e["reason"] == "FlowCut" && e["note"].as_str().is_some_and(|n| n.contains(&cut)))
    });
    // The alert raised while the API was away arrived; none twice.
    s.cluster.wait_for(EVENTS, Some(NS), "the alert raised during the outage", Duration::from_secs(30), |evs| {
        evs.iter().any(|e| e["reason"] == "UnexpectedFlow" && e["note"].as_str().is_some_and(|n| n.contains(&v6_udp)))
    });
    assert_eq!(events_for(&s.cluster, "UnexpectedFlow", &v4_udp), 1);
    assert_eq!(events_for(&s.cluster, "UnexpectedFlow", &v6_udp), 1);
    assert_eq!(events_for(&s.cluster, "FlowCut", &cut), 1);
    // Nothing lost: every connection counted, and the report caught up.
    wait("the FlowReport to catch up", Duration::from_secs(30), || {
        (reported_connections(&s.cluster)? == 5).then_some(())
    });
    assert_eq!(peer_flow(&agent).unwrap()["connections"], 5);

    // The live policy, read back from the API, judges and lints the agents' flows the same way.
    let netaudit = |args: &[&str]| {
        let out =
            Command::new(netaudit_bin()).args(args).env("KUBECONFIG", s.cluster.cp.kubeconfig()).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, table, err) = netaudit(&["check", "--from-cluster", "--namespace", NS, "--target", "ssc"]);
    assert_eq!(code, Some(1), "{table}{err}");
    assert!(table.contains("NetworkPolicy stageset-system/ssc-egress"), "{table}");
    // Lint reads the same live policies: this one and the bundle's own (netaudit-agent).
    let (code, out, err) = netaudit(&["lint", "--from-cluster"]);
    assert_eq!((code, out.as_str()), (Some(0), "no findings in 2 policies\n"), "{err}");
}

/// The FlowReport limits against the real server: a pod with thousands of flows gets a report
/// the server accepts (schema, request size, etcd's object limit), holding the busiest flows and
/// saying how many it left out; the same report with every flow is refused by that server, so
/// the truncation is needed, not cautious; `netaudit report` counts what was left out as lost.
#[test]
fn the_largest_flow_report_is_accepted_and_truncation_holds_against_the_real_limits() {
    if !require_kernel() {
        return;
    }
    const FLOWS: u16 = 6000;
    let s = Setup::new(None);
    let agent = s.start_agent();
    s.wait_attached(&agent);
    // One datagram to each of FLOWS ports of the peer: as many distinct flows.
    helper(&s.lab.pod, Some(&s.container), &["udp-ports", PEER_V4, "20000", &FLOWS.to_string()])
        .unwrap()
        .finish()
        .unwrap();
    let report = wait("a truncated FlowReport", Duration::from_secs(60), || {
        let r = s.cluster.objects("flowreports", Some(NS)).into_iter().find(|r| r["metadata"]["name"] == POD)?;
        (r["flowCount"].as_u64()? >= u64::from(FLOWS)).then_some(r)
    });
    let kept = report["flows"]["flows"].as_array().unwrap().len() as u64;
    let truncated = report["truncated"].as_u64().unwrap();
    assert!(truncated > 0, "{FLOWS} flows do not fit one report");
    assert_eq!(kept + truncated, report["flowCount"].as_u64().unwrap(), "every flow is kept or counted");
    let stored = serde_json::to_string(&report).unwrap().len();
    assert!(stored < 1536 * 1024, "the stored object ({stored} bytes) is within etcd's 1.5 MiB");

    // Every flow in one object: the real server refuses it.
    let all: Value = serde_json::from_str(&http_get(agent.flows, &format!("/flows/{NS}/{POD}")).unwrap()).unwrap();
    let mut full = report.clone();
    full["metadata"] = json!({"name": "every-flow", "namespace": NS});
    full["flows"] = all;
    full["truncated"] = 0.into();
    let out = Command::new(&s.cluster.cp.bins.kubectl)
        .arg("--kubeconfig")
        .arg(s.cluster.cp.kubeconfig())
        .args(["create", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(full.to_string().as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a report of every flow ({} bytes) was accepted", full.to_string().len());
    assert!(err.contains("too large") || err.contains("Too Large"), "{err}");

    // The consumer is told.
    let out = Command::new(netaudit_bin())
        .args(["report", "--namespace", NS, "--target", "ssc"])
        .env("KUBECONFIG", s.cluster.cp.kubeconfig())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let merged = FlowFile::parse(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(merged.flows.len() as u64, kept);
    assert!(merged.losses.flows >= truncated, "truncated flows count as lost: {:?}", merged.losses);
}

/// The engines' CRDs as published (../shared/crds).
fn shared_crd(file: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/crds").join(file).to_str().unwrap().to_string()
}

/// No engine's CRDs at start; Cilium's installed while the agent runs: it notices the CRD,
/// watches the kind, and judges by a CiliumNetworkPolicy the real server accepted.
#[test]
fn an_engine_installed_later_is_picked_up_and_judged_by() {
    if !require_kernel() {
        return;
    }
    let s = Setup::new(None);
    let cluster = &s.cluster;
    let agent = s.start_agent();
    s.wait_attached(&agent);
    s.connect("1");
    wait("the flow in /flows", Duration::from_secs(20), || peer_flow(&agent).filter(|f| f["connections"] == 1));
    // No policy anywhere: nothing is cut.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(cut_events(cluster), 0, "no policy, no cut");
    let logs = std::fs::read_to_string(&s.log).unwrap();
    assert!(logs.contains("CiliumNetworkPolicy (cilium.io/v2) is not served here"), "{logs}");

    // Cilium's CRD as published; server-side: its schema is too large for the last-applied annotation.
    cluster.kubectl(&["apply", "--server-side", "-f", &shared_crd("cilium.io_ciliumnetworkpolicies.yaml")]);
    cluster.wait_established(&["ciliumnetworkpolicies.cilium.io"]);
    // Egress of the controller to cluster DNS only: the connection to the peer is cut.
    let cnp = json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "ssc-dns-only", "namespace": NS},
        "spec": {
            "endpointSelector": {"matchLabels": {"app.kubernetes.io/name": "stageset-controller"}},
            "egress": [{
                "toEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "kube-system", "k8s-app": "kube-dns"}}],
                "toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}]}],
            }],
        },
    });
    cluster.apply(&[cnp]);
    wait("the agent to watch the new kind", Duration::from_secs(30), || {
        std::fs::read_to_string(&s.log).ok().filter(|l| l.contains("CiliumNetworkPolicy (cilium.io/v2) is served"))
    });
    // The flow grows: judged again, now under the Cilium policy.
    s.connect("1");
    let events =
        cluster.wait_for(EVENTS, Some(NS), "a FlowCut Event under the Cilium policy", Duration::from_secs(30), |evs| {
            evs.iter().any(|e| e["reason"] == "FlowCut")
        });
    let cut = events.iter().find(|e| e["reason"] == "FlowCut").unwrap();
    assert!(cut["note"].as_str().unwrap().contains("ssc-dns-only"), "{cut:#}");
}

/// The Events the agent writes (events.k8s.io/v1: `regarding`, `note`).
const EVENTS: &str = "events.events.k8s.io";

/// FlowCut Events for the flow to the peer's port 80.
fn cut_events(cluster: &TestCluster) -> usize {
    cluster
        .objects(EVENTS, Some(NS))
        .iter()
        .filter(|e| e["reason"] == "FlowCut" && e["note"].as_str().is_some_and(|n| n.contains(":80")))
        .count()
}

#[test]
fn bad_agent_configuration_exits_2_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(netaudit_bin()).arg("agent").args(args).env_remove("NODE_NAME").output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run(&["--node-name", "w"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--target NAME=NAMESPACE/SELECTOR"), "{err}");
    let (code, err) = run(&["--target", "ssc=ns/app=x"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("NODE_NAME"), "{err}");
    let config = dir.path().join("agent.yaml");
    std::fs::write(&config, "targets:\n- {name: ssc, namespace: ns, selector: app=x}\nreport-intervall: 5s\n").unwrap();
    let (code, err) = run(&["--node-name", "w", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("agent.yaml") && err.contains("report-intervall"), "{err}");
    let (code, err) = run(&["--node-name", "w", "--target", "ssc=ns/app=x", "--values", "/nonexistent/values.yaml"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--mode watch"), "{err}");
}
