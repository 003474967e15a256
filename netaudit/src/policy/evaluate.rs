//! Judging one connection against a set of policies.
//!
//! A connection is judged at each end that is a pod: egress at the initiator, ingress at the
//! server; it passes when every judged end allows it (an end that is not a pod is judged on the
//! pod side only). Per end the tiers go in the dataplane's order:
//!
//! 1. ClusterNetworkPolicy Admin, by priority, rules in order: Accept/Deny decide, Pass skips to 2.
//! 2. The namespaced tier: Cilium deny rules first (deny beats allow), then policies by order
//!    (Calico `order`; NetworkPolicy and Cilium allows at 1000), first matching rule decides
//!    (Calico Pass skips to 3, Log goes on). A pod selected by any policy of the direction is
//!    isolated: no matching rule means denied, and Baseline is not consulted.
//! 3. ClusterNetworkPolicy Baseline, by priority.
//! 4. Otherwise allowed.
//!
//! Traffic from the pod's own node is always admitted (kubelet probes): NetworkPolicy cannot block
//! it, and Cilium allows host→endpoint by default.

use std::{cell::RefCell, collections::HashMap, fmt, sync::Arc};

use serde::Serialize;

use super::{Action, Entity, NsSel, PeerSel, Policy, PolicyId, PortSel, PortSpec, Rule, Tier};
use crate::{
    inventory::{Inventory, Labels, NAMESPACE_NAME_LABEL, Owner, PodInfo},
    model::{Direction, Protocol},
    resolve::Party,
};

#[derive(Clone, Copy, Debug)]
pub struct Conn<'a> {
    pub protocol: Protocol,
    pub src: Party<'a>,
    pub dst: Party<'a>,
    /// The destination (service) port; none for ICMP.
    pub port: Option<u16>,
}

/// Which stage of the dataplane's order decided an end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decider {
    /// ClusterNetworkPolicy's Admin tier.
    Admin,
    /// NetworkPolicy, Cilium and Calico policies (and isolation's default deny).
    Namespaced,
    /// ClusterNetworkPolicy's Baseline tier.
    Baseline,
    /// No policy isolates the pod: allowed.
    Default,
    /// Traffic from the pod's own node, which policy never blocks.
    OwnNode,
}

impl Decider {
    pub fn name(self) -> &'static str {
        match self {
            Decider::Admin => "admin",
            Decider::Namespaced => "namespaced",
            Decider::Baseline => "baseline",
            Decider::Default => "default",
            Decider::OwnNode => "own-node",
        }
    }
}

/// How one end decided.
#[derive(Clone, Debug, Serialize)]
pub struct SideVerdict {
    pub side: Direction,
    /// The pod judged (`namespace/name`).
    pub pod: String,
    pub allowed: bool,
    /// `admin`, `namespaced`, `baseline`, `default` or `own-node`.
    pub tier: Decider,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<std::sync::Arc<PolicyId>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// For an isolated pod with no matching rule: the policies that isolate it.
    #[serde(skip_serializing_if = "is_empty")]
    pub isolated_by: Arc<[String]>,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ConnVerdict {
    pub allowed: bool,
    pub sides: Vec<SideVerdict>,
}

fn is_empty(names: &Arc<[String]>) -> bool {
    names.is_empty()
}

/// The namespaced policies that select one pod for one side, in precedence order.
#[derive(Debug)]
struct Selecting {
    /// Indexes into the evaluator's `namespaced`.
    indexes: Vec<usize>,
    /// The names of those that isolate it, and them joined: what every verdict of a flow no
    /// rule allows says (the pod's flows share them).
    isolated_by: Arc<[String]>,
    isolated_by_joined: String,
}

/// (pod address, side) → the namespaced policies selecting it.
type SelectingCache = HashMap<(usize, Direction), Arc<Selecting>>;

/// Which namespaced policies select which pod, per side: filled as flows are judged (most flows
/// share their pods), and reusable by later evaluators of the same policies and inventory. Pods
/// are keyed by address, so a cache must not outlive the inventory it was filled from.
#[derive(Debug, Default)]
pub struct Selections(RefCell<SelectingCache>);

pub struct Evaluator<'a> {
    inv: &'a Inventory,
    admin: Vec<&'a Policy>,
    namespaced: Vec<&'a Policy>,
    baseline: Vec<&'a Policy>,
    own: Selections,
    kept: Option<&'a Selections>,
}

impl<'a> Evaluator<'a> {
    pub fn new(inv: &'a Inventory, policies: &'a [Policy]) -> Evaluator<'a> {
        Evaluator::with_selections(inv, policies, None)
    }

    /// An evaluator that fills (and reuses) `kept` instead of a cache of its own.
    pub fn with_selections(inv: &'a Inventory, policies: &'a [Policy], kept: Option<&'a Selections>) -> Evaluator<'a> {
        let mut admin = Vec::new();
        let mut namespaced = Vec::new();
        let mut baseline = Vec::new();
        for p in policies {
            match p.tier {
                Tier::Admin(_) => admin.push(p),
                Tier::Namespaced(_) => namespaced.push(p),
                Tier::Baseline(_) => baseline.push(p),
            }
        }
        let key = |p: &&Policy| match p.tier {
            Tier::Admin(n) | Tier::Baseline(n) => n as f64,
            Tier::Namespaced(o) => o,
        };
        let by_precedence =
            |a: &&Policy, b: &&Policy| key(a).total_cmp(&key(b)).then_with(|| a.id.name.cmp(&b.id.name));
        admin.sort_by(by_precedence);
        namespaced.sort_by(by_precedence);
        baseline.sort_by(by_precedence);
        Evaluator { inv, admin, namespaced, baseline, own: Selections::default(), kept }
    }

    pub fn inventory(&self) -> &'a Inventory {
        self.inv
    }

    pub fn judge(&self, c: &Conn<'_>) -> ConnVerdict {
        let mut sides = Vec::new();
        if let Owner::Pod(p) = c.src.owner {
            sides.push(self.side(Direction::Egress, p, &c.dst, c.protocol, c.port));
        }
        if let Owner::Pod(p) = c.dst.owner {
            sides.push(self.side(Direction::Ingress, p, &c.src, c.protocol, c.port));
        }
        ConnVerdict { allowed: sides.iter().all(|s| s.allowed), sides }
    }

    /// Judges one end: `subject` sending (egress) to or receiving (ingress) from `peer`.
    pub fn side(
        &self,
        side: Direction,
        subject: &PodInfo,
        peer: &Party<'_>,
        proto: Protocol,
        port: Option<u16>,
    ) -> SideVerdict {
        let m = Match { ev: self, side, subject, peer, proto, port };
        if side == Direction::Ingress
            && let Owner::Node(n) = peer.owner
            && subject.node_name.as_deref() == Some(n.name.as_str())
        {
            let reason = format!(
                "{} comes from the pod's own node {}: never blocked by policy (kubelet probes)",
                m.what(),
                n.name
            );
            return m.verdict(true, Decider::OwnNode, None, reason);
        }
        if let Tiered::Decided(v) = m.tier(Decider::Admin, self.admin.iter().copied()) {
            return v;
        }
        let selecting = self.selecting(subject, side);
        match m.tier(Decider::Namespaced, selecting.indexes.iter().map(|&i| self.namespaced[i])) {
            Tiered::Decided(v) => return v,
            Tiered::Passed => {}
            Tiered::NoMatch if !selecting.isolated_by.is_empty() => {
                let reason = format!(
                    "{}/{} is isolated for {} by {}, and no rule there allows {}",
                    subject.namespace,
                    subject.name,
                    side_name(side),
                    selecting.isolated_by_joined,
                    m.what()
                );
                let mut v = m.verdict(false, Decider::Namespaced, None, reason);
                v.isolated_by = selecting.isolated_by.clone();
                return v;
            }
            Tiered::NoMatch => {}
        }
        if let Tiered::Decided(v) = m.tier(Decider::Baseline, self.baseline.iter().copied()) {
            return v;
        }
        let (ns, name, side) = (&subject.namespace, &subject.name, side_name(side));
        let reason = format!("no policy isolates {ns}/{name} for {side}: {} is allowed", m.what());
        m.verdict(true, Decider::Default, None, reason)
    }

    /// The policies that select `pod` for `side` (cached per pod and side).
    fn selecting(&self, pod: &PodInfo, side: Direction) -> Arc<Selecting> {
        let cache = &self.kept.unwrap_or(&self.own).0;
        let key = (pod as *const PodInfo as usize, side);
        if let Some(v) = cache.borrow().get(&key) {
            return v.clone();
        }
        let indexes: Vec<usize> = (self.namespaced.iter().enumerate())
            .filter(|(_, p)| rules_for(p, side).is_some() && self.subject_matches(p, pod))
            .map(|(i, _)| i)
            .collect();
        let mut names: Vec<String> =
            indexes.iter().map(|&i| self.namespaced[i]).filter(|p| p.isolates).map(|p| p.id.to_string()).collect();
        names.dedup();
        let isolated_by_joined = names.join(", ");
        let v = Arc::new(Selecting { indexes, isolated_by: names.into(), isolated_by_joined });
        cache.borrow_mut().insert(key, v.clone());
        v
    }

    fn subject_matches(&self, p: &Policy, pod: &PodInfo) -> bool {
        !pod.host_network && self.ns_matches(&p.subject.ns, &pod.namespace) && p.subject.pods.matches(&pod.labels)
    }

    fn ns_matches(&self, sel: &NsSel, ns: &str) -> bool {
        match sel {
            NsSel::Any => true,
            NsSel::Named(n) => n == ns,
            NsSel::Matching(s) => match self.inv.namespace_labels(ns) {
                Some(l) => s.matches(l),
                // A namespace missing from the inventory still carries its name label.
                None => s.matches(&Labels::from([(NAMESPACE_NAME_LABEL.to_string(), ns.to_string())])),
            },
        }
    }
}

fn rules_for(p: &Policy, side: Direction) -> Option<&Vec<Rule>> {
    match side {
        Direction::Egress => p.egress.as_ref(),
        Direction::Ingress => p.ingress.as_ref(),
    }
}

/// One end's question, asked of rule after rule.
struct Match<'e, 'a> {
    ev: &'e Evaluator<'a>,
    side: Direction,
    subject: &'e PodInfo,
    peer: &'e Party<'e>,
    proto: Protocol,
    port: Option<u16>,
}

/// How a tier ended for one end.
enum Tiered {
    Decided(SideVerdict),
    /// A Pass rule: go on to the next tier.
    Passed,
    NoMatch,
}

impl Match<'_, '_> {
    /// Walks the policies of one tier in precedence order: the first matching rule's action decides.
    fn tier<'p>(&self, tier: Decider, policies: impl Iterator<Item = &'p Policy>) -> Tiered {
        for p in policies {
            if let Some((r, action)) = self.first_rule(p) {
                let verb = match (action, tier) {
                    (Action::Allow, Decider::Namespaced) => "allowed",
                    (Action::Allow, _) => "accepted",
                    (Action::Deny, _) => "denied",
                    (Action::Pass, _) => return Tiered::Passed,
                    (Action::Log, _) => continue,
                };
                let reason = format!("{} is {verb} by {} {}", self.what(), p.id, r.label);
                return Tiered::Decided(self.verdict(action == Action::Allow, tier, Some((p, r)), reason));
            }
        }
        Tiered::NoMatch
    }

    fn verdict(&self, allowed: bool, tier: Decider, by: Option<(&Policy, &Rule)>, reason: String) -> SideVerdict {
        SideVerdict {
            side: self.side,
            pod: self.subject.id(),
            allowed,
            tier,
            policy: by.map(|(p, _)| p.id.clone()),
            rule: by.map(|(_, r)| r.label.clone()),
            isolated_by: Arc::from([]),
            reason,
        }
    }

    fn what(&self) -> Asked<'_> {
        Asked { side: self.side, peer: self.peer, proto: self.proto, port: self.port }
    }

    /// The first rule of `p` (for this side) that matches, if `p` selects the subject.
    fn first_rule<'p>(&self, p: &'p Policy) -> Option<(&'p Rule, Action)> {
        let rules = rules_for(p, self.side)?;
        if !self.ev.subject_matches(p, self.subject) {
            return None;
        }
        rules.iter().find(|r| self.rule_matches(r)).map(|r| (r, r.action))
    }

    fn rule_matches(&self, r: &Rule) -> bool {
        if let Some(local) = &r.local
            && !local.matches(&self.subject.labels)
        {
            return false;
        }
        (r.ports.is_empty() || r.ports.iter().any(|p| self.port_matches(p)))
            && !r.not_ports.iter().any(|p| self.port_matches(p))
            && self.peer_matches(&r.peer)
    }

    fn port_matches(&self, sel: &PortSel) -> bool {
        if sel.protocol.is_some_and(|p| p != self.proto) {
            return false;
        }
        match &sel.port {
            PortSpec::Any => true,
            PortSpec::Range(lo, hi) => self.port.is_some_and(|p| (*lo..=*hi).contains(&p)),
            PortSpec::Named(name) => {
                // Named ports belong to the destination pod: the subject on ingress, the peer on egress.
                let dst = match self.side {
                    Direction::Ingress => Some(self.subject),
                    Direction::Egress => match self.peer.owner {
                        Owner::Pod(p) => Some(p),
                        _ => None,
                    },
                };
                dst.and_then(|d| d.named_port(name, self.proto)).is_some_and(|n| Some(n) == self.port)
            }
        }
    }

    fn peer_matches(&self, sel: &PeerSel) -> bool {
        let inv = self.ev.inv;
        let ip = self.peer.ip;
        match sel {
            PeerSel::Any => true,
            PeerSel::Nothing => false,
            PeerSel::Pods { ns, pods } => match self.peer.owner {
                Owner::Pod(p) => !p.host_network && self.ev.ns_matches(ns, &p.namespace) && pods.matches(&p.labels),
                _ => false,
            },
            PeerSel::Ip { net, except, world_only } => {
                net.contains(&ip)
                    && !except.iter().any(|e| e.contains(&ip))
                    && (!world_only || (matches!(self.peer.owner, Owner::External) && !inv.is_apiserver(ip)))
            }
            PeerSel::Nodes(s) => matches!(self.peer.owner, Owner::Node(n) if s.matches(&n.labels)),
            PeerSel::Entity(e) => match e {
                Entity::All => true,
                Entity::World => matches!(self.peer.owner, Owner::External),
                Entity::WorldIpv4 => matches!(self.peer.owner, Owner::External) && ip.is_ipv4(),
                Entity::WorldIpv6 => matches!(self.peer.owner, Owner::External) && ip.is_ipv6(),
                Entity::Cluster => !matches!(self.peer.owner, Owner::External),
                Entity::Host => {
                    matches!(self.peer.owner, Owner::Node(n) if self.subject.node_name.as_deref() == Some(n.name.as_str()))
                }
                Entity::RemoteNode => {
                    matches!(self.peer.owner, Owner::Node(n) if self.subject.node_name.as_deref() != Some(n.name.as_str()))
                }
                Entity::KubeApiserver => inv.is_apiserver(ip),
                Entity::Other => false,
            },
            PeerSel::Fqdn(patterns) => self.peer.names.iter().any(|n| patterns.iter().any(|p| fqdn_matches(p, n))),
            PeerSel::AnyOf(v) => v.iter().any(|s| self.peer_matches(s)),
            PeerSel::All(v) => v.iter().all(|s| self.peer_matches(s)),
            PeerSel::Not(s) => !self.peer_matches(s),
        }
    }
}

/// DNS name patterns: `*` alone matches every name; `*` elsewhere matches within one label;
/// a leading `**.` matches one or more labels. Case and a trailing dot do not matter.
pub fn fqdn_matches(pattern: &str, name: &str) -> bool {
    let p = pattern.trim_end_matches('.').to_ascii_lowercase();
    let n = name.trim_end_matches('.').to_ascii_lowercase();
    if p == "*" {
        return true;
    }
    if let Some(suffix) = p.strip_prefix("**.") {
        return n.len() > suffix.len() + 1
            && n.ends_with(suffix)
            && n.as_bytes()[n.len() - suffix.len() - 1] == b'.'
            && glob(suffix, &n[n.len() - suffix.len()..]);
    }
    glob(&p, &n)
}

/// `*` matches any run of characters other than '.'.
fn glob(p: &str, n: &str) -> bool {
    match p.split_once('*') {
        None => p == n,
        Some((head, tail)) => {
            let Some(rest) = n.strip_prefix(head) else { return false };
            (0..=rest.len()).take_while(|&i| !rest[..i].contains('.')).any(|i| glob(tail, &rest[i..]))
        }
    }
}

fn side_name(s: Direction) -> &'static str {
    match s {
        Direction::Egress => "egress",
        Direction::Ingress => "ingress",
    }
}

/// What one end's question is about, as reasons say it: `TCP/443 to pod x/a (10.0.0.1)`.
/// Written straight into the reason (a verdict's reason is built for every judged flow).
struct Asked<'a> {
    side: Direction,
    peer: &'a Party<'a>,
    proto: Protocol,
    port: Option<u16>,
}

impl fmt::Display for Asked<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.proto)?;
        if let Some(p) = self.port {
            write!(f, "/{p}")?;
        }
        let to = if self.side == Direction::Egress { "to" } else { "from" };
        write!(f, " {to} {}", self.peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fqdn_patterns() {
        for (p, n, want) in [
            ("s3.example.com", "S3.example.com.", true),
            ("*.example.com", "s3.example.com", true),
            ("*.example.com", "a.b.example.com", false),
            ("**.example.com", "a.b.example.com", true),
            ("**.example.com", "example.com", false),
            ("*", "anything.at.all", true),
            ("s3-*.amazonaws.com", "s3-eu-west-1.amazonaws.com", true),
            ("s3-*.amazonaws.com", "s3.amazonaws.com", false),
        ] {
            assert_eq!(fqdn_matches(p, n), want, "{p} vs {n}");
        }
    }
}
