//! The audited chart (stageset-controller) as a policy source: its values, merged over the
//! chart's defaults as Helm merges them, rendered in memory into exactly the objects the chart's
//! templates render per engine (../shared/CHART.md). The rendered objects go through the same
//! policy parsers as any manifest, so `--values` and `--policy rendered.yaml` judge alike.

use std::path::Path;

use serde_json::{Map, Value, json};

use crate::{
    error::{FieldError, InputError},
    input::{Document, type_name},
    inventory::{ContainerPort, Labels, NAMESPACE_NAME_LABEL, PodInfo},
    model::{DNS_PORT, Protocol},
    policy::{Engine, Policy, cilium},
};

pub const CHART_NAME: &str = "stageset-controller";
const DEFAULTS: &str = include_str!("defaults.yaml");

/// The controller's ingress ports in the order the chart renders their rules: the port name
/// (also the container port's name and the `ports.<name>` value) and the value that enables it.
pub const INGRESS_PORTS: [(&str, Option<&str>); 5] = [
    ("health", None),
    ("webhook", Some("webhook.enabled")),
    ("metrics", None),
    ("gate", Some("gate.enabled")),
    ("mcp", Some("mcp.enabled")),
];

/// Where the chart is installed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    pub name: String,
    pub namespace: String,
}

impl Release {
    /// Where the chart is installed: `name` and `namespace` when given, else read from the first
    /// of `pods` the chart made (its `app.kubernetes.io/name` and `instance` labels), else the
    /// chart's name and `fallback_namespace`. The notes say what had to be assumed.
    pub fn infer<'p>(
        name: Option<&str>,
        namespace: Option<&str>,
        pods: impl IntoIterator<Item = &'p PodInfo>,
        fallback_namespace: &str,
    ) -> (Release, Vec<String>) {
        let found =
            pods.into_iter().find(|p| p.labels.get("app.kubernetes.io/name").map(String::as_str) == Some(CHART_NAME));
        let from_pod = found.and_then(|p| p.labels.get("app.kubernetes.io/instance").cloned());
        let release = Release {
            name: name.map(str::to_string).or(from_pod).unwrap_or_else(|| CHART_NAME.to_string()),
            namespace: namespace
                .map(str::to_string)
                .or_else(|| found.map(|p| p.namespace.clone()))
                .unwrap_or_else(|| fallback_namespace.to_string()),
        };
        let mut notes = Vec::new();
        if found.is_none() {
            if name.is_none() {
                notes.push(format!(
                    "release name not given and no controller pod in the inventory: using `{}`",
                    release.name
                ));
            }
            if namespace.is_none() {
                notes.push(format!(
                    "release namespace not given and no controller pod in the inventory: using `{}`",
                    release.namespace
                ));
            }
        }
        (release, notes)
    }
}

/// The chart as one context: its values and where it is installed. Present when the user gave
/// the values (`--values`, the agent's ConfigMap): the policies it renders are candidates, and
/// audited addresses the inventory lacks are taken for its pod.
#[derive(Clone, Debug)]
pub struct Chart {
    pub values: Values,
    pub release: Release,
}

impl Chart {
    /// The policies the chart renders (none when `networkPolicy.enabled` is false).
    pub fn policies(&self) -> Result<Vec<Policy>, InputError> {
        Ok(crate::policy::from_documents(self.values.render(&self.release)?)?.0)
    }

    /// The policy engine the values select (checked when the values were loaded).
    pub fn engine(&self) -> Option<Engine> {
        self.values.engine().ok()
    }
}

/// The values of an install without a values file, for the questions the matrix asks when no
/// chart context is given.
pub fn default_values() -> &'static Values {
    static DEFAULTS: std::sync::LazyLock<Values> = std::sync::LazyLock::new(Values::defaults);
    &DEFAULTS
}

/// Chart values merged over the defaults.
#[derive(Clone, Debug)]
pub struct Values {
    /// The file they came from, for messages.
    pub origin: String,
    root: Value,
}

impl Values {
    /// The chart's defaults alone (what an install without a values file gets).
    pub fn defaults() -> Values {
        Values { origin: "chart defaults".into(), root: defaults() }
    }

    pub fn load(path: &Path) -> Result<Values, InputError> {
        let docs = crate::input::read_values(path)?;
        let origin = path.display().to_string();
        let user = match docs.as_slice() {
            [] => Value::Object(Map::new()),
            [v @ Value::Object(_)] => v.clone(),
            [other] => {
                return Err(InputError::new(origin, format!("values must be a mapping, found {}", type_name(other))));
            }
            _ => {
                let msg = format!("a values file holds one YAML document, found {}", docs.len());
                return Err(InputError::new(origin, msg));
            }
        };
        let mut root = defaults();
        merge(&mut root, user);
        let v = Values { origin, root };
        v.validate()?;
        Ok(v)
    }

    /// These values with `over` merged on top (Helm's merge), checked like a values file.
    pub fn with_overrides(&self, over: Value) -> Result<Values, InputError> {
        let mut root = self.root.clone();
        merge(&mut root, over);
        let v = Values { origin: format!("proposed values over {}", self.origin), root };
        v.validate()?;
        Ok(v)
    }

    /// The value at a dotted path (`networkPolicy.egress.enabled`).
    pub fn get(&self, path: &str) -> Option<&Value> {
        path.split('.').try_fold(&self.root, |v, k| v.get(k))
    }

    fn err(&self, path: &str, msg: impl std::fmt::Display) -> InputError {
        InputError::at(&self.origin, None, FieldError::new(path, msg.to_string()))
    }

    pub fn bool(&self, path: &str) -> Result<bool, InputError> {
        match self.get(path) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(self.err(path, format!("expected true or false, found {}", type_name(other)))),
        }
    }

    pub fn str(&self, path: &str) -> Result<String, InputError> {
        match self.get(path) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(self.err(path, format!("expected a string, found {}", type_name(other)))),
        }
    }

    pub fn port(&self, path: &str) -> Result<u16, InputError> {
        match self.get(path) {
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| self.err(path, format!("{n} is not a port (1-65535)"))),
            Some(other) => Err(self.err(path, format!("expected a port number, found {}", type_name(other)))),
            None => Err(self.err(path, "missing; set a port number")),
        }
    }

    fn int(&self, path: &str) -> Result<i64, InputError> {
        match self.get(path) {
            Some(Value::Number(n)) if n.is_i64() => Ok(n.as_i64().unwrap()),
            Some(other) => Err(self.err(path, format!("expected a whole number, found {other}"))),
            None => Err(self.err(path, "missing; set a number")),
        }
    }

    /// A list value (a passthrough rule list); absent or null is empty.
    pub fn list(&self, path: &str) -> Result<Vec<Value>, InputError> {
        match self.get(path) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(v)) => Ok(v.clone()),
            Some(other) => Err(self.err(path, format!("expected a list, found {}", type_name(other)))),
        }
    }

    pub fn engine(&self) -> Result<Engine, InputError> {
        let s = self.str("networkPolicy.engine")?;
        s.parse().map_err(|e: FieldError| self.err("networkPolicy.engine", e.message))
    }

    /// Whether a condition such as `webhook.enabled`, `controller.tracing.endpoint` (a non-empty
    /// string) or `rollbackStore.backend == s3` holds.
    pub fn condition(&self, cond: &str) -> Result<bool, InputError> {
        if let Some((path, want)) = cond.split_once("==") {
            return Ok(self.str(path.trim())? == want.trim());
        }
        Ok(match self.get(cond.trim()) {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) => !s.is_empty(),
            Some(Value::Number(n)) => n.as_f64() != Some(0.0),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(o)) => !o.is_empty(),
        })
    }

    /// Checks every value the renderer reads, so a mistake is reported once, with its path.
    fn validate(&self) -> Result<(), InputError> {
        self.engine()?;
        for (name, cond) in INGRESS_PORTS {
            self.port(&format!("ports.{name}"))?;
            if let Some(c) = cond {
                self.bool(c)?;
            }
        }
        for p in [
            "networkPolicy.enabled",
            "networkPolicy.defaultDeny.enabled",
            "networkPolicy.egress.enabled",
            "networkPolicy.egress.dns",
        ] {
            self.bool(p)?;
        }
        self.int("networkPolicy.defaultDeny.order")?;
        self.int("networkPolicy.clusterNetworkPolicy.priority")?;
        self.str("networkPolicy.egress.dnsNamespace")?;
        for p in [
            "networkPolicy.webhook.from",
            "networkPolicy.metrics.from",
            "networkPolicy.gate.from",
            "networkPolicy.mcp.from",
            "networkPolicy.additionalIngress",
            "networkPolicy.egress.to",
        ] {
            self.list(p)?;
        }
        for e in [Engine::Cilium, Engine::Calico, Engine::ClusterNetworkPolicy] {
            self.list(&format!("networkPolicy.{}.ingress", e.name()))?;
            self.list(&format!("networkPolicy.{}.egress", e.name()))?;
        }
        self.str("rollbackStore.backend")?;
        self.str("rollbackStore.s3.endpoint")?;
        self.str("controller.tracing.endpoint")?;
        Ok(())
    }

    /// Helm's `fullname`: `fullnameOverride`, else the release name when it already contains the
    /// chart name, else `<release>-<chart>`; at most 63 characters.
    pub fn fullname(&self, release: &Release) -> String {
        let over = self.get("fullnameOverride").and_then(Value::as_str).unwrap_or("");
        let name = if !over.is_empty() {
            over.to_string()
        } else {
            let chart = self.chart_name();
            if release.name.contains(&chart) { release.name.clone() } else { format!("{}-{chart}", release.name) }
        };
        name.chars().take(63).collect::<String>().trim_end_matches('-').to_string()
    }

    fn chart_name(&self) -> String {
        self.get("nameOverride").and_then(Value::as_str).filter(|s| !s.is_empty()).unwrap_or(CHART_NAME).to_string()
    }

    /// The labels the chart's policies select the controller pods by.
    pub fn selector_labels(&self, release: &Release) -> Labels {
        Labels::from([
            ("app.kubernetes.io/name".to_string(), self.chart_name()),
            ("app.kubernetes.io/component".to_string(), "controller".to_string()),
            ("app.kubernetes.io/instance".to_string(), release.name.clone()),
            ("app.kubernetes.io/part-of".to_string(), CHART_NAME.to_string()),
        ])
    }

    /// The controller pod as the chart defines it (labels, named ports), for flows whose pod the
    /// inventory does not hold.
    pub fn workload_pod(&self, release: &Release) -> Result<PodInfo, InputError> {
        let mut ports = Vec::new();
        for (name, cond) in INGRESS_PORTS {
            if cond.map(|c| self.bool(c)).transpose()?.unwrap_or(true) {
                ports.push(ContainerPort {
                    name: Some(name.into()),
                    port: self.port(&format!("ports.{name}"))?,
                    protocol: Protocol::Tcp,
                });
            }
        }
        Ok(PodInfo {
            namespace: release.namespace.clone(),
            name: format!("{} (from {})", self.fullname(release), self.origin),
            labels: self.selector_labels(release),
            ips: Vec::new(),
            node_name: None,
            host_network: false,
            service_account: None,
            ports,
        })
    }

    /// The objects the chart renders for its `networkPolicy` block (none when it is disabled).
    pub fn render(&self, release: &Release) -> Result<Vec<Document>, InputError> {
        if !self.bool("networkPolicy.enabled")? {
            return Ok(Vec::new());
        }
        let engine = self.engine()?;
        let name = self.fullname(release);
        let ns = release.namespace.as_str();
        let egress = self.bool("networkPolicy.egress.enabled")?;
        let dns = egress && self.bool("networkPolicy.egress.dns")?;
        let dns_ns = self.str("networkPolicy.egress.dnsNamespace")?;
        let mut ports = Vec::new();
        for (port_name, cond) in INGRESS_PORTS {
            if cond.map(|c| self.bool(c)).transpose()?.unwrap_or(true) {
                ports.push((port_name, self.port(&format!("ports.{port_name}"))?));
            }
        }
        let labels = self.selector_labels(release);
        let mut objects = Vec::new();
        let passthrough = |dir: &str| self.list(&format!("networkPolicy.{}.{dir}", engine.name()));
        match engine {
            Engine::Kubernetes => {
                let mut ingress = Vec::new();
                for (port_name, _) in &ports {
                    let mut rule = json!({"ports": [{"port": port_name, "protocol": "TCP"}]});
                    if *port_name != "health" {
                        let from = self.list(&format!("networkPolicy.{port_name}.from"))?;
                        if !from.is_empty() {
                            rule["from"] = Value::Array(from);
                        }
                    }
                    ingress.push(rule);
                }
                ingress.extend(self.list("networkPolicy.additionalIngress")?);
                let mut spec = json!({
                    "podSelector": {"matchLabels": labels},
                    "policyTypes": if egress { json!(["Ingress", "Egress"]) } else { json!(["Ingress"]) },
                    "ingress": ingress,
                });
                if egress {
                    let mut rules = Vec::new();
                    if dns {
                        rules.push(json!({
                            "to": [{"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: dns_ns}}}],
                            "ports": [{"protocol": "UDP", "port": DNS_PORT}, {"protocol": "TCP", "port": DNS_PORT}],
                        }));
                    }
                    rules.extend(self.list("networkPolicy.egress.to")?);
                    spec["egress"] = Value::Array(rules);
                }
                objects.push(object(engine, &name, Some(ns), spec));
            }
            Engine::Cilium => {
                let to_ports: Vec<Value> =
                    ports.iter().map(|(_, p)| json!({"ports": [{"port": p.to_string(), "protocol": "TCP"}]})).collect();
                let mut ingress = vec![json!({"toPorts": to_ports})];
                ingress.extend(passthrough("ingress")?);
                let mut spec = json!({"endpointSelector": {"matchLabels": labels}, "ingress": ingress});
                if egress {
                    let mut rules = Vec::new();
                    if dns {
                        rules.push(json!({
                            "toEndpoints": [{"matchLabels": {
                                format!("k8s:{}", cilium::NAMESPACE_LABEL): dns_ns,
                                "k8s:k8s-app": "kube-dns",
                            }}],
                            "toPorts": [{
                                "ports": [{"port": DNS_PORT.to_string(), "protocol": "UDP"}, {"port": DNS_PORT.to_string(), "protocol": "TCP"}],
                                "rules": {"dns": [{"matchPattern": "*"}]},
                            }],
                        }));
                    }
                    rules.extend(passthrough("egress")?);
                    spec["egress"] = Value::Array(rules);
                }
                objects.push(object(engine, &name, Some(ns), spec));
            }
            Engine::Calico => {
                let mut ingress: Vec<Value> = ports
                    .iter()
                    .map(|(_, p)| json!({"action": "Allow", "protocol": "TCP", "destination": {"ports": [p]}}))
                    .collect();
                ingress.extend(passthrough("ingress")?);
                let selector = ["app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/instance"]
                    .iter()
                    .map(|k| format!("{k} == '{}'", labels[*k]))
                    .collect::<Vec<_>>()
                    .join(" && ");
                let mut spec = json!({
                    "selector": selector,
                    "types": if egress { json!(["Ingress", "Egress"]) } else { json!(["Ingress"]) },
                    "ingress": ingress,
                });
                if egress {
                    let mut rules = Vec::new();
                    if dns {
                        for proto in ["UDP", "TCP"] {
                            rules.push(
                                json!({"action": "Allow", "protocol": proto, "destination": {"ports": [DNS_PORT]}}),
                            );
                        }
                    }
                    rules.extend(passthrough("egress")?);
                    spec["egress"] = Value::Array(rules);
                }
                objects.push(object(engine, &name, Some(ns), spec));
            }
            Engine::ClusterNetworkPolicy => {
                let mut ingress: Vec<Value> = ports
                    .iter()
                    .map(|(n, p)| {
                        json!({"name": n, "action": "Accept", "from": [{"namespaces": {}}],
                               "protocols": [{"tcp": {"destinationPort": {"number": p}}}]})
                    })
                    .collect();
                ingress.extend(passthrough("ingress")?);
                let mut spec = json!({
                    "tier": "Baseline",
                    "priority": self.int("networkPolicy.clusterNetworkPolicy.priority")?,
                    "subject": {"pods": {
                        "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: ns}},
                        "podSelector": {"matchLabels": labels},
                    }},
                    "ingress": ingress,
                });
                if egress {
                    let mut rules = Vec::new();
                    if dns {
                        rules.push(json!({
                            "name": "dns", "action": "Accept",
                            "to": [{"namespaces": {"matchLabels": {NAMESPACE_NAME_LABEL: dns_ns}}}],
                            "protocols": [{"udp": {"destinationPort": {"number": DNS_PORT}}}, {"tcp": {"destinationPort": {"number": DNS_PORT}}}],
                        }));
                    }
                    rules.extend(passthrough("egress")?);
                    spec["egress"] = Value::Array(rules);
                }
                objects.push(object(engine, &format!("{CHART_NAME}-{ns}"), None, spec));
            }
        }
        if self.bool("networkPolicy.defaultDeny.enabled")? {
            let order = self.int("networkPolicy.defaultDeny.order")?;
            let deny_name = match engine {
                Engine::ClusterNetworkPolicy => format!("{CHART_NAME}-{ns}-default-deny"),
                _ => format!("{name}-default-deny"),
            };
            let types = if egress { json!(["Ingress", "Egress"]) } else { json!(["Ingress"]) };
            let (spec, namespace) = match engine {
                Engine::Kubernetes => (json!({"podSelector": {}, "policyTypes": types}), Some(ns)),
                Engine::Cilium => {
                    let mut spec = json!({"endpointSelector": {}, "ingress": []});
                    if egress {
                        spec["egress"] = json!([]);
                    }
                    (spec, Some(ns))
                }
                Engine::Calico => (json!({"order": order, "selector": "all()", "types": types}), Some(ns)),
                Engine::ClusterNetworkPolicy => {
                    let mut spec = json!({
                        "tier": "Baseline",
                        "priority": order,
                        "subject": {"namespaces": {"matchLabels": {NAMESPACE_NAME_LABEL: ns}}},
                        "ingress": [{"name": "default-deny", "action": "Deny", "from": [{"namespaces": {}}]}],
                    });
                    if egress {
                        spec["egress"] =
                            json!([{"name": "default-deny", "action": "Deny", "to": [{"namespaces": {}}]}]);
                    }
                    (spec, None)
                }
            };
            objects.push(object(engine, &deny_name, namespace, spec));
        }
        Ok(objects
            .into_iter()
            .map(|value| Document { origin: format!("{} (rendered for {} engine)", self.origin, engine), value })
            .collect())
    }
}

fn object(engine: Engine, name: &str, namespace: Option<&str>, spec: Value) -> Value {
    let mut meta = json!({"name": name});
    if let Some(ns) = namespace {
        meta["namespace"] = json!(ns);
    }
    json!({"apiVersion": engine.api_version(), "kind": engine.kind(), "metadata": meta, "spec": spec})
}

fn defaults() -> Value {
    let mut docs = crate::input::parse_values(DEFAULTS).expect("embedded chart defaults parse");
    docs.pop().expect("one document")
}

/// Helm's merge: maps merge key by key, anything else replaces; null deletes the key.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                if v.is_null() {
                    b.remove(&k);
                } else {
                    merge(b.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(text: &str) -> Values {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("values.yaml");
        std::fs::write(&p, text).unwrap();
        Values::load(&p).unwrap()
    }

    fn release() -> Release {
        Release { name: "ssc".into(), namespace: "stageset-system".into() }
    }

    #[test]
    fn every_engine_renders_objects_its_parser_accepts() {
        for engine in Engine::ALL {
            let v = values(&format!(
                "networkPolicy:\n  enabled: true\n  engine: {engine}\n  defaultDeny: {{enabled: true, order: 900}}\n  \
                 egress: {{enabled: true}}\n"
            ));
            let docs = v.render(&release()).unwrap();
            assert_eq!(docs.len(), 2, "{engine}");
            let (policies, rest) = crate::policy::from_documents(docs).unwrap();
            assert!(rest.is_empty());
            assert!(policies.iter().all(|p| p.id.engine == engine), "{engine}");
        }
    }

    #[test]
    fn disabled_renders_nothing_and_names_follow_helm() {
        assert!(Values::defaults().render(&release()).unwrap().is_empty());
        let v = Values::defaults();
        assert_eq!(v.fullname(&release()), "ssc-stageset-controller");
        let r = Release { name: "stageset-controller".into(), namespace: "x".into() };
        assert_eq!(v.fullname(&r), "stageset-controller");
    }

    #[test]
    fn bad_values_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("values.yaml");
        for (text, want) in [
            ("networkPolicy: {engine: istio}", "networkPolicy.engine: `istio` is not an engine"),
            ("ports: {webhook: 70000}", "ports.webhook: 70000 is not a port"),
            ("networkPolicy: {egress: {to: {a: 1}}}", "networkPolicy.egress.to: expected a list"),
            ("networkPolicy: {enabled: 'yes please'}", "networkPolicy.enabled: expected true or false"),
            ("- a\n- b\n", "values must be a mapping"),
        ] {
            std::fs::write(&p, text).unwrap();
            let msg = format!("{:#}", Values::load(&p).unwrap_err());
            assert!(msg.contains("values.yaml") && msg.contains(want), "{text}: {msg}");
        }
    }
}
