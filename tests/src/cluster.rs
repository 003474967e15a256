//! A private Kubernetes control plane for one test: the real etcd and kube-apiserver that
//! `cargo xtask cluster up` runs (the same code, `xtask::controlplane`), on loopback, with the
//! install bundle `deploy/netaudit.yaml` applied exactly as committed. Objects are written
//! through the API with kubectl, as a user would; what the missing controller-manager and kubelet
//! would write (ServiceAccounts, pod status) the test writes itself. The agent gets a token of
//! the bundle's ServiceAccount from the TokenRequest API, never admin credentials.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use xtask::controlplane::{Binaries, ControlPlane, workspace_root};

/// The bundle's namespace and ServiceAccount (deploy/netaudit.yaml).
pub const AGENT_NAMESPACE: &str = "netaudit";
pub const AGENT_SERVICE_ACCOUNT: &str = "netaudit-agent";
/// How the agent's requests are named in the audit log.
pub const AGENT_USER: &str = "system:serviceaccount:netaudit:netaudit-agent";

pub struct TestCluster {
    pub cp: ControlPlane,
    _dir: tempfile::TempDir,
}

impl TestCluster {
    /// Starts a private control plane and applies the bundle. Panics (the test fails) when the
    /// binaries are not built or the server does not come up.
    pub fn start() -> TestCluster {
        let bins = Binaries::require(&workspace_root()).unwrap_or_else(|e| panic!("{e:#}"));
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::start(&bins, &dir.path().join("cp")).unwrap_or_else(|e| panic!("{e:#}"));
        let cluster = TestCluster { cp, _dir: dir };
        cluster.kubectl(&["apply", "-f", workspace_root().join("deploy/netaudit.yaml").to_str().unwrap()]);
        cluster.wait_established(&["flowreports.netaudit.dev"]);
        cluster
    }

    /// Waits until each CRD is established (served). Polled: right after a create its status
    /// has no conditions yet, and `kubectl wait` (and a jsonpath filter) fail on that instead
    /// of waiting.
    pub fn wait_established(&self, crds: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let established = |crd: &str| {
            let v: Value = serde_json::from_str(&self.kubectl(&["get", "crd", crd, "-o", "json"])).unwrap();
            let conditions = v["status"]["conditions"].as_array().cloned().unwrap_or_default();
            conditions.iter().any(|c| c["type"] == "Established" && c["status"] == "True")
        };
        for crd in crds {
            while !established(crd) {
                assert!(Instant::now() < deadline, "CRD {crd} not established within 60 s");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    /// Runs kubectl as admin; panics with its stderr when it fails.
    pub fn kubectl(&self, args: &[&str]) -> String {
        self.kubectl_with_input(args, None)
    }

    pub fn kubectl_with_input(&self, args: &[&str], input: Option<&str>) -> String {
        let mut child = Command::new(&self.cp.bins.kubectl)
            .arg("--kubeconfig")
            .arg(self.cp.kubeconfig())
            .args(args)
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(input) = input {
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Writes `objects` by server-side apply, first the ServiceAccounts their pods name (the
    /// controller-manager makes `default`, a chart its own).
    pub fn apply(&self, objects: &[Value]) {
        let mut accounts: Vec<(String, String)> = Vec::new();
        for o in objects {
            let ns = o["metadata"]["namespace"].as_str().unwrap_or_default();
            if o["kind"] == "Namespace" {
                accounts.push((o["metadata"]["name"].as_str().unwrap().into(), "default".into()));
            } else if o["kind"] == "Pod" {
                let sa = o["spec"]["serviceAccountName"].as_str().unwrap_or("default");
                accounts.push((ns.into(), sa.into()));
            }
        }
        accounts.sort();
        accounts.dedup();
        let mut items: Vec<Value> = Vec::new();
        items.extend(objects.iter().filter(|o| o["kind"] == "Namespace").cloned());
        items.extend(accounts.iter().map(|(ns, name)| {
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}})
        }));
        items.extend(objects.iter().filter(|o| o["kind"] != "Namespace").cloned());
        let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
        self.kubectl_with_input(
            &["apply", "--server-side", "--field-manager=netaudit-test", "-f", "-"],
            Some(&list.to_string()),
        );
    }

    /// Sets a pod's status through the status subresource, as its kubelet would.
    pub fn set_pod_status(&self, namespace: &str, name: &str, status: Value) {
        let patch = json!({"status": status}).to_string();
        self.kubectl(&["patch", "pod", name, "-n", namespace, "--subresource=status", "--type=merge", "-p", &patch]);
    }

    /// One object as the server has it.
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Value {
        serde_json::from_str(&self.kubectl(&["get", resource, name, "-n", namespace, "-o", "json"])).unwrap()
    }

    /// Every object of `resource` (in `namespace`, or in all).
    pub fn objects(&self, resource: &str, namespace: Option<&str>) -> Vec<Value> {
        let mut args = vec!["get", resource, "-o", "json"];
        match namespace {
            Some(ns) => args.extend(["-n", ns]),
            None => args.push("-A"),
        }
        let list: Value = serde_json::from_str(&self.kubectl(&args)).unwrap();
        list["items"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until `pred` holds for the objects of `resource` and returns them.
    pub fn wait_for(
        &self,
        resource: &str,
        namespace: Option<&str>,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let objects = self.objects(resource, namespace);
            if pred(&objects) {
                return objects;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; {resource} now: {objects:#?}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Deletes a pod at once, as its kubelet confirms a finished termination.
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        self.kubectl(&["delete", "pod", name, "-n", namespace, "--grace-period=0", "--force", "--wait=true"]);
    }

    /// A kubeconfig for the agent: the bundle's ServiceAccount, a token from the TokenRequest API.
    pub fn agent_kubeconfig(&self, dir: &Path) -> PathBuf {
        self.agent_kubeconfig_via(dir, &self.cp.server)
    }

    /// The same, reaching the API server at `server` (e.g. through a [`crate::Partition`]).
    pub fn agent_kubeconfig_via(&self, dir: &Path, server: &str) -> PathBuf {
        let token = self.kubectl(&["create", "token", AGENT_SERVICE_ACCOUNT, "-n", AGENT_NAMESPACE, "--duration=2h"]);
        let path = dir.join("agent.kubeconfig");
        let config = json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "local", "cluster": {
                "server": server, "certificate-authority": self.cp.dir.join("ca.crt")}}],
            "users": [{"name": "agent", "user": {"token": token.trim()}}],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": "agent", "namespace": AGENT_NAMESPACE}}],
            "current-context": "local",
        });
        std::fs::write(&path, config.to_string()).unwrap();
        path
    }

    /// The audit log's events so far (one JSON object per request).
    pub fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.cp.audit_log())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The audit events of requests the agent made.
    pub fn agent_requests(&self) -> Vec<Value> {
        self.audit().into_iter().filter(|e| e["user"]["username"] == AGENT_USER).collect()
    }
}
