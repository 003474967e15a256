//! The chart's values that netaudit reads, as types (../shared/CHART.md). They are read from the
//! user's values merged over the chart's defaults, so every field has its chart default; a
//! mistake is reported with its path (`networkPolicy.egress.to: expected a list, found a mapping`).
//! The passthrough rule lists stay untyped: they are the engines' own rules, read by the policy
//! parsers once rendered.

use serde::{Deserialize, Deserializer, de::Error as _};
use serde_json::Value;

use crate::{input::type_name, policy::Engine};

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChartValues {
    #[serde(default, deserialize_with = "text")]
    pub name_override: String,
    #[serde(default, deserialize_with = "text")]
    pub fullname_override: String,
    pub ports: Ports,
    #[serde(default)]
    pub gate: Toggle,
    #[serde(default)]
    pub webhook: Toggle,
    #[serde(default)]
    pub mcp: Toggle,
    #[serde(default)]
    pub rollback_store: RollbackStore,
    #[serde(default)]
    pub controller: Controller,
    pub network_policy: NetworkPolicyValues,
}

/// `ports.*`: the controller's container ports.
#[derive(Clone, Debug, Deserialize)]
pub struct Ports {
    #[serde(deserialize_with = "port")]
    pub health: u16,
    #[serde(deserialize_with = "port")]
    pub webhook: u16,
    #[serde(deserialize_with = "port")]
    pub metrics: u16,
    #[serde(deserialize_with = "port")]
    pub gate: u16,
    #[serde(deserialize_with = "port")]
    pub mcp: u16,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Toggle {
    #[serde(default, deserialize_with = "flag")]
    pub enabled: bool,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct RollbackStore {
    #[serde(default, deserialize_with = "text")]
    pub backend: String,
    #[serde(default)]
    pub s3: S3,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct S3 {
    #[serde(default, deserialize_with = "text")]
    pub endpoint: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Controller {
    #[serde(default)]
    pub tracing: Tracing,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Tracing {
    #[serde(default, deserialize_with = "text")]
    pub endpoint: String,
}

/// `networkPolicy.*`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicyValues {
    #[serde(default, deserialize_with = "flag")]
    pub enabled: bool,
    #[serde(deserialize_with = "engine")]
    pub engine: Engine,
    pub default_deny: DefaultDeny,
    /// Per-port ingress sources (kubernetes engine; empty = open).
    #[serde(default)]
    pub webhook: PortSources,
    #[serde(default)]
    pub metrics: PortSources,
    #[serde(default)]
    pub gate: PortSources,
    #[serde(default)]
    pub mcp: PortSources,
    #[serde(default, deserialize_with = "list")]
    pub additional_ingress: Vec<Value>,
    pub egress: EgressValues,
    #[serde(default)]
    pub cilium: Passthrough,
    #[serde(default)]
    pub calico: Passthrough,
    pub cluster_network_policy: ClusterNetworkPolicyValues,
}

impl NetworkPolicyValues {
    /// The `from` list of an ingress port's rule, by the port's name (none for health).
    pub fn from(&self, port: &str) -> &[Value] {
        match port {
            "webhook" => &self.webhook.from,
            "metrics" => &self.metrics.from,
            "gate" => &self.gate.from,
            "mcp" => &self.mcp.from,
            _ => &[],
        }
    }

    /// An engine's passthrough rules: (ingress, egress).
    pub fn passthrough(&self, engine: Engine) -> (&[Value], &[Value]) {
        match engine {
            Engine::Kubernetes => (&self.additional_ingress, &self.egress.to),
            Engine::Cilium => (&self.cilium.ingress, &self.cilium.egress),
            Engine::Calico => (&self.calico.ingress, &self.calico.egress),
            Engine::ClusterNetworkPolicy => (&self.cluster_network_policy.ingress, &self.cluster_network_policy.egress),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct DefaultDeny {
    #[serde(default, deserialize_with = "flag")]
    pub enabled: bool,
    pub order: i64,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PortSources {
    #[serde(default, deserialize_with = "list")]
    pub from: Vec<Value>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressValues {
    #[serde(default, deserialize_with = "flag")]
    pub enabled: bool,
    #[serde(default, deserialize_with = "flag")]
    pub dns: bool,
    #[serde(default, deserialize_with = "text")]
    pub dns_namespace: String,
    #[serde(default, deserialize_with = "list")]
    pub to: Vec<Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Passthrough {
    #[serde(default, deserialize_with = "list")]
    pub ingress: Vec<Value>,
    #[serde(default, deserialize_with = "list")]
    pub egress: Vec<Value>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ClusterNetworkPolicyValues {
    pub priority: i64,
    #[serde(default, deserialize_with = "list")]
    pub ingress: Vec<Value>,
    #[serde(default, deserialize_with = "list")]
    pub egress: Vec<Value>,
}

// Readers that say what a Helm user wrote wrong in the chart's own terms ("expected true or
// false, found a string"), and treat null as unset, as the templates do.

fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(false),
        Value::Bool(b) => Ok(b),
        other => Err(D::Error::custom(format!("expected true or false, found {}", type_name(&other)))),
    }
}

fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s),
        other => Err(D::Error::custom(format!("expected a string, found {}", type_name(&other)))),
    }
}

fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Value>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(Vec::new()),
        Value::Array(v) => Ok(v),
        other => Err(D::Error::custom(format!("expected a list, found {}", type_name(&other)))),
    }
}

fn port<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    match Value::deserialize(d)? {
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| D::Error::custom(format!("{n} is not a port (1-65535)"))),
        other => Err(D::Error::custom(format!("expected a port number, found {}", type_name(&other)))),
    }
}

fn engine<'de, D: Deserializer<'de>>(d: D) -> Result<Engine, D::Error> {
    text(d)?.parse().map_err(|e: crate::error::FieldError| D::Error::custom(e.message))
}
