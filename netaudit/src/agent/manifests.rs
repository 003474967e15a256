//! The install bundle (`deploy/`), generated from one source: `netaudit manifests` prints it and a
//! test keeps the committed files equal to it. Every object is checked against its k8s-openapi
//! type by a lossless round trip (a misspelled field would be dropped by the type and caught).
//!
//! Least privilege: read-only on the kinds the agent watches, create/patch Events, write only its
//! own FlowReport resource; the DaemonSet runs unprivileged with the measured capabilities
//! ([`super::CAPABILITIES`]), a read-only root filesystem, hostPID (pod processes' /proc entries
//! and cgroup.procs speak host PIDs), and hostPaths for cgroup2, bpffs and its state.

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Namespace, ServiceAccount},
        networking::v1::NetworkPolicy,
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Value, json};

use super::CAPABILITIES;

/// The agent's own API group and resource, where it publishes each audited pod's flows.
pub const GROUP: &str = "netaudit.dev";
pub const FLOW_REPORTS: &str = "flowreports";
/// The agent's metrics and health port.
pub const METRICS_PORT: u16 = 9464;
const CHART: &str = crate::chart::CHART_NAME;
/// Where the agent keeps its state on the node (survives restarts and upgrades).
pub const STATE_DIR: &str = "/var/lib/netaudit";

#[derive(Clone, Debug)]
pub struct Options {
    pub namespace: String,
    pub image: String,
    /// The apiserver's endpoint addresses (CIDRs) and port, for the agent's own NetworkPolicy.
    pub apiserver_cidrs: Vec<String>,
    pub apiserver_port: u16,
    /// The namespace Prometheus scrapes from.
    pub metrics_from_namespace: String,
    /// The workloads to audit (`NAME=NAMESPACE/SELECTOR`, the agent's --target).
    pub targets: Vec<String>,
    /// learn or watch.
    pub mode: String,
    /// Watch mode: the chart's values (file contents), shipped as a ConfigMap and passed to
    /// `--values`, for judging against the chart's policy before it is applied.
    pub values: Option<String>,
}

/// Where the values ConfigMap is mounted in the agent's container.
const VALUES_DIR: &str = "/etc/netaudit";

impl Default for Options {
    fn default() -> Options {
        Options {
            namespace: "netaudit".into(),
            image: format!("ghcr.io/netaudit/netaudit:{}", env!("CARGO_PKG_VERSION")),
            apiserver_cidrs: vec!["0.0.0.0/0".into(), "::/0".into()],
            apiserver_port: 6443,
            metrics_from_namespace: "monitoring".into(),
            targets: vec![format!("{CHART}=stageset-system/app.kubernetes.io/name={CHART}")],
            mode: "learn".into(),
            values: None,
        }
    }
}

/// Checks `v` against the API type `T`: it must deserialize, and serialize back unchanged.
pub fn typed<T: DeserializeOwned + Serialize>(v: Value) -> anyhow::Result<Value> {
    let what = format!(
        "{} {}",
        v.get("kind").and_then(Value::as_str).unwrap_or("?"),
        v.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("?")
    );
    let t: T = serde_json::from_value(v.clone()).map_err(|e| anyhow::anyhow!("{what}: not a valid object: {e}"))?;
    let back = serde_json::to_value(&t)?;
    if back != v {
        anyhow::bail!("{what}: fields the API type does not know were dropped:\n  wrote {v}\n  typed {back}");
    }
    Ok(back)
}

/// One rule of the agent's ClusterRole.
pub struct Grant {
    pub group: &'static str,
    pub resources: &'static [&'static str],
    pub verbs: &'static [&'static str],
    /// Verbs granted that the least-privilege test (a real kube-apiserver's audit log of the
    /// agent's whole life) may not see used; why is said beside each.
    pub unexercised: &'static [&'static str],
}

const READ: &[&str] = &["list", "watch"];

/// The agent's ClusterRole: what it watches, what it writes. `tests/tests/agent_cluster.rs`
/// checks it against the audit log: the agent uses nothing more, and every grant is used or
/// listed in `unexercised` with its reason.
pub const GRANTS: &[Grant] = &[
    // The live inventory (reflectors: list + watch), and the node-local watch of target pods.
    Grant { group: "", resources: &["pods", "services", "namespaces", "nodes"], verbs: READ, unexercised: &[] },
    Grant { group: "discovery.k8s.io", resources: &["endpointslices"], verbs: READ, unexercised: &[] },
    Grant { group: "networking.k8s.io", resources: &["networkpolicies"], verbs: READ, unexercised: &[] },
    // The engines' policies, watched where their API is served.
    Grant {
        group: "cilium.io",
        resources: &["ciliumnetworkpolicies", "ciliumclusterwidenetworkpolicies"],
        verbs: READ,
        unexercised: &[],
    },
    Grant {
        group: "projectcalico.org",
        resources: &["networkpolicies", "globalnetworkpolicies"],
        verbs: READ,
        unexercised: &[],
    },
    Grant { group: "policy.networking.k8s.io", resources: &["clusternetworkpolicies"], verbs: READ, unexercised: &[] },
    // An engine installed later is noticed by its CRD (metadata-only watch on its name).
    Grant { group: "apiextensions.k8s.io", resources: &["customresourcedefinitions"], verbs: READ, unexercised: &[] },
    // Drift alerts: one Event created per alert (agent::events), never updated.
    Grant { group: "events.k8s.io", resources: &["events"], verbs: &["create"], unexercised: &[] },
    // FlowReports by server-side apply: a PATCH, which the server authorizes as `create` too
    // when the object does not exist yet (the audit log names only the PATCH).
    Grant { group: GROUP, resources: &[FLOW_REPORTS], verbs: &["create", "patch"], unexercised: &["create"] },
];

fn cluster_role_rules() -> Vec<Value> {
    GRANTS.iter().map(|g| json!({"apiGroups": [g.group], "resources": g.resources, "verbs": g.verbs})).collect()
}

pub fn bundle(o: &Options) -> anyhow::Result<Vec<Value>> {
    let ns = o.namespace.as_str();
    let name = "netaudit-agent";
    let labels = json!({"app.kubernetes.io/name": "netaudit", "app.kubernetes.io/component": "agent"});
    let mut out = vec![
        typed::<Namespace>(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}}),
        )?,
        typed::<ServiceAccount>(
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns, "labels": labels}}),
        )?,
        typed::<ClusterRole>(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name, "labels": labels},
            "rules": cluster_role_rules(),
        }))?,
        typed::<ClusterRoleBinding>(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
        }))?,
        typed::<CustomResourceDefinition>(flow_report_crd(&labels))?,
        typed::<DaemonSet>(daemonset(o, name, &labels))?,
    ];
    if let Some(values) = &o.values {
        out.push(typed::<ConfigMap>(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("{name}-values"), "namespace": ns, "labels": labels},
            "data": {"values.yaml": values},
        }))?);
    }
    out.push(typed::<NetworkPolicy>(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "podSelector": {"matchLabels": labels},
            "policyTypes": ["Ingress", "Egress"],
            // Only Prometheus scrapes; flow data is sensitive.
            "ingress": [{
                "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": o.metrics_from_namespace}}}],
                "ports": [{"protocol": "TCP", "port": METRICS_PORT}],
            }],
            // The apiserver only: watches, Events, FlowReports.
            "egress": [{
                "to": o.apiserver_cidrs.iter().map(|c| json!({"ipBlock": {"cidr": c}})).collect::<Vec<_>>(),
                "ports": [{"protocol": "TCP", "port": o.apiserver_port}],
            }],
        },
    }))?);
    Ok(out)
}

fn daemonset(o: &Options, name: &str, labels: &Value) -> Value {
    let volume = |n: &str, path: &str, type_: &str| json!({"name": n, "hostPath": {"path": path, "type": type_}});
    let mut ds = json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": name, "namespace": o.namespace, "labels": labels},
        "spec": {
            "selector": {"matchLabels": labels},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": name,
                    "hostPID": true,
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [{
                        "name": "agent",
                        "image": o.image,
                        "args": ["agent", "--state-dir", STATE_DIR, "--listen", format!("0.0.0.0:{METRICS_PORT}"), "--log-format", "json", "--log", "info"],
                        "env": [
                            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                            // NAME=NAMESPACE/LABEL-SELECTOR, `;` between targets.
                            {"name": "NETAUDIT_TARGETS", "value": o.targets.join(";")},
                            {"name": "NETAUDIT_MODE", "value": o.mode},
                        ],
                        "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 10},
                        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 30},
                        "resources": {
                            "requests": {"cpu": "50m", "memory": "64Mi"},
                            "limits": {"memory": "256Mi"},
                        },
                        "securityContext": {
                            "privileged": false,
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "runAsUser": 0,
                            "capabilities": {"drop": ["ALL"], "add": CAPABILITIES},
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "volumeMounts": [
                            {"name": "cgroup", "mountPath": "/sys/fs/cgroup", "readOnly": true},
                            {"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "HostToContainer"},
                            {"name": "state", "mountPath": STATE_DIR},
                            {"name": "tmp", "mountPath": "/tmp"},
                        ],
                    }],
                    "volumes": [
                        volume("cgroup", "/sys/fs/cgroup", "Directory"),
                        volume("bpffs", "/sys/fs/bpf", "DirectoryOrCreate"),
                        volume("state", STATE_DIR, "DirectoryOrCreate"),
                        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
                    ],
                },
            },
        },
    });
    if o.values.is_some() {
        let pod = &mut ds["spec"]["template"]["spec"];
        let c = &mut pod["containers"][0];
        push(&mut c["args"], json!(["--values", format!("{VALUES_DIR}/values.yaml")]));
        push(&mut c["volumeMounts"], json!([{"name": "values", "mountPath": VALUES_DIR, "readOnly": true}]));
        push(&mut pod["volumes"], json!([{"name": "values", "configMap": {"name": format!("{name}-values")}}]));
    }
    ds
}

fn push(list: &mut Value, more: Value) {
    if let (Some(l), Value::Array(m)) = (list.as_array_mut(), more) {
        l.extend(m);
    }
}

/// FlowReport: one per audited pod, the flows its node's agent recorded. Written only by the
/// agent, so its data sits at the top level (as in a PolicyReport); see `reports`.
fn flow_report_crd(labels: &Value) -> Value {
    let s = |t: &str| json!({"type": t});
    json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{FLOW_REPORTS}.{GROUP}"), "labels": labels},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": FLOW_REPORTS, "singular": "flowreport", "kind": "FlowReport", "shortNames": ["fr"]},
            "versions": [{
                "name": "v1alpha1", "served": true, "storage": true,
                "additionalPrinterColumns": [
                    {"name": "Pod", "type": "string", "jsonPath": ".pod"},
                    {"name": "Node", "type": "string", "jsonPath": ".node"},
                    {"name": "Target", "type": "string", "jsonPath": ".target"},
                    {"name": "Flows", "type": "integer", "jsonPath": ".flowCount"},
                    {"name": "Truncated", "type": "integer", "jsonPath": ".truncated"},
                    {"name": "Updated", "type": "date", "jsonPath": ".updated"},
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "required": ["pod", "node", "target", "flows"],
                    "properties": {
                        "apiVersion": s("string"), "kind": s("string"), "metadata": s("object"),
                        "pod": s("string"), "podUID": s("string"), "node": s("string"), "target": s("string"),
                        "updated": {"type": "string", "format": "date-time"},
                        "flowCount": s("integer"),
                        // Flows left out to keep the object under etcd's size limit.
                        "truncated": s("integer"),
                        // The flow file (model::FlowFile), as recorded.
                        "flows": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                    },
                }},
            }],
        },
    })
}

/// The bundle as one multi-document YAML file.
pub fn bundle_yaml(o: &Options) -> anyhow::Result<String> {
    let mut out = String::from(
        "# The netaudit agent's install bundle. Generated by `netaudit manifests`; do not edit by hand\n\
         # (a test keeps this file equal to the generator's output).\n",
    );
    for v in bundle(o)? {
        out += "---\n";
        out += &serde_saphyr::to_string(&v)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_object_is_its_api_type_and_unprivileged() {
        let objects = bundle(&Options::default()).unwrap();
        assert_eq!(objects.len(), 7);
        // Watch mode with the chart's values: a ConfigMap, mounted and passed to --values.
        let with_values = bundle(&Options {
            mode: "watch".into(),
            values: Some("networkPolicy: {enabled: true}\n".into()),
            ..Options::default()
        })
        .unwrap();
        let cm = with_values.iter().find(|o| o["kind"] == "ConfigMap").unwrap();
        assert_eq!(cm["data"]["values.yaml"], "networkPolicy: {enabled: true}\n");
        let ds = with_values.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
        let args = ds["spec"]["template"]["spec"]["containers"][0]["args"].as_array().unwrap();
        assert!(args.windows(2).any(|w| w[0] == "--values" && w[1] == "/etc/netaudit/values.yaml"), "{args:?}");
        let ds = objects.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
        let sc = &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"];
        assert_eq!(sc["privileged"], false);
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
        assert!(!sc["capabilities"]["add"].as_array().unwrap().contains(&json!("SYS_ADMIN")));
        // A misspelled field is caught.
        let bad =
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "x"}, "automountToken": false});
        assert!(typed::<ServiceAccount>(bad).unwrap_err().to_string().contains("dropped"));
    }
}
