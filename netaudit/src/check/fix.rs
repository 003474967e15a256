//! Fix hints: what to change so the cutting end admits a flow, in the engine's own terms.

use std::net::IpAddr;

use crate::{
    inventory::{Inventory, Owner},
    model::{Direction, Protocol},
    policy::{
        Engine,
        evaluate::{Decider, SideVerdict},
    },
    resolve::Party,
};

/// The connection a fix is for: who opened it, who served it, on which port.
pub(super) struct Cut<'a, 'r> {
    pub engine: Option<Engine>,
    /// The flow's direction (from the workload's side).
    pub direction: Direction,
    /// The cutting end's verdict.
    pub side: &'a SideVerdict,
    pub src: &'a Party<'r>,
    pub dst: &'a Party<'r>,
    pub protocol: Protocol,
    pub port: Option<u16>,
}

/// What to change so the cut end admits the flow, in the engine's terms where we know it.
pub(super) fn fix(c: &Cut<'_, '_>, inv: &Inventory) -> String {
    let s = c.side;
    let (proto, port_s) = (c.protocol, c.port.map(|p| format!(" port {p}")).unwrap_or_default());
    let peer = match s.side {
        Direction::Egress => c.dst,
        Direction::Ingress => c.src,
    };
    if let Some(p) = &s.policy
        && s.tier != Decider::Namespaced
    {
        return format!(
            "{} {} decides this ({} tier): change that rule, or ask its owner",
            p,
            s.rule.as_deref().unwrap_or(""),
            s.tier.name()
        );
    }
    // The workload opened the connection but the server's own ingress policy cut it.
    if s.side == Direction::Ingress && c.direction == Direction::Egress {
        return format!(
            "{} is isolated for ingress by {}: its namespace must allow {proto}{port_s} from {}",
            s.pod,
            s.isolated_by.join(", "),
            c.src.describe()
        );
    }
    let apiserver = inv.is_apiserver(peer.ip);
    let dir = if s.side == Direction::Egress { "egress to" } else { "ingress from" };
    let where_ = match (c.engine, s.side) {
        (Some(Engine::Kubernetes), Direction::Egress) => " in networkPolicy.egress.to".to_string(),
        (Some(Engine::Kubernetes), Direction::Ingress) => {
            " in networkPolicy.<port>.from or additionalIngress".to_string()
        }
        (Some(e), Direction::Egress) => format!(" in networkPolicy.{}.egress", e.name()),
        (Some(e), Direction::Ingress) => format!(" in networkPolicy.{}.ingress", e.name()),
        (None, _) => String::new(),
    };
    let note = if apiserver && s.side == Direction::Egress {
        " — the apiserver's endpoint address and port, not the Service's ClusterIP:443"
    } else {
        ""
    };
    let rule = peer_rule(c.engine, peer, apiserver);
    format!("allow {dir} {}: {rule}, {proto}{port_s}{where_}{note}", peer.describe())
}

/// How the engine's rule names `peer`.
fn peer_rule(engine: Option<Engine>, peer: &Party<'_>, apiserver: bool) -> String {
    let host = match peer.ip {
        IpAddr::V4(ip) => format!("{ip}/32"),
        IpAddr::V6(ip) => format!("{ip}/128"),
    };
    match (engine, peer.owner) {
        (Some(Engine::Cilium), _) if apiserver => "toEntities: [kube-apiserver]".to_string(),
        (Some(Engine::Cilium), Owner::Pod(p)) => {
            format!("toEndpoints: [{{matchLabels: {{k8s:io.kubernetes.pod.namespace: {}}}}}]", p.namespace)
        }
        (Some(Engine::Cilium), Owner::Node(_)) => "toEntities: [host, remote-node]".into(),
        (Some(Engine::Cilium), Owner::External) if !peer.names.is_empty() => {
            format!("toFQDNs: [{{matchName: {}}}] (with a DNS rule for visibility), or toCIDR: [{host}]", peer.names[0])
        }
        (Some(Engine::Cilium), Owner::External) => format!("toCIDR: [{host}]"),
        (Some(Engine::Calico), Owner::Pod(p)) => {
            format!("destination: {{namespaceSelector: \"kubernetes.io/metadata.name == '{}'\"}}", p.namespace)
        }
        (Some(Engine::Calico), _) => format!("destination: {{nets: [{host}]}}"),
        (Some(Engine::ClusterNetworkPolicy), Owner::Pod(p)) => {
            format!("to: [{{namespaces: {{matchLabels: {{kubernetes.io/metadata.name: {}}}}}}}]", p.namespace)
        }
        (Some(Engine::ClusterNetworkPolicy), _) => format!("to: [{{networks: [{host}]}}]"),
        (_, Owner::Pod(p)) => format!(
            "namespaceSelector kubernetes.io/metadata.name={} (plus a podSelector on its stable labels)",
            p.namespace
        ),
        (_, _) => format!("ipBlock {{cidr: {host}}}"),
    }
}
