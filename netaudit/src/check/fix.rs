//! Fix hints: what to change so the cutting end admits a flow, in the engine's own terms.

use ipnet::IpNet;

use crate::{
    inventory::{Inventory, Labels, Owner},
    model::{Direction, Protocol},
    policy::{
        Engine, PeerRef, calico, cilium, cluster_network_policy,
        evaluate::{Decider, SideVerdict},
        kubernetes,
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
            c.src
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
    format!("allow {dir} {peer}: {rule}, {proto}{port_s}{where_}{note}")
}

/// How the engine's rule names `peer`, written by the engine's dialect module (JSON, which YAML
/// reads as it is).
fn peer_rule(engine: Option<Engine>, peer: &Party<'_>, apiserver: bool) -> String {
    let host = IpNet::from(peer.ip);
    let no_labels = Labels::new();
    let first_name = &peer.names[..peer.names.len().min(1)];
    let named = match peer.owner {
        _ if apiserver => PeerRef::Apiserver { addresses: std::slice::from_ref(&peer.ip) },
        Owner::Pod(p) => PeerRef::Pods { namespace: &p.namespace, labels: &no_labels },
        Owner::Node(_) => PeerRef::Node { net: host },
        Owner::External => PeerRef::Networks { nets: std::slice::from_ref(&host), names: first_name },
    };
    let stable_labels =
        if matches!(named, PeerRef::Pods { .. }) { " (plus a podSelector on its stable labels)" } else { "" };
    match engine {
        Some(Engine::Kubernetes) => format!("to: {}{stable_labels}", json(kubernetes::write::peers(named))),
        Some(Engine::Cilium) => {
            let rule = json(cilium::write::egress_rule(named, &[]));
            if first_name.is_empty() {
                return rule;
            }
            let by_address = PeerRef::Networks { nets: std::slice::from_ref(&host), names: &[] };
            format!("{rule} (with a DNS rule for visibility), or {}", json(cilium::write::egress_rule(by_address, &[])))
        }
        Some(Engine::Calico) => format!("destination: {}", json(calico::write::destination(named))),
        Some(Engine::ClusterNetworkPolicy) => format!("to: {}", json(cluster_network_policy::write::peers(named))),
        None => match peer.owner {
            Owner::Pod(p) => format!("namespaceSelector kubernetes.io/metadata.name={}{stable_labels}", p.namespace),
            _ => format!("ipBlock {{cidr: {host}}}"),
        },
    }
}

/// A rule part as compact JSON.
fn json(v: impl serde::Serialize) -> String {
    serde_json::to_string(&v).expect("plain data")
}
