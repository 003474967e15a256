//! Policies of four engines, read into one model, and the evaluator that judges a connection
//! against them with each engine's real semantics.
//!
//! Every dialect is parsed into [`Policy`]: a tier (ClusterNetworkPolicy Admin, the namespaced
//! tier where NetworkPolicy, Cilium and Calico policies live, ClusterNetworkPolicy Baseline), a
//! subject (which pods it applies to), and per direction either "not applicable" or an ordered
//! rule list. [`evaluate`] then walks the tiers the way the dataplanes do.

pub mod calico;
pub mod cilium;
pub mod cluster_network_policy;
pub mod evaluate;
pub mod kubernetes;
pub mod lint;
pub mod selector;
#[cfg(test)]
mod semantics_tests;

use std::{fmt, str::FromStr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use self::selector::{LabelSelector, Selector};
use crate::{
    error::{FieldError, InputError},
    input::Document,
    model::Protocol,
};

/// The policy engines the audited chart renders for, by the names its values use
/// (`networkPolicy.engine`). The one list of engine names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Engine {
    #[serde(rename = "kubernetes")]
    Kubernetes,
    #[serde(rename = "cilium")]
    Cilium,
    #[serde(rename = "calico")]
    Calico,
    #[serde(rename = "clusterNetworkPolicy")]
    ClusterNetworkPolicy,
}

impl Engine {
    pub const ALL: [Engine; 4] = [Engine::Kubernetes, Engine::Cilium, Engine::Calico, Engine::ClusterNetworkPolicy];

    pub fn name(self) -> &'static str {
        match self {
            Engine::Kubernetes => "kubernetes",
            Engine::Cilium => "cilium",
            Engine::Calico => "calico",
            Engine::ClusterNetworkPolicy => "clusterNetworkPolicy",
        }
    }

    /// The policy object this engine's chart template renders.
    pub fn api_version(self) -> &'static str {
        match self {
            Engine::Kubernetes => "networking.k8s.io/v1",
            Engine::Cilium => "cilium.io/v2",
            Engine::Calico => "projectcalico.org/v3",
            Engine::ClusterNetworkPolicy => "policy.networking.k8s.io/v1alpha2",
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Engine::Kubernetes => "NetworkPolicy",
            Engine::Cilium => "CiliumNetworkPolicy",
            Engine::Calico => "NetworkPolicy",
            Engine::ClusterNetworkPolicy => "ClusterNetworkPolicy",
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Engine {
    type Err = FieldError;
    fn from_str(s: &str) -> Result<Engine, FieldError> {
        Engine::ALL.into_iter().find(|e| e.name() == s).ok_or_else(|| {
            let names: Vec<_> = Engine::ALL.iter().map(|e| e.name()).collect();
            FieldError::whole(format!("`{s}` is not an engine; use one of {}", names.join(", ")))
        })
    }
}

/// A peer as the chart, a proposal or a fix hint names it, before a dialect spells it: each
/// dialect module writes rules to it with its own types (`egress_rules`, `peers`), the same types
/// it reads.
#[derive(Clone, Copy, Debug)]
pub enum PeerRef<'a> {
    /// Every peer: a rule with ports only.
    Any,
    /// The pods of a namespace that carry `labels` (none: every pod of the namespace).
    Pods { namespace: &'a str, labels: &'a std::collections::BTreeMap<String, String> },
    /// The kube-apiserver, at its endpoint addresses (never the Service's ClusterIP).
    Apiserver { addresses: &'a [std::net::IpAddr] },
    /// A node (or a host-network pod), at its address.
    Node { net: IpNet },
    /// Addresses no selector can name, and the DNS names they answered to.
    Networks { nets: &'a [IpNet], names: &'a [String] },
}

/// A destination port and its protocol, as rules list them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct PortProto {
    pub protocol: Protocol,
    pub port: u16,
}

/// Which object a policy came from.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PolicyId {
    pub engine: Engine,
    /// The object's kind (`CiliumClusterwideNetworkPolicy` is still the cilium engine).
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    /// File and document it was read from, or `--values` for rendered ones.
    pub origin: String,
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = if self.engine == Engine::Calico { "projectcalico.org/" } else { "" };
        match &self.namespace {
            Some(ns) => write!(f, "{prefix}{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{prefix}{} {}", self.kind, self.name),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Tier {
    /// ClusterNetworkPolicy Admin tier, by priority (lower first).
    Admin(i32),
    /// NetworkPolicy, Cilium and Calico policies. Calico's `order` sorts it (lower first; none =
    /// last); NetworkPolicy and Cilium allow rules sit at 1000, as Calico itself places
    /// NetworkPolicy. Cilium deny rules go first (deny wins over any allow).
    Namespaced(f64),
    /// ClusterNetworkPolicy Baseline tier: consulted only for pods no namespaced policy isolates.
    Baseline(i32),
}

/// The `order` NetworkPolicy and Cilium allow rules take in the namespaced tier.
pub const NETWORK_POLICY_ORDER: f64 = 1000.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Action {
    Allow,
    Deny,
    /// Skip to the next tier.
    Pass,
    /// Calico: log and continue.
    Log,
}

/// Which namespaces a selector looks in.
#[derive(Clone, Debug, PartialEq)]
pub enum NsSel {
    /// Every namespace.
    Any,
    /// This one namespace (the policy's own, for namespaced selectors).
    Named(String),
    /// Namespaces whose labels match.
    Matching(Selector),
}

/// A Cilium reserved identity, as `toEntities`/`fromEntities` name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entity {
    All,
    World,
    WorldIpv4,
    WorldIpv6,
    Cluster,
    Host,
    RemoteNode,
    KubeApiserver,
    /// health, init, unmanaged, ingress: identities no flow of a pod's traffic reaches here.
    Other,
}

impl FromStr for Entity {
    type Err = FieldError;
    fn from_str(s: &str) -> Result<Entity, FieldError> {
        Ok(match s {
            "all" => Entity::All,
            "world" => Entity::World,
            "world-ipv4" => Entity::WorldIpv4,
            "world-ipv6" => Entity::WorldIpv6,
            "cluster" => Entity::Cluster,
            "host" => Entity::Host,
            "remote-node" => Entity::RemoteNode,
            "kube-apiserver" => Entity::KubeApiserver,
            "health" | "init" | "unmanaged" | "ingress" => Entity::Other,
            other => {
                return Err(FieldError::whole(format!(
                    "`{other}` is not a Cilium entity (all, world, world-ipv4, world-ipv6, cluster, host, remote-node, \
                     kube-apiserver, health, init, unmanaged, ingress)"
                )));
            }
        })
    }
}

/// What a rule's peer must be.
#[derive(Clone, Debug, PartialEq)]
pub enum PeerSel {
    Any,
    Nothing,
    /// Pods (not host-network) in matching namespaces with matching labels.
    Pods {
        ns: NsSel,
        pods: Selector,
    },
    /// An address range. `world_only`: Cilium CIDR rules, which never match pods, nodes or the
    /// apiserver (those have their own identities).
    Ip {
        net: IpNet,
        except: Vec<IpNet>,
        world_only: bool,
    },
    /// Node addresses of matching nodes.
    Nodes(Selector),
    Entity(Entity),
    /// DNS names (Cilium `toFQDNs`, ClusterNetworkPolicy `domainNames`): matched against the names
    /// the workload resolved for the address. `*` matches within a label run.
    Fqdn(Vec<String>),
    AnyOf(Vec<PeerSel>),
    All(Vec<PeerSel>),
    Not(Box<PeerSel>),
}

#[derive(Clone, Debug, PartialEq)]
pub enum PortSpec {
    Any,
    Range(u16, u16),
    /// A container port name, resolved on the destination pod.
    Named(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct PortSel {
    /// `None`: any protocol.
    pub protocol: Option<Protocol>,
    pub port: PortSpec,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// Where it is in its policy (`egress[2]`) or its name, for verdicts.
    pub label: String,
    pub action: Action,
    pub peer: PeerSel,
    /// Empty: every port and protocol.
    pub ports: Vec<PortSel>,
    /// Calico `notPorts` / `notProtocol`.
    pub not_ports: Vec<PortSel>,
    /// Calico: the rule also constrains the subject side (source of an egress rule).
    pub local: Option<Selector>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Subject {
    pub ns: NsSel,
    pub pods: Selector,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Shared: every verdict a policy decides names it.
    pub id: std::sync::Arc<PolicyId>,
    pub tier: Tier,
    pub subject: Subject,
    /// `None`: the policy does not apply to ingress (does not isolate). `Some(empty)`: isolates
    /// and allows nothing.
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
    /// Whether selecting a pod with rules in a direction puts it in default deny there (true for
    /// NetworkPolicy and Calico; Cilium per `enableDefaultDeny`; ClusterNetworkPolicy never).
    pub isolates: bool,
    /// What the parser noticed that makes the policy not do what it looks like (see [`lint`]).
    pub findings: Vec<lint::Finding>,
}

/// Reads the policy objects among `docs`; returns them and the documents that are not policies.
pub fn from_documents(docs: Vec<Document>) -> Result<(Vec<Policy>, Vec<Document>), InputError> {
    let mut out = Vec::new();
    let mut rest = Vec::new();
    for doc in docs {
        let group = doc.api_version().split('/').next().unwrap_or("");
        match (doc.api_version(), group, doc.kind()) {
            ("networking.k8s.io/v1", _, "NetworkPolicy") => out.push(kubernetes::parse(&doc)?),
            ("cilium.io/v2", _, "CiliumNetworkPolicy" | "CiliumClusterwideNetworkPolicy") => {
                out.extend(cilium::parse(&doc)?)
            }
            ("projectcalico.org/v3", _, "NetworkPolicy" | "GlobalNetworkPolicy") => out.push(calico::parse(&doc)?),
            ("policy.networking.k8s.io/v1alpha2", _, "ClusterNetworkPolicy") => {
                out.push(cluster_network_policy::parse(&doc)?)
            }
            (_, "networking.k8s.io" | "cilium.io" | "projectcalico.org" | "policy.networking.k8s.io", _)
                if doc.kind().contains("Policy") =>
            {
                return Err(doc.error(FieldError::new(
                    "apiVersion",
                    format!(
                        "{} is a policy netaudit cannot evaluate; supported: networking.k8s.io/v1 NetworkPolicy, \
                         cilium.io/v2 CiliumNetworkPolicy, projectcalico.org/v3 NetworkPolicy, \
                         policy.networking.k8s.io/v1alpha2 ClusterNetworkPolicy",
                        doc.api_version()
                    ),
                )));
            }
            _ => rest.push(doc),
        }
    }
    Ok((out, rest))
}

/// Parses a CIDR as the API does: a network address with a prefix (a bare address is a host
/// route only where the API says so, e.g. Cilium; callers decide).
/// A CIDR, or a bare address meaning a host route (Cilium and Calico accept both).
pub(crate) fn parse_cidr_or_ip(s: &str, at: &str) -> Result<IpNet, FieldError> {
    match s.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(IpNet::from(ip)),
        Err(_) => parse_cidr(s, at),
    }
}

pub(crate) fn parse_cidr(s: &str, at: &str) -> Result<IpNet, FieldError> {
    let net: IpNet = s
        .parse()
        .map_err(|_| FieldError::new(at, format!("`{s}` is not a CIDR (e.g. 192.0.2.0/24 or 2001:db8::/64)")))?;
    if net.trunc() != net {
        // The API server accepts host bits but they are meaningless; say what it means.
        tracing::info!("{at}: `{s}` has host bits set; it means {}", net.trunc());
    }
    Ok(net.trunc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_names_round_trip() {
        for e in Engine::ALL {
            assert_eq!(e.name().parse::<Engine>().unwrap(), e);
        }
        assert!(
            "istio"
                .parse::<Engine>()
                .unwrap_err()
                .to_string()
                .contains("kubernetes, cilium, calico, clusterNetworkPolicy")
        );
    }
}
