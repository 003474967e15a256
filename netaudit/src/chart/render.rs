//! The chart's `networkpolicy.yaml` template, per engine, in memory (../shared/CHART.md): one
//! policy for the controller's pods, plus the optional default deny for the namespace.

use k8s_openapi::{
    api::networking::v1::{NetworkPolicyIngressRule, NetworkPolicySpec},
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde_json::{Value, json};

use super::{CHART_NAME, Release, Values, values::NetworkPolicyValues};
use crate::{
    input::Document,
    inventory::Labels,
    model::{DNS_PORT, DNS_PROTOCOLS, Protocol},
    policy::{Engine, PeerRef, PortProto, calico, cilium, cluster_network_policy, kubernetes},
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
    fn types(&self) -> Vec<String> {
        let types: &[&str] = if self.egress { &["Ingress", "Egress"] } else { &["Ingress"] };
        types.iter().map(|t| t.to_string()).collect()
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

fn value(x: impl serde::Serialize) -> Value {
    serde_json::to_value(x).expect("plain data")
}

impl Template<'_> {
    /// The DNS servers' ports.
    fn dns_ports() -> [PortProto; 2] {
        DNS_PROTOCOLS.map(|protocol| PortProto { protocol, port: DNS_PORT })
    }

    fn label_pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.labels.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The enabled ingress ports, by number.
    fn tcp_ports(&self) -> impl Iterator<Item = PortProto> + '_ {
        self.ports.iter().map(|(_, port)| PortProto { protocol: Protocol::Tcp, port: *port })
    }
}

/// `spec[key]` extended with the passthrough rules.
fn extend(spec: &mut Value, key: &str, rules: Vec<Value>, extra: &[Value]) {
    let mut rules = rules;
    rules.extend_from_slice(extra);
    spec[key] = Value::Array(rules);
}

fn kubernetes(t: &Template<'_>) -> Value {
    let (extra_ingress, extra_egress) = t.passthrough();
    let ingress: Vec<Value> = (t.ports.iter())
        .map(|(port_name, _)| {
            let port = kubernetes::write::port(Protocol::Tcp, IntOrString::String(port_name.to_string()));
            let mut rule = value(NetworkPolicyIngressRule { from: None, ports: Some(vec![port]) });
            let from = t.np.from(port_name);
            if !from.is_empty() {
                rule["from"] = Value::Array(from.to_vec());
            }
            rule
        })
        .collect();
    let spec = NetworkPolicySpec {
        pod_selector: Some(kubernetes::write::match_labels(t.label_pairs())),
        policy_types: Some(t.types()),
        ..NetworkPolicySpec::default()
    };
    let mut spec = value(spec);
    extend(&mut spec, "ingress", ingress, extra_ingress);
    if t.egress {
        let dns = PeerRef::Pods { namespace: &t.np.egress.dns_namespace, labels: &Labels::new() };
        let rules = (t.dns.then(|| kubernetes::write::egress_rule(dns, &Template::dns_ports())).flatten())
            .map(value)
            .into_iter()
            .collect();
        extend(&mut spec, "egress", rules, extra_egress);
    }
    object(t.engine, &t.name, Some(t.namespace), spec)
}

fn cilium(t: &Template<'_>) -> Value {
    let (extra_ingress, extra_egress) = t.passthrough();
    let to_ports = t.tcp_ports().map(|p| cilium::write::port_rule(&[p])).collect();
    let ingress = cilium::PeerRule { to_ports: Some(to_ports), ..cilium::PeerRule::default() };
    let mut spec = json!({"endpointSelector": kubernetes::write::match_labels(t.label_pairs())});
    extend(&mut spec, "ingress", vec![cilium::write::ingress(&ingress)], extra_ingress);
    if t.egress {
        let kube_dns = Labels::from([("k8s-app".to_string(), "kube-dns".to_string())]);
        let dns = PeerRef::Pods { namespace: &t.np.egress.dns_namespace, labels: &kube_dns };
        let rule = cilium::write::with_dns_visibility(cilium::write::egress_rule(dns, &Template::dns_ports()));
        extend(&mut spec, "egress", t.dns.then(|| value(rule)).into_iter().collect(), extra_egress);
    }
    object(t.engine, &t.name, Some(t.namespace), spec)
}

fn calico(t: &Template<'_>) -> Value {
    let (extra_ingress, extra_egress) = t.passthrough();
    let ingress = t.tcp_ports().flat_map(|p| calico::write::egress_rules(PeerRef::Any, &[p])).map(value).collect();
    let selector = ["app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/instance"]
        .map(|k| (k, t.labels[k].as_str()));
    let mut spec = json!({"selector": calico::write::selector(selector), "types": t.types()});
    extend(&mut spec, "ingress", ingress, extra_ingress);
    if t.egress {
        let rules = if t.dns { calico::write::egress_rules(PeerRef::Any, &Template::dns_ports()) } else { vec![] };
        extend(&mut spec, "egress", rules.into_iter().map(value).collect(), extra_egress);
    }
    object(t.engine, &t.name, Some(t.namespace), spec)
}

fn cluster_network_policy(t: &Template<'_>) -> Value {
    let (extra_ingress, extra_egress) = t.passthrough();
    let ingress = (t.ports.iter().zip(t.tcp_ports()))
        .filter_map(|((name, _), port)| cluster_network_policy::write::rule(name, "Accept", PeerRef::Any, &[port]))
        .map(|r| cluster_network_policy::write::ingress(&r))
        .collect();
    let subject = cluster_network_policy::SubjectSpec {
        namespaces: None,
        pods: Some(cluster_network_policy::write::pods(t.namespace, t.label_pairs())),
    };
    let priority = t.np.cluster_network_policy.priority;
    let mut spec = json!({"tier": "Baseline", "priority": priority, "subject": subject});
    extend(&mut spec, "ingress", ingress, extra_ingress);
    if t.egress {
        let dns = PeerRef::Pods { namespace: &t.np.egress.dns_namespace, labels: &Labels::new() };
        let rule = t.dns.then(|| cluster_network_policy::write::rule("dns", "Accept", dns, &Template::dns_ports()));
        extend(&mut spec, "egress", rule.flatten().map(value).into_iter().collect(), extra_egress);
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
            let deny = cluster_network_policy::write::rule("default-deny", "Deny", PeerRef::Any, &[]).expect("any");
            let subject =
                cluster_network_policy::SubjectSpec { namespaces: Some(kubernetes::write::namespace(ns)), pods: None };
            let ingress = [cluster_network_policy::write::ingress(&deny)];
            let mut spec = json!({"tier": "Baseline", "priority": order, "subject": subject, "ingress": ingress});
            if t.egress {
                spec["egress"] = json!([deny]);
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
