//! `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy (network-policy-api).
//!
//! Semantics (the API's own type documentation): Admin tier before NetworkPolicy, Baseline after
//! it; within a tier lower `priority` first; within a policy rules in order, the first match's
//! action decides (Accept, Deny, Pass = skip to the next tier). A policy with no rules in a
//! direction does not affect it. Peers: `namespaces` and `pods` select pods (never host-network
//! pods or nodes), `nodes` node addresses, `networks` CIDRs (pods included), `domainNames` DNS
//! names (Accept only). A peer with no known field fails closed: an Accept rule matches nothing,
//! a Deny/Pass rule everything.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector as K8sLabelSelector, ObjectMeta};
use serde::{Deserialize, Serialize};

use super::{
    Action, Engine, LabelSelector, NsSel, PeerSel, Policy, PolicyId, PortSel, PortSpec, Rule, Selector, Subject, Tier,
    parse_cidr,
};
use crate::{
    error::{FieldError, InputError},
    input::Document,
    model::Protocol,
};

/// The highest priority the API accepts.
pub const MAX_PRIORITY: i32 = 1000;

#[derive(Deserialize)]
struct Object {
    #[serde(default)]
    metadata: ObjectMeta,
    spec: Spec,
}

#[derive(Deserialize)]
struct Spec {
    tier: String,
    priority: i32,
    subject: SubjectSpec,
    #[serde(default)]
    ingress: Vec<RuleSpec>,
    #[serde(default)]
    egress: Vec<RuleSpec>,
}

#[derive(Deserialize, Serialize, Debug, Clone, Default)]
pub struct SubjectSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<K8sLabelSelector>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
}

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedPod {
    #[serde(default)]
    pub namespace_selector: K8sLabelSelector,
    #[serde(default)]
    pub pod_selector: K8sLabelSelector,
}

/// An ingress or egress rule: written with `to` ([`write::ingress`] renames it for ingress).
#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct RuleSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub action: String,
    #[serde(alias = "from")]
    pub to: Vec<PeerSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protocols: Vec<ProtocolSpec>,
}

#[derive(Deserialize, Serialize, Debug, Clone, Default)]
#[serde(rename_all = "camelCase")]
pub struct PeerSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<K8sLabelSelector>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<K8sLabelSelector>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub networks: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain_names: Option<Vec<String>>,
}

#[derive(Deserialize, Serialize, Debug, Clone, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<ProtoPorts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp: Option<ProtoPorts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sctp: Option<ProtoPorts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_named_port: Option<String>,
}

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct ProtoPorts {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<PortSpecJson>,
}

#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct PortSpecJson {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub number: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub range: Option<RangeJson>,
}

#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct RangeJson {
    pub start: i32,
    pub end: i32,
}

pub fn parse(doc: &Document) -> Result<Policy, InputError> {
    let obj: Object = doc.parse()?;
    let err = |e: FieldError| doc.error(e);
    let spec = obj.spec;
    let tier = match spec.tier.as_str() {
        "Admin" => Tier::Admin(spec.priority),
        "Baseline" => Tier::Baseline(spec.priority),
        other => return Err(err(FieldError::new("spec.tier", format!("`{other}` is not Admin or Baseline")))),
    };
    let subject = match (&spec.subject.namespaces, &spec.subject.pods) {
        (Some(ns), None) => {
            Subject { ns: ns_sel(ns, "spec.subject.namespaces").map_err(err)?, pods: Selector::everything() }
        }
        (None, Some(p)) => Subject {
            ns: ns_sel(&p.namespace_selector, "spec.subject.pods.namespaceSelector").map_err(err)?,
            pods: label(&p.pod_selector, "spec.subject.pods.podSelector").map_err(err)?,
        },
        _ => return Err(err(FieldError::new("spec.subject", "needs exactly one of namespaces, pods"))),
    };
    let rules = |list: &[RuleSpec], dir: &str| -> Result<Option<Vec<Rule>>, InputError> {
        let mut out = Vec::new();
        for (i, r) in list.iter().enumerate() {
            out.push(rule(r, &format!("spec.{dir}[{i}]"), dir == "egress").map_err(err)?);
        }
        Ok((!out.is_empty()).then_some(out))
    };
    Ok(Policy {
        id: std::sync::Arc::new(PolicyId {
            engine: Engine::ClusterNetworkPolicy,
            kind: "ClusterNetworkPolicy".into(),
            namespace: None,
            name: obj.metadata.name.unwrap_or_default(),
            origin: doc.origin.clone(),
        }),
        tier,
        subject,
        ingress: rules(&spec.ingress, "ingress")?,
        egress: rules(&spec.egress, "egress")?,
        isolates: false,
        findings: Vec::new(),
    })
}

fn label(s: &K8sLabelSelector, at: &str) -> Result<Selector, FieldError> {
    Ok(Selector::Label(LabelSelector::from_k8s(s, at)?))
}

fn ns_sel(s: &K8sLabelSelector, at: &str) -> Result<NsSel, FieldError> {
    let sel = label(s, at)?;
    Ok(if sel.is_everything() { NsSel::Any } else { NsSel::Matching(sel) })
}

fn rule(r: &RuleSpec, at: &str, egress: bool) -> Result<Rule, FieldError> {
    let action = match r.action.as_str() {
        "Accept" => Action::Allow,
        "Deny" => Action::Deny,
        "Pass" => Action::Pass,
        other => return Err(FieldError::new(format!("{at}.action"), format!("`{other}` is not Accept, Deny or Pass"))),
    };
    let peers_at = format!("{at}.{}", if egress { "to" } else { "from" });
    if r.to.is_empty() {
        return Err(FieldError::new(peers_at, "needs at least one peer"));
    }
    let mut peers = Vec::new();
    for (i, p) in r.to.iter().enumerate() {
        peers.push(peer(p, &format!("{peers_at}[{i}]"), egress, action)?);
    }
    let ports = protocols(&r.protocols, at)?;
    let peer = if peers.len() == 1 { peers.pop().unwrap() } else { PeerSel::AnyOf(peers) };
    let label = r.name.clone().filter(|n| !n.is_empty()).map(|n| format!("{at} ({n})")).unwrap_or(at.to_string());
    Ok(Rule { label, action, peer, ports, not_ports: Vec::new(), local: None })
}

/// One `to`/`from` entry: it sets exactly one kind of peer.
fn peer(p: &PeerSpec, at: &str, egress: bool, action: Action) -> Result<PeerSel, FieldError> {
    let set =
        [p.namespaces.is_some(), p.pods.is_some(), p.nodes.is_some(), p.networks.is_some(), p.domain_names.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
    if set > 1 {
        return Err(FieldError::new(at, "a peer sets exactly one of namespaces, pods, nodes, networks, domainNames"));
    }
    if !egress && (p.nodes.is_some() || p.networks.is_some() || p.domain_names.is_some()) {
        return Err(FieldError::new(at, "ingress peers are namespaces or pods only"));
    }
    Ok(if let Some(ns) = &p.namespaces {
        PeerSel::Pods { ns: ns_sel(ns, &format!("{at}.namespaces"))?, pods: Selector::everything() }
    } else if let Some(pods) = &p.pods {
        PeerSel::Pods {
            ns: ns_sel(&pods.namespace_selector, &format!("{at}.pods.namespaceSelector"))?,
            pods: label(&pods.pod_selector, &format!("{at}.pods.podSelector"))?,
        }
    } else if let Some(nodes) = &p.nodes {
        PeerSel::Nodes(label(nodes, &format!("{at}.nodes"))?)
    } else if let Some(nets) = &p.networks {
        let mut any = Vec::new();
        for (j, n) in nets.iter().enumerate() {
            any.push(PeerSel::Ip {
                net: parse_cidr(n, &format!("{at}.networks[{j}]"))?,
                except: Vec::new(),
                world_only: false,
            });
        }
        PeerSel::AnyOf(any)
    } else if let Some(names) = &p.domain_names {
        if action != Action::Allow {
            return Err(FieldError::new(format!("{at}.domainNames"), "only Accept rules may use domainNames"));
        }
        // `*.example.com` matches one or more labels.
        PeerSel::Fqdn(
            names.iter().map(|n| n.strip_prefix("*.").map(|s| format!("**.{s}")).unwrap_or(n.clone())).collect(),
        )
    } else if action == Action::Allow {
        PeerSel::Nothing
    } else {
        PeerSel::Any
    })
}

/// `protocols`: each sets exactly one of tcp, udp, sctp (with an optional port or range), or a
/// named destination port.
fn protocols(list: &[ProtocolSpec], at: &str) -> Result<Vec<PortSel>, FieldError> {
    let mut ports = Vec::new();
    for (i, p) in list.iter().enumerate() {
        let at = format!("{at}.protocols[{i}]");
        let entries = [(Protocol::Tcp, &p.tcp), (Protocol::Udp, &p.udp), (Protocol::Sctp, &p.sctp)];
        let set = entries.iter().filter(|(_, v)| v.is_some()).count() + usize::from(p.destination_named_port.is_some());
        if set != 1 {
            return Err(FieldError::new(at, "sets exactly one of tcp, udp, sctp, destinationNamedPort"));
        }
        if let Some(name) = &p.destination_named_port {
            ports.push(PortSel { protocol: None, port: PortSpec::Named(name.clone()) });
            continue;
        }
        for (proto, v) in entries {
            let Some(v) = v else { continue };
            let port = match &v.destination_port {
                None => PortSpec::Any,
                Some(PortSpecJson { number: Some(n), range: None }) => {
                    let n = crate::k8s::port_number(*n).ok_or_else(|| {
                        FieldError::new(format!("{at}.destinationPort.number"), format!("{n} is not a port (1-65535)"))
                    })?;
                    PortSpec::Range(n, n)
                }
                Some(PortSpecJson { number: None, range: Some(r) }) => {
                    let lo = crate::k8s::port_number(r.start);
                    let hi = crate::k8s::port_number(r.end);
                    match (lo, hi) {
                        (Some(lo), Some(hi)) if lo < hi => PortSpec::Range(lo, hi),
                        _ => {
                            return Err(FieldError::new(
                                format!("{at}.destinationPort.range"),
                                format!("{}-{} must be ports with start < end", r.start, r.end),
                            ));
                        }
                    }
                }
                _ => return Err(FieldError::new(format!("{at}.destinationPort"), "sets exactly one of number, range")),
            };
            ports.push(PortSel { protocol: Some(proto), port });
        }
    }
    Ok(ports)
}

/// Writing ClusterNetworkPolicy rules with the types they are read with.
pub mod write {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use serde_json::Value;

    use super::{NamespacedPod, PeerSpec, PortSpecJson, ProtoPorts, ProtocolSpec, RuleSpec};
    use crate::{
        model::Protocol,
        policy::{PeerRef, PortProto, kubernetes::write::match_labels, kubernetes::write::namespace},
    };

    /// The pods of namespace `ns` carrying `labels`.
    pub fn pods<'a>(ns: &str, labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> NamespacedPod {
        NamespacedPod { namespace_selector: namespace(ns), pod_selector: match_labels(labels) }
    }

    /// How `to`/`from` names `peer` ([`PeerRef::Any`]: every pod); none when it has no address.
    pub fn peers(peer: PeerRef<'_>) -> Option<Vec<PeerSpec>> {
        let networks = |n: Vec<String>| vec![PeerSpec { networks: Some(n), ..PeerSpec::default() }];
        Some(match peer {
            PeerRef::Any => vec![PeerSpec { namespaces: Some(LabelSelector::default()), ..PeerSpec::default() }],
            PeerRef::Pods { namespace: ns, labels } if labels.is_empty() => {
                vec![PeerSpec { namespaces: Some(namespace(ns)), ..PeerSpec::default() }]
            }
            PeerRef::Pods { namespace: ns, labels } => {
                let p = pods(ns, labels.iter().map(|(k, v)| (&**k, &**v)));
                vec![PeerSpec { pods: Some(p), ..PeerSpec::default() }]
            }
            PeerRef::Apiserver { addresses: [] } => return None,
            PeerRef::Apiserver { addresses } => {
                networks(addresses.iter().map(|a| ipnet::IpNet::from(*a).to_string()).collect())
            }
            PeerRef::Node { net } => networks(vec![net.to_string()]),
            PeerRef::Networks { nets, .. } => networks(nets.iter().map(ToString::to_string).collect()),
        })
    }

    /// `ports` as the rule's `protocols` (the API has ports for TCP, UDP and SCTP only).
    pub fn protocols(ports: &[PortProto]) -> Vec<ProtocolSpec> {
        ports
            .iter()
            .filter_map(|p| {
                let on = Some(ProtoPorts {
                    destination_port: Some(PortSpecJson { number: Some(p.port.into()), range: None }),
                });
                Some(match p.protocol {
                    Protocol::Tcp => ProtocolSpec { tcp: on, ..ProtocolSpec::default() },
                    Protocol::Udp => ProtocolSpec { udp: on, ..ProtocolSpec::default() },
                    Protocol::Sctp => ProtocolSpec { sctp: on, ..ProtocolSpec::default() },
                    _ => return None,
                })
            })
            .collect()
    }

    /// A rule named `name` doing `action` to `peer` on `ports`; none when the peer has no address.
    pub fn rule(name: &str, action: &str, peer: PeerRef<'_>, ports: &[PortProto]) -> Option<RuleSpec> {
        let to = peers(peer)?;
        Some(RuleSpec { name: Some(name.into()), action: action.into(), to, protocols: protocols(ports) })
    }

    /// `rule` as an ingress rule (`from`).
    pub fn ingress(rule: &RuleSpec) -> Value {
        let mut v = serde_json::to_value(rule).expect("plain data");
        if let Some(to) = v.as_object_mut().and_then(|m| m.remove("to")) {
            v["from"] = to;
        }
        v
    }
}
