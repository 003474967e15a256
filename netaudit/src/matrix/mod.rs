//! The required-traffic matrix: what a workload is supposed to need, as data. A default for the
//! stageset-controller ships in the binary; `--matrix file` brings any other workload's. Each
//! observed flow is classified into the first row it fits, or reported as unexpected; rows no
//! flow used are trim candidates (unless required, like DNS and the apiserver).

use std::{collections::BTreeSet, net::IpAddr, path::Path};

use serde::{Deserialize, Serialize};

use crate::{
    chart::Values,
    error::{FieldError, InputError},
    inventory::{Inventory, Labels, Owner, ServiceInfo},
    model::{Direction, Protocol},
    resolve::{Party, ResolvedFlow},
};

const DEFAULT: &str = include_str!("stageset-controller.yaml");

/// Node-local DNS caches listen here (the NodeLocal DNSCache add-on's default).
pub const NODE_LOCAL_DNS: &str = "169.254.20.10";

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Matrix {
    pub workload: String,
    pub rows: Vec<Row>,
    #[serde(skip)]
    pub origin: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Row {
    pub id: String,
    pub direction: Direction,
    #[serde(default)]
    pub description: String,
    /// Empty: any port.
    #[serde(default)]
    pub ports: Vec<RowPort>,
    pub peer: PeerKind,
    /// Whether a label selector can name the peer (else only an ipBlock can).
    #[serde(default)]
    pub selectable: bool,
    /// Never optional in an allowlist, seen or not.
    #[serde(default)]
    pub required: bool,
    /// The chart value that turns the row on (`webhook.enabled`, `rollbackStore.backend == s3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RowPort {
    pub protocol: Protocol,
    /// A number, or the chart value holding it; absent: any port of the protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortRef>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PortRef {
    Number(u16),
    Value(String),
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum PeerKind {
    Any,
    /// A node address (kubelet, host network).
    Node,
    /// The local apiserver: the `kubernetes` Service or its endpoints.
    Apiserver,
    /// Cluster DNS: kube-dns Service or pods, or a node-local cache.
    Dns,
    /// A pod, optionally in one namespace and with labels.
    Pods {
        #[serde(default)]
        namespace: Option<String>,
        #[serde(default)]
        labels: Option<Labels>,
    },
    /// Not a pod or node of the cluster.
    External,
    /// The host named by a chart value (`host`, `host:port` or a URL).
    Host {
        value: String,
    },
}

/// A resolved flow as the rows look at it: from the audited workload's side.
struct Observation<'a> {
    direction: Direction,
    protocol: Protocol,
    /// The port the initiator connected to.
    port: Option<u16>,
    /// Backend (target) ports when the workload's connection went to a Service.
    backend_ports: Vec<u16>,
    /// The other end, as recorded.
    peer: Party<'a>,
    /// The Service whose ClusterIP the workload connected to.
    service: Option<&'a ServiceInfo>,
    /// That Service's backends.
    backends: Vec<Party<'a>>,
}

impl<'a> Observation<'a> {
    fn of(r: &ResolvedFlow<'a>) -> Observation<'a> {
        let egress_backends = r.direction == Direction::Egress && r.via_backends();
        Observation {
            direction: r.direction,
            protocol: r.flow.protocol,
            port: r.flow.dst.port,
            backend_ports: if egress_backends { r.targets.iter().filter_map(|t| t.port).collect() } else { Vec::new() },
            peer: *r.peer(),
            service: if r.direction == Direction::Egress { r.service.map(|s| s.service) } else { None },
            backends: if egress_backends { r.targets.iter().map(|t| t.party).collect() } else { Vec::new() },
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Classification {
    /// The row the flow belongs to; none: unexpected.
    pub row: Option<String>,
    /// Other rows that also fit (the peer's identity could not tell them apart).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub also: Vec<String>,
    /// Whether the flow is drift: no row, or a row the values turn off.
    pub unexpected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

impl Classification {
    /// `dns`, `remote-apiservers (or http-targets)`, `otlp (off: unexpected)`, `UNEXPECTED`.
    pub fn label(&self) -> String {
        match (&self.row, self.unexpected) {
            (Some(r), false) if self.also.is_empty() => r.clone(),
            (Some(r), false) => format!("{r} (or {})", self.also.join(", ")),
            (Some(r), true) => format!("{r} (off: unexpected)"),
            (None, _) => "UNEXPECTED".into(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct UnusedRow {
    pub id: String,
    pub description: String,
    pub required: bool,
    pub advice: String,
}

impl Matrix {
    /// The stageset-controller's matrix, embedded.
    pub fn default_matrix() -> Matrix {
        let mut m = Self::parse(DEFAULT).expect("embedded matrix parses");
        m.origin = "built-in stageset-controller matrix".into();
        m
    }

    pub fn load(path: &Path) -> Result<Matrix, InputError> {
        let origin = path.display().to_string();
        let docs = crate::input::read_values(path)?;
        let [doc] = docs.as_slice() else {
            let msg = format!("a matrix file holds one document, found {}", docs.len());
            return Err(InputError::new(origin, msg));
        };
        let mut m: Matrix = crate::input::from_value(doc).map_err(|e| InputError::at(&origin, None, e))?;
        m.validate().map_err(|e| InputError::at(&origin, None, e))?;
        m.origin = origin;
        Ok(m)
    }

    fn parse(text: &str) -> Result<Matrix, FieldError> {
        let docs = crate::input::parse_values(text)?;
        let m: Matrix = crate::input::from_value(&docs[0])?;
        m.validate()?;
        Ok(m)
    }

    fn validate(&self) -> Result<(), FieldError> {
        let mut seen = BTreeSet::new();
        for (i, r) in self.rows.iter().enumerate() {
            if !seen.insert(&r.id) {
                return Err(FieldError::new(format!("rows[{i}].id"), format!("`{}` is used twice", r.id)));
            }
        }
        Ok(())
    }

    pub fn row(&self, id: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.id == id)
    }

    /// Which row a resolved flow belongs to.
    pub fn classify(
        &self,
        flow: &ResolvedFlow<'_>,
        inv: &Inventory,
        values: &Values,
    ) -> Result<Classification, InputError> {
        let o = &Observation::of(flow);
        let mut fits = Vec::new();
        for r in &self.rows {
            if r.direction == o.direction
                && self.ports_fit(r, o, values)?
                && peer_fits(&r.peer, !r.ports.is_empty(), o, inv, values)?
            {
                fits.push(r);
            }
        }
        let Some(first) = fits.first() else {
            return Ok(Classification {
                row: None,
                also: Vec::new(),
                unexpected: true,
                why: Some(format!("no row of the {} matrix expects this flow", self.workload)),
            });
        };
        let enabled = first.when.as_deref().map(|c| values.condition(c)).transpose()?.unwrap_or(true);
        Ok(Classification {
            row: Some(first.id.clone()),
            also: fits[1..].iter().map(|r| r.id.clone()).collect(),
            unexpected: !enabled,
            why: (!enabled).then(|| {
                format!(
                    "row `{}` is off in {} (`{}`): this traffic should not happen",
                    first.id,
                    values.origin,
                    first.when.as_deref().unwrap_or("")
                )
            }),
        })
    }

    fn ports_fit(&self, r: &Row, o: &Observation<'_>, values: &Values) -> Result<bool, InputError> {
        if r.ports.is_empty() {
            return Ok(true);
        }
        for p in &r.ports {
            if p.protocol != o.protocol {
                continue;
            }
            let want = match &p.port {
                None => return Ok(true),
                Some(PortRef::Number(n)) => *n,
                Some(PortRef::Value(key)) => values.port(key)?,
            };
            if o.port == Some(want) || o.backend_ports.contains(&want) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Enabled rows no flow was classified into.
    pub fn unused(&self, used: &BTreeSet<String>, values: &Values) -> Result<Vec<UnusedRow>, InputError> {
        let mut out = Vec::new();
        for r in &self.rows {
            let enabled = r.when.as_deref().map(|c| values.condition(c)).transpose()?.unwrap_or(true);
            if !enabled || used.contains(&r.id) {
                continue;
            }
            let advice = if r.required {
                "required: keep it even though the window saw no such flow".to_string()
            } else {
                "no flow in this window: a candidate to trim from the allowlist (check a longer window first)"
                    .to_string()
            };
            out.push(UnusedRow { id: r.id.clone(), description: r.description.clone(), required: r.required, advice });
        }
        Ok(out)
    }
}

/// `has_ports`: the row names ports, so a host row whose value is unset can still be told by them.
fn peer_fits(
    kind: &PeerKind,
    has_ports: bool,
    o: &Observation<'_>,
    inv: &Inventory,
    values: &Values,
) -> Result<bool, InputError> {
    let ends: Vec<&Party<'_>> = if o.backends.is_empty() { vec![&o.peer] } else { o.backends.iter().collect() };
    let unknown = matches!(o.peer.owner, Owner::External) && o.service.is_none();
    Ok(match kind {
        PeerKind::Any => true,
        PeerKind::Node => ends.iter().any(|e| matches!(e.owner, Owner::Node(_))) || (unknown && inv.nodes.is_empty()),
        // The apiserver's addresses include the `kubernetes` Service's ClusterIPs.
        PeerKind::Apiserver => inv.is_apiserver(o.peer.ip),
        PeerKind::Dns => {
            o.peer.ip == NODE_LOCAL_DNS.parse::<IpAddr>().unwrap()
                || o.service.is_some_and(|s| s.name == "kube-dns" || s.selector.as_ref().is_some_and(is_dns_labels))
                || ends.iter().any(|e| matches!(e.owner, Owner::Pod(p) if is_dns_labels(&p.labels)))
                // Without an inventory, port 53 is all there is to go on.
                || (unknown && inv.is_empty())
        }
        PeerKind::Pods { namespace, labels } => ends.iter().any(|e| match e.owner {
            Owner::Pod(p) => {
                namespace.as_ref().is_none_or(|n| *n == p.namespace)
                    && labels.as_ref().is_none_or(|l| l.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
            }
            _ => false,
        }),
        PeerKind::External => ends.iter().all(|e| matches!(e.owner, Owner::External)) && !inv.is_apiserver(o.peer.ip),
        PeerKind::Host { value } => {
            let host = values.str(value)?;
            if host.is_empty() {
                // Unset in the values: only the row's own ports can tell (none: nothing fits).
                has_ports
            } else {
                host_fits(&host, o)
            }
        }
    })
}

fn is_dns_labels(l: &Labels) -> bool {
    l.get("k8s-app").is_some_and(|v| v == "kube-dns")
}

/// Whether the flow went to `host` (a name, an address, `host:port`, or a URL): by address, by a
/// DNS name the workload resolved, or by the Service a `<svc>.<ns>.svc` name means.
fn host_fits(host: &str, o: &Observation<'_>) -> bool {
    let (name, port) = split_host(host);
    if port.is_some_and(|p| o.port != Some(p) && !o.backend_ports.contains(&p)) {
        return false;
    }
    if let Ok(ip) = name.parse::<IpAddr>() {
        return o.peer.ip == ip;
    }
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if o.peer.names.iter().any(|n| n.trim_end_matches('.').eq_ignore_ascii_case(&name)) {
        return true;
    }
    let mut parts = name.split('.');
    match (parts.next(), parts.next(), parts.next(), o.service) {
        (Some(svc), Some(ns), Some("svc"), Some(s)) => s.name == svc && s.namespace == ns,
        _ => false,
    }
}

/// `https://host:9000/x` → (`host`, Some(9000)).
pub fn split_host(s: &str) -> (&str, Option<u16>) {
    let s = s.split_once("://").map(|(_, rest)| rest).unwrap_or(s);
    let s = s.split('/').next().unwrap_or(s);
    if let Some(rest) = s.strip_prefix('[') {
        // [v6]:port
        let (addr, tail) = rest.split_once(']').unwrap_or((rest, ""));
        return (addr, tail.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, p.parse().ok()),
        _ => (s, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_matrix_is_valid_and_names_the_rows() {
        let m = Matrix::default_matrix();
        let ids: Vec<_> = m.rows.iter().map(|r| r.id.as_str()).collect();
        for want in ["health", "webhook", "metrics", "gate", "mcp", "dns", "apiserver", "s3-rollback-store", "otlp"] {
            assert!(ids.contains(&want), "{want}");
        }
        // Every port a row names through the chart's values resolves against the defaults.
        let v = Values::defaults();
        for r in &m.rows {
            for p in &r.ports {
                if let Some(PortRef::Value(k)) = &p.port {
                    v.port(k).unwrap();
                }
            }
        }
    }

    #[test]
    fn hosts_split() {
        assert_eq!(split_host("minio.storage.svc:9000"), ("minio.storage.svc", Some(9000)));
        assert_eq!(split_host("https://s3.example.com/bucket"), ("s3.example.com", None));
        assert_eq!(split_host("[2001:db8::1]:4317"), ("2001:db8::1", Some(4317)));
        assert_eq!(split_host("2001:db8::1"), ("2001:db8::1", None));
    }

    #[test]
    fn bad_matrix_files_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.yaml");
        std::fs::write(&p, "workload: x\nrows:\n- {id: a, direction: sideways, peer: {kind: any}}\n").unwrap();
        let msg = format!("{:#}", Matrix::load(&p).unwrap_err());
        assert!(msg.contains("m.yaml") && msg.contains("rows[0].direction"), "{msg}");
        std::fs::write(&p, "workload: x\nrows:\n- {id: a, direction: egress, peer: {kind: any}}\n- {id: a, direction: egress, peer: {kind: any}}\n").unwrap();
        assert!(format!("{:#}", Matrix::load(&p).unwrap_err()).contains("`a` is used twice"));
    }
}
