//! The chart's `networkpolicy.yaml` template, per engine, in memory (../shared/CHART.md): one
//! policy for the controller's pods, plus the optional default deny for the namespace.

use serde_json::{Value, json};

use super::{CHART_NAME, Release, Values, values::NetworkPolicyValues};
use crate::{
    input::Document,
    inventory::{Labels, NAMESPACE_NAME_LABEL},
    model::DNS_PORT,
    policy::{Engine, cilium},
};

/// What every engine's template reads.
struct Template<'a> {
    np: &'a NetworkPolicyValues,
    engine: Engine,
    name: String,
    namespace: &'a str,
    labels: Labels,
    /// The enabled ingress ports: (name, number).
    ports: Vec<(&'static str, u16)>,
    egress: bool,
    dns: bool,
}

impl Template<'_> {
    fn types(&self) -> Value {
        if self.egress { json!(["Ingress", "Egress"]) } else { json!(["Ingress"]) }
    }

    fn passthrough(&self) -> (&[Value], &[Value]) {
        self.np.passthrough(self.engine)
    }
}

pub(super) fn render(v: &Values, release: &Release) -> Vec<Document> {
    let np = &v.chart.network_policy;
    if !np.enabled {
        return Vec::new();
    }
    let t = Template {
        np,
        engine: np.engine,
        name: v.fullname(release),
        namespace: &release.namespace,
        labels: v.selector_labels(release),
        ports: v.enabled_ports(),
        egress: np.egress.enabled,
        dns: np.egress.enabled && np.egress.dns,
    };
    let mut objects = vec![match t.engine {
        Engine::Kubernetes => kubernetes(&t),
        Engine::Cilium => cilium(&t),
        Engine::Calico => calico(&t),
        Engine::ClusterNetworkPolicy => cluster_network_policy(&t),
    }];
    if np.default_deny.enabled {
        objects.push(default_deny(&t));
    }
    let origin = format!("{} (rendered for {} engine)", v.origin, t.engine);
    objects.into_iter().map(|value| Document { origin: origin.clone(), value }).collect()
}

fn kubernetes(t: &Template<'_>) -> Value {
    let mut ingress = Vec::new();
    for (port_name, _) in &t.ports {
        let mut rule = json!({"ports": [{"port": port_name, "protocol": "TCP"}]});
        let from = t.np.from(port_name);
        if !from.is_empty() {
            rule["from"] = Value::Array(from.to_vec());
        }
        ingress.push(rule);
    }
    let (extra_ingress, extra_egress) = t.passthrough();
    ingress.extend_from_slice(extra_ingress);
    let mut spec = json!({"podSelector": {"matchLabels": t.labels}, "policyTypes": t.types(), "ingress": ingress});
    if t.egress {
        let mut rules = Vec::new();
        if t.dns {
            rules.push(json!({
                "to": [{"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: t.np.egress.dns_namespace}}}],
                "ports": [{"protocol": "UDP", "port": DNS_PORT}, {"protocol": "TCP", "port": DNS_PORT}],
            }));
        }
        rules.extend_from_slice(extra_egress);
        spec["egress"] = Value::Array(rules);
    }
    object(t.engine, &t.name, Some(t.namespace), spec)
}

fn cilium(t: &Template<'_>) -> Value {
    let to_ports: Vec<Value> =
        t.ports.iter().map(|(_, p)| json!({"ports": [{"port": p.to_string(), "protocol": "TCP"}]})).collect();
    let (extra_ingress, extra_egress) = t.passthrough();
    let mut ingress = vec![json!({"toPorts": to_ports})];
    ingress.extend_from_slice(extra_ingress);
    let mut spec = json!({"endpointSelector": {"matchLabels": t.labels}, "ingress": ingress});
    if t.egress {
        let mut rules = Vec::new();
        if t.dns {
            let dns_port = DNS_PORT.to_string();
            rules.push(json!({
                "toEndpoints": [{"matchLabels": {
                    format!("k8s:{}", cilium::NAMESPACE_LABEL): t.np.egress.dns_namespace,
                    "k8s:k8s-app": "kube-dns",
                }}],
                "toPorts": [{
                    "ports": [{"port": dns_port, "protocol": "UDP"}, {"port": dns_port, "protocol": "TCP"}],
                    "rules": {"dns": [{"matchPattern": "*"}]},
                }],
            }));
        }
        rules.extend_from_slice(extra_egress);
        spec["egress"] = Value::Array(rules);
    }
    object(t.engine, &t.name, Some(t.namespace), spec)
}

fn calico(t: &Template<'_>) -> Value {
    let (extra_ingress, extra_egress) = t.passthrough();
    let mut ingress: Vec<Value> = (t.ports.iter())
        .map(|(_, p)| json!({"action": "Allow", "protocol": "TCP", "destination": {"ports": [p]}}))
        .collect();
    ingress.extend_from_slice(extra_ingress);
    let selector = ["app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/instance"]
        .iter()
        .map(|k| format!("{k} == '{}'", t.labels[*k]))
        .collect::<Vec<_>>()
        .join(" && ");
    let mut spec = json!({"selector": selector, "types": t.types(), "ingress": ingress});
    if t.egress {
        let mut rules = Vec::new();
        if t.dns {
            for proto in ["UDP", "TCP"] {
                rules.push(json!({"action": "Allow", "protocol": proto, "destination": {"ports": [DNS_PORT]}}));
            }
        }
        rules.extend_from_slice(extra_egress);
        spec["egress"] = Value::Array(rules);
    }
    object(t.engine, &t.name, Some(t.namespace), spec)
}

fn cluster_network_policy(t: &Template<'_>) -> Value {
    let (extra_ingress, extra_egress) = t.passthrough();
    let mut ingress: Vec<Value> = (t.ports.iter())
        .map(|(n, p)| {
            json!({"name": n, "action": "Accept", "from": [{"namespaces": {}}],
                   "protocols": [{"tcp": {"destinationPort": {"number": p}}}]})
        })
        .collect();
    ingress.extend_from_slice(extra_ingress);
    let mut spec = json!({
        "tier": "Baseline",
        "priority": t.np.cluster_network_policy.priority,
        "subject": {"pods": {
            "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: t.namespace}},
            "podSelector": {"matchLabels": t.labels},
        }},
        "ingress": ingress,
    });
    if t.egress {
        let mut rules = Vec::new();
        if t.dns {
            rules.push(json!({
                "name": "dns", "action": "Accept",
                "to": [{"namespaces": {"matchLabels": {NAMESPACE_NAME_LABEL: t.np.egress.dns_namespace}}}],
                "protocols": [{"udp": {"destinationPort": {"number": DNS_PORT}}}, {"tcp": {"destinationPort": {"number": DNS_PORT}}}],
            }));
        }
        rules.extend_from_slice(extra_egress);
        spec["egress"] = Value::Array(rules);
    }
    object(t.engine, &format!("{CHART_NAME}-{}", t.namespace), None, spec)
}

/// `networkPolicy.defaultDeny`: every pod of the namespace isolated (the CNP form: Baseline Deny).
fn default_deny(t: &Template<'_>) -> Value {
    let (ns, order) = (t.namespace, t.np.default_deny.order);
    let (spec, namespace) = match t.engine {
        Engine::Kubernetes => (json!({"podSelector": {}, "policyTypes": t.types()}), Some(ns)),
        Engine::Cilium => {
            let mut spec = json!({"endpointSelector": {}, "ingress": []});
            if t.egress {
                spec["egress"] = json!([]);
            }
            (spec, Some(ns))
        }
        Engine::Calico => (json!({"order": order, "selector": "all()", "types": t.types()}), Some(ns)),
        Engine::ClusterNetworkPolicy => {
            let mut spec = json!({
                "tier": "Baseline",
                "priority": order,
                "subject": {"namespaces": {"matchLabels": {NAMESPACE_NAME_LABEL: ns}}},
                "ingress": [{"name": "default-deny", "action": "Deny", "from": [{"namespaces": {}}]}],
            });
            if t.egress {
                spec["egress"] = json!([{"name": "default-deny", "action": "Deny", "to": [{"namespaces": {}}]}]);
            }
            (spec, None)
        }
    };
    let name = match t.engine {
        Engine::ClusterNetworkPolicy => format!("{CHART_NAME}-{ns}-default-deny"),
        _ => format!("{}-default-deny", t.name),
    };
    object(t.engine, &name, namespace, spec)
}

fn object(engine: Engine, name: &str, namespace: Option<&str>, spec: Value) -> Value {
    let mut meta = json!({"name": name});
    if let Some(ns) = namespace {
        meta["namespace"] = json!(ns);
    }
    json!({"apiVersion": engine.api_version(), "kind": engine.kind(), "metadata": meta, "spec": spec})
}
