//! The audited chart (stageset-controller) as a policy source: its values, merged over the
//! chart's defaults as Helm merges them and read as types ([`values`]), rendered in memory into
//! exactly the objects the chart's templates render per engine ([`render`], ../shared/CHART.md).
//! The rendered objects go through the same policy parsers as any manifest, so `--values` and
//! `--policy rendered.yaml` judge alike.

mod render;
pub mod values;

use std::path::Path;

use serde_json::{Map, Value};

pub use self::values::ChartValues;
use crate::{
    error::{FieldError, InputError},
    input::{Document, type_name},
    inventory::{ContainerPort, Labels, PodInfo},
    model::Protocol,
    policy::{Engine, Policy},
};

pub const CHART_NAME: &str = "stageset-controller";
const DEFAULTS: &str = include_str!("defaults.yaml");

/// The controller's ingress ports in the order the chart renders their rules, by name (also
/// the container port's name and the `ports.<name>` value).
pub const INGRESS_PORTS: [&str; 5] = ["health", "webhook", "metrics", "gate", "mcp"];

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
        Ok(crate::policy::from_documents(self.values.render(&self.release))?.0)
    }

    /// The policy engine the values select.
    pub fn engine(&self) -> Engine {
        self.values.engine()
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
    /// What the chart's templates read.
    pub chart: ChartValues,
    /// The merged tree, for the values a matrix names by path (`when: rollbackStore.backend == s3`):
    /// a matrix is data and may name any value.
    root: Value,
}

impl Values {
    /// The chart's defaults alone (what an install without a values file gets).
    pub fn defaults() -> Values {
        Values::read("chart defaults".into(), defaults()).expect("the chart's defaults read")
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
        Values::read(origin, root)
    }

    /// These values with `over` merged on top (Helm's merge), checked like a values file.
    pub fn with_overrides(&self, over: Value) -> Result<Values, InputError> {
        let mut root = self.root.clone();
        merge(&mut root, over);
        Values::read(format!("proposed values over {}", self.origin), root)
    }

    fn read(origin: String, root: Value) -> Result<Values, InputError> {
        let chart = crate::input::from_value(&root).map_err(|e| InputError::at(&origin, None, e))?;
        Ok(Values { origin, chart, root })
    }

    /// The value at a dotted path (`networkPolicy.egress.enabled`), for the matrix.
    pub fn get(&self, path: &str) -> Option<&Value> {
        path.split('.').try_fold(&self.root, |v, k| v.get(k))
    }

    fn err(&self, path: &str, msg: impl std::fmt::Display) -> InputError {
        InputError::at(&self.origin, None, FieldError::new(path, msg.to_string()))
    }

    /// A string the matrix names by path (a host, an endpoint); absent or null is empty.
    pub fn str(&self, path: &str) -> Result<String, InputError> {
        match self.get(path) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(self.err(path, format!("expected a string, found {}", type_name(other)))),
        }
    }

    /// A port the matrix names by path (`ports.webhook`).
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

    pub fn engine(&self) -> Engine {
        self.chart.network_policy.engine
    }

    /// Whether a matrix condition such as `webhook.enabled`, `controller.tracing.endpoint` (a
    /// non-empty string) or `rollbackStore.backend == s3` holds.
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

    /// The ingress ports the chart renders a rule for, in [`INGRESS_PORTS`] order, with their
    /// numbers: health and metrics always, the others when enabled.
    pub fn enabled_ports(&self) -> Vec<(&'static str, u16)> {
        let (c, p) = (&self.chart, &self.chart.ports);
        INGRESS_PORTS
            .into_iter()
            .filter_map(|name| match name {
                "health" => Some((name, p.health)),
                "metrics" => Some((name, p.metrics)),
                "webhook" => c.webhook.enabled.then_some((name, p.webhook)),
                "gate" => c.gate.enabled.then_some((name, p.gate)),
                "mcp" => c.mcp.enabled.then_some((name, p.mcp)),
                _ => None,
            })
            .collect()
    }

    /// Helm's `fullname`: `fullnameOverride`, else the release name when it already contains the
    /// chart name, else `<release>-<chart>`; at most 63 characters.
    pub fn fullname(&self, release: &Release) -> String {
        let over = &self.chart.fullname_override;
        let name = if !over.is_empty() {
            over.clone()
        } else {
            let chart = self.chart_name();
            if release.name.contains(chart) { release.name.clone() } else { format!("{}-{chart}", release.name) }
        };
        name.chars().take(63).collect::<String>().trim_end_matches('-').to_string()
    }

    fn chart_name(&self) -> &str {
        Some(self.chart.name_override.as_str()).filter(|s| !s.is_empty()).unwrap_or(CHART_NAME)
    }

    /// The labels the chart's policies select the controller pods by.
    pub fn selector_labels(&self, release: &Release) -> Labels {
        Labels::from([
            ("app.kubernetes.io/name".to_string(), self.chart_name().to_string()),
            ("app.kubernetes.io/component".to_string(), "controller".to_string()),
            ("app.kubernetes.io/instance".to_string(), release.name.clone()),
            ("app.kubernetes.io/part-of".to_string(), CHART_NAME.to_string()),
        ])
    }

    /// The controller pod as the chart defines it (labels, named ports), for flows whose pod the
    /// inventory does not hold.
    pub fn workload_pod(&self, release: &Release) -> PodInfo {
        let ports = self.enabled_ports().into_iter();
        PodInfo {
            namespace: release.namespace.clone(),
            name: format!("{} (from {})", self.fullname(release), self.origin),
            labels: self.selector_labels(release).into(),
            ips: Vec::new(),
            node_name: None,
            host_network: false,
            service_account: None,
            ports: ports
                .map(|(n, port)| ContainerPort { name: Some(n.into()), port, protocol: Protocol::Tcp })
                .collect(),
        }
    }

    /// The objects the chart renders for its `networkPolicy` block (none when it is disabled).
    pub fn render(&self, release: &Release) -> Vec<Document> {
        render::render(self, release)
    }
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
            let docs = v.render(&release());
            assert_eq!(docs.len(), 2, "{engine}");
            let (policies, rest) = crate::policy::from_documents(docs).unwrap();
            assert!(rest.is_empty());
            assert!(policies.iter().all(|p| p.id.engine == engine), "{engine}");
        }
    }

    #[test]
    fn disabled_renders_nothing_and_names_follow_helm() {
        assert!(Values::defaults().render(&release()).is_empty());
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
