//! A proposal in each engine's schema: the chart's `networkPolicy:` values (paste-ready, with a
//! comment per rule naming the peer and the evidence), complete manifests (the chart's own
//! rendering of those values, so they are exactly what an install would create), or JSON.

use serde_json::{Value, json};

use super::{EgressRule, Peer, PortProto, Proposal};
use crate::{
    chart::{CHART_NAME, Values},
    error::{Error, InputError},
    input::Document,
    inventory::Labels,
    model::{DNS_PORT, DNS_PROTOCOLS},
    policy::{Engine, PeerRef, calico, cilium, cluster_network_policy, kubernetes},
};

/// Every address, both families.
fn everywhere() -> [ipnet::IpNet; 2] {
    ["0.0.0.0/0".parse().expect("valid"), "::/0".parse().expect("valid")]
}

pub fn labels_text(l: &Labels) -> String {
    if l.is_empty() {
        return "(no identifying labels)".into();
    }
    l.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

impl Peer {
    /// The peer as the dialects' writers take it.
    fn as_ref(&self) -> PeerRef<'_> {
        match self {
            Peer::Pods { namespace, labels } => PeerRef::Pods { namespace, labels },
            Peer::Apiserver { addresses } => PeerRef::Apiserver { addresses },
            Peer::Addresses { nets, names } => PeerRef::Networks { nets, names },
        }
    }
}

fn value(rule: impl serde::Serialize) -> Value {
    serde_json::to_value(rule).expect("plain data")
}

/// The rule (or rules: Calico takes one protocol per rule) for one proposed egress peer; none
/// when the peer has no address to name.
fn egress_rules(engine: Engine, r: &EgressRule, index: usize) -> Vec<Value> {
    let (peer, ports) = (r.peer.as_ref(), r.ports.as_slice());
    match engine {
        Engine::Kubernetes => kubernetes::write::egress_rule(peer, ports).map(value).into_iter().collect(),
        Engine::Cilium => vec![value(cilium::write::egress_rule(peer, ports))],
        Engine::Calico => calico::write::egress_rules(peer, ports).into_iter().map(value).collect(),
        Engine::ClusterNetworkPolicy => {
            let name = format!("{}-{index}", r.rows.first().map_or("egress", String::as_str));
            cluster_network_policy::write::rule(&name, "Accept", peer, ports).map(value).into_iter().collect()
        }
    }
}

/// The DNS rule that replaces the chart's where the chart's is wrong for this engine.
fn dns_rules(engine: Engine, p: &Proposal) -> Vec<Value> {
    if p.dns.chart_rule {
        return vec![];
    }
    let ports = DNS_PROTOCOLS.map(|protocol| PortProto { protocol, port: DNS_PORT });
    let peer = PeerRef::Pods { namespace: &p.dns.namespace, labels: &p.dns.labels };
    match engine {
        Engine::Cilium => vec![value(cilium::write::with_dns_visibility(cilium::write::egress_rule(peer, &ports)))],
        // One rule per protocol, UDP first, as the chart writes its own.
        Engine::Calico => calico::write::egress_rules(peer, &ports).into_iter().map(value).collect(),
        _ => vec![],
    }
}

fn ingress_peer(p: &Peer) -> Vec<Value> {
    kubernetes::write::peers(p.as_ref()).into_iter().map(value).collect()
}

/// The egress rules of the proposal in the engine's schema, each with its comment. `skip`
/// leaves one proposed rule out (for the minimality check).
pub fn egress_items(p: &Proposal, skip: Option<usize>) -> Vec<(Vec<String>, Value)> {
    let mut out = Vec::new();
    for (i, r) in p.egress.iter().enumerate() {
        if Some(i) == skip {
            continue;
        }
        let rules = egress_rules(p.engine, r, i);
        let comment = rule_comment(r);
        if rules.is_empty() {
            out.push((
                vec![comment[0].clone(), "NOT RENDERED: the apiserver endpoints are unknown; add an ipBlock for each endpoint address and its port".into()],
                Value::Null,
            ));
            continue;
        }
        for (j, rule) in rules.into_iter().enumerate() {
            out.push((if j == 0 { comment.clone() } else { vec![] }, rule));
        }
    }
    if !p.dns.chart_rule {
        for (j, rule) in dns_rules(p.engine, p).into_iter().enumerate() {
            out.push((if j == 0 { vec![format!("dns (required): {}", p.dns.note)] } else { vec![] }, rule));
        }
    }
    if p.engine == Engine::ClusterNetworkPolicy {
        out.push((
            vec![
                "enforcement: Accept rules alone restrict nothing; this Deny after them makes the list an allowlist.".into(),
                "`networks` covers pods, nodes and external addresses alike (the chart's `namespaces: {}` deny covers pods only).".into(),
            ],
            value(
                cluster_network_policy::write::rule("deny-all-other-egress", "Deny", PeerRef::Networks { nets: &everywhere(), names: &[] }, &[])
                    .expect("addresses given"),
            ),
        ));
    }
    out
}

fn rule_comment(r: &EgressRule) -> Vec<String> {
    let who = match &r.peer {
        Peer::Pods { namespace, labels } => format!("pods in {namespace} ({})", labels_text(labels)),
        Peer::Apiserver { addresses } => {
            let a: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
            format!("the kube-apiserver (endpoints {})", if a.is_empty() { "unknown".into() } else { a.join(", ") })
        }
        Peer::Addresses { nets, names } => {
            let n: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
            if names.is_empty() { n.join(", ") } else { format!("{} ({})", n.join(", "), names.join(", ")) }
        }
    };
    let rows = if r.rows.is_empty() { "unexpected".to_string() } else { r.rows.join(", ") };
    let mut c = vec![format!("{rows}{}: {who}", if r.required { " (required)" } else { "" })];
    if r.evidence.flows > 0 {
        c.push(format!("evidence: {}", r.evidence.summary()));
        let seen: Vec<&String> = r.evidence.seen.iter().take(4).collect();
        c.push(format!(
            "seen: {}{}",
            seen.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("; "),
            if r.evidence.seen.len() > 4 { "; …" } else { "" }
        ));
    }
    if let Some(n) = &r.note {
        c.push(n.clone());
    }
    c
}

/// The proposal as the chart's `networkPolicy` values (data; comments come with [`values_yaml`]).
pub fn values(p: &Proposal, skip: Option<usize>) -> Value {
    let items: Vec<Value> = egress_items(p, skip).into_iter().map(|(_, v)| v).filter(|v| !v.is_null()).collect();
    let mut np = json!({
        "enabled": true,
        "engine": p.engine.name(),
        "egress": {"enabled": true, "dns": p.dns.chart_rule, "dnsNamespace": p.dns.namespace},
    });
    match p.engine {
        Engine::Kubernetes => {
            np["egress"]["to"] = Value::Array(items);
            // Open ports say so (`from: []`), as the printed values do: applied over values that
            // restricted a port before, the proposal must reopen it.
            for port in p.ingress.iter().filter(|p| p.name != "health") {
                let from: Vec<Value> =
                    if port.open { Vec::new() } else { port.from.iter().flat_map(ingress_peer).collect() };
                np[&port.name] = json!({ "from": from });
            }
        }
        e => np[e.name()] = json!({"egress": items}),
    }
    json!({"networkPolicy": np})
}

/// Paste-ready values with a comment per rule.
pub fn values_yaml(p: &Proposal) -> Result<String, Error> {
    let mut out = String::new();
    out += &format!("# netaudit propose: engine {}, release {} in {}\n", p.engine, p.release, p.namespace);
    for n in &p.notes {
        out += &format!("# note: {n}\n");
    }
    out += "networkPolicy:\n  enabled: true\n";
    out += &format!("  engine: {}\n", p.engine.name());
    if p.engine == Engine::Kubernetes {
        for port in &p.ingress {
            if port.name == "health" {
                continue;
            }
            out += &format!("  {}:\n", port.name);
            if port.open {
                out += &format!("    from: []  # {}\n", port.why);
            } else {
                out += "    from:\n";
                out += &format!("      # {}\n", port.why);
                for peer in &port.from {
                    for v in ingress_peer(peer) {
                        out += &item(&v, 6)?;
                    }
                }
            }
        }
    }
    out += "  egress:\n    enabled: true\n";
    out += &format!("    # {}\n", p.dns.note);
    out += &format!("    dns: {}\n    dnsNamespace: {}\n", p.dns.chart_rule, p.dns.namespace);
    let (list_key, indent) = match p.engine {
        Engine::Kubernetes => ("    to:\n".to_string(), 6),
        e => (format!("  {}:\n    egress:\n", e.name()), 6),
    };
    out += &list_key;
    for (comments, v) in egress_items(p, None) {
        for c in comments {
            out += &format!("{}# {c}\n", " ".repeat(indent));
        }
        if !v.is_null() {
            out += &item(&v, indent)?;
        }
    }
    if p.engine != Engine::Kubernetes {
        out += &format!(
            "# Under {} the chart opens the ingress ports to all sources; its passthrough list adds, it cannot narrow.\n",
            p.engine
        );
        for port in &p.ingress {
            out += &format!("#   {} ({}): {}\n", port.name, port.port, port.why);
        }
    }
    if !p.unexpected.is_empty() {
        out += &format!(
            "# Unexpected flows ({}):\n",
            if p.include_unexpected { "included above (--include-unexpected)" } else { "NOT allowlisted" }
        );
        for u in &p.unexpected {
            out += &format!(
                "#   #{} {} {} -> {} port {}: {}\n",
                u.index,
                u.protocol,
                u.src,
                u.dst,
                u.port.unwrap_or(0),
                u.why
            );
        }
    }
    Ok(out)
}

/// One YAML list item at `indent`.
fn item(v: &Value, indent: usize) -> Result<String, Error> {
    let text = serde_saphyr::to_string(v).map_err(|source| Error::Yaml { what: "a proposed rule", source })?;
    let pad = " ".repeat(indent);
    let mut out = String::new();
    for (i, line) in text.lines().enumerate() {
        out += &if i == 0 { format!("{pad}- {line}\n") } else { format!("{pad}  {line}\n") };
    }
    Ok(out)
}

/// The complete objects the chart renders from `base` with the proposal applied.
pub fn manifests(p: &Proposal, base: &Values, skip: Option<usize>) -> Result<Vec<Document>, InputError> {
    let values = base.with_overrides(values(p, skip))?;
    let release = crate::chart::Release { name: p.release.clone(), namespace: p.namespace.clone() };
    Ok(values.render(&release))
}

pub fn manifests_yaml(docs: &[Document]) -> Result<String, Error> {
    let values: Vec<&Value> = docs.iter().map(|d| &d.value).collect();
    let mut out = format!("# netaudit propose: the objects the {CHART_NAME} chart renders with the proposed values\n");
    for v in values {
        out += "---\n";
        out += &serde_saphyr::to_string(v).map_err(|source| Error::Yaml { what: "a rendered object", source })?;
    }
    Ok(out)
}
