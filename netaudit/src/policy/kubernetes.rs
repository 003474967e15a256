//! The kubernetes dialect: `networking.k8s.io/v1` NetworkPolicy, read with the k8s-openapi types.
//!
//! Semantics (kubernetes.io/docs/concepts/services-networking/network-policies): a policy isolates
//! the pods it selects for each of its `policyTypes` (default: Ingress, plus Egress when it has
//! egress rules); allows are the union over policies; within one `from`/`to` entry the selectors
//! are ANDed, entries are ORed; an absent or empty `from`/`to` matches everything, absent or empty
//! `ports` every port.

use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    Action, Engine, LabelSelector, NETWORK_POLICY_ORDER, NsSel, PeerSel, Policy, PolicyId, PortSel, PortSpec, Rule,
    Selector, Subject, Tier, parse_cidr,
};
use crate::{
    error::{FieldError, InputError},
    input::Document,
    k8s::{parse_protocol, port_number, valid_port_name},
};

pub fn parse(doc: &Document) -> Result<Policy, InputError> {
    let np: NetworkPolicy = doc.parse()?;
    let namespace = np.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = np.metadata.name.clone().unwrap_or_default();
    let spec = np.spec.unwrap_or_default();
    let err = |e: FieldError| doc.error(e);
    let pods = selector(spec.pod_selector.as_ref(), "spec.podSelector").map_err(err)?;
    let (mut ingress_type, mut egress_type) = (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty()));
    if let Some(types) = &spec.policy_types {
        (ingress_type, egress_type) = (false, false);
        for (i, t) in types.iter().enumerate() {
            match t.as_str() {
                "Ingress" => ingress_type = true,
                "Egress" => egress_type = true,
                other => {
                    return Err(err(FieldError::new(
                        format!("spec.policyTypes[{i}]"),
                        format!("`{other}` is not Ingress or Egress"),
                    )));
                }
            }
        }
    }
    let rule =
        |dir: &str, i: usize, peer_list: Option<&[NetworkPolicyPeer]>, port_list: Option<&[NetworkPolicyPort]>| {
            let at = format!("spec.{dir}[{i}]");
            let peer_field = if dir == "ingress" { "from" } else { "to" };
            Ok::<_, InputError>(Rule {
                label: at.clone(),
                action: Action::Allow,
                peer: peers(peer_list, &namespace, &format!("{at}.{peer_field}")).map_err(err)?,
                ports: ports(port_list, &format!("{at}.ports")).map_err(err)?,
                not_ports: Vec::new(),
                local: None,
            })
        };
    let ingress = (spec.ingress.iter().flatten().enumerate())
        .map(|(i, r)| rule("ingress", i, r.from.as_deref(), r.ports.as_deref()))
        .collect::<Result<Vec<_>, InputError>>()?;
    let egress = (spec.egress.iter().flatten().enumerate())
        .map(|(i, r)| rule("egress", i, r.to.as_deref(), r.ports.as_deref()))
        .collect::<Result<Vec<_>, InputError>>()?;
    Ok(Policy {
        id: std::sync::Arc::new(PolicyId {
            engine: Engine::Kubernetes,
            kind: "NetworkPolicy".into(),
            namespace: Some(namespace.clone()),
            name,
            origin: doc.origin.clone(),
        }),
        tier: Tier::Namespaced(NETWORK_POLICY_ORDER),
        subject: Subject { ns: NsSel::Named(namespace), pods },
        ingress: ingress_type.then_some(ingress),
        egress: egress_type.then_some(egress),
        isolates: true,
        findings: Vec::new(),
    })
}

fn selector(
    sel: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
    at: &str,
) -> Result<Selector, FieldError> {
    Ok(Selector::Label(match sel {
        Some(s) => LabelSelector::from_k8s(s, at)?,
        None => LabelSelector::default(),
    }))
}

/// `from`/`to`: absent or empty matches every peer.
fn peers(list: Option<&[NetworkPolicyPeer]>, namespace: &str, at: &str) -> Result<PeerSel, FieldError> {
    let Some(list) = list.filter(|l| !l.is_empty()) else { return Ok(PeerSel::Any) };
    let mut out = Vec::new();
    for (i, p) in list.iter().enumerate() {
        let at = format!("{at}[{i}]");
        out.push(match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
            (Some(b), None, None) => {
                let net = parse_cidr(&b.cidr, &format!("{at}.ipBlock.cidr"))?;
                let mut except = Vec::new();
                for (j, e) in b.except.iter().flatten().enumerate() {
                    let e_at = format!("{at}.ipBlock.except[{j}]");
                    let x = parse_cidr(e, &e_at)?;
                    if !net.contains(&x) {
                        return Err(FieldError::new(&e_at, format!("`{e}` is not inside the block's cidr {net}")));
                    }
                    except.push(x);
                }
                PeerSel::Ip { net, except, world_only: false }
            }
            (Some(_), _, _) => {
                return Err(FieldError::new(at, "ipBlock cannot be combined with namespaceSelector or podSelector"));
            }
            (None, None, None) => {
                return Err(FieldError::new(
                    at,
                    "a peer needs at least one of podSelector, namespaceSelector, ipBlock",
                ));
            }
            (None, ns_sel, pod_sel) => {
                let ns = match ns_sel {
                    None => NsSel::Named(namespace.to_string()),
                    Some(s) => {
                        let s = selector(Some(s), &format!("{at}.namespaceSelector"))?;
                        if s.is_everything() { NsSel::Any } else { NsSel::Matching(s) }
                    }
                };
                PeerSel::Pods { ns, pods: selector(pod_sel.as_ref(), &format!("{at}.podSelector"))? }
            }
        });
    }
    Ok(if out.len() == 1 { out.pop().unwrap() } else { PeerSel::AnyOf(out) })
}

fn ports(list: Option<&[NetworkPolicyPort]>, at: &str) -> Result<Vec<PortSel>, FieldError> {
    let mut out = Vec::new();
    for (i, p) in list.iter().copied().flatten().enumerate() {
        let at = format!("{at}[{i}]");
        let protocol = parse_protocol(p.protocol.as_deref()).map_err(|e| e.within(&format!("{at}.protocol")))?;
        let port = match (&p.port, p.end_port) {
            (None, None) => PortSpec::Any,
            (None, Some(_)) => return Err(FieldError::new(format!("{at}.endPort"), "needs a numeric `port`")),
            (Some(IntOrString::Int(n)), end) => {
                let lo = port_number(*n)
                    .ok_or_else(|| FieldError::new(format!("{at}.port"), format!("{n} is not a port (1-65535)")))?;
                let hi = match end {
                    None => lo,
                    Some(e) => port_number(e).filter(|e| *e >= lo).ok_or_else(|| {
                        FieldError::new(
                            format!("{at}.endPort"),
                            format!("{e} must be a port (1-65535) not below port {lo}"),
                        )
                    })?,
                };
                PortSpec::Range(lo, hi)
            }
            (Some(IntOrString::String(s)), None) => match s.parse::<i32>() {
                // The API would have stored a number; a quoted number in YAML still means one.
                Ok(n) => PortSpec::Range(
                    port_number(n)
                        .ok_or_else(|| FieldError::new(format!("{at}.port"), format!("{n} is not a port (1-65535)")))?,
                    port_number(n).unwrap(),
                ),
                Err(_) => PortSpec::Named(valid_port_name(s).map_err(|e| e.within(&format!("{at}.port")))?),
            },
            (Some(IntOrString::String(_)), Some(_)) => {
                return Err(FieldError::new(format!("{at}.endPort"), "cannot be used with a named port"));
            }
        };
        out.push(PortSel { protocol: Some(protocol), port });
    }
    Ok(out)
}

/// Writing NetworkPolicy with the same k8s-openapi types it is read with.
pub mod write {
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::networking::v1::{IPBlock, NetworkPolicyEgressRule, NetworkPolicyPeer, NetworkPolicyPort},
        apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
    };

    use crate::{
        inventory::NAMESPACE_NAME_LABEL,
        policy::{PeerRef, PortProto},
    };

    /// A selector of exactly these labels.
    pub fn match_labels<'a>(labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> LabelSelector {
        let labels: BTreeMap<String, String> = labels.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        LabelSelector { match_labels: Some(labels), match_expressions: None }
    }

    /// A namespace by its name label.
    pub fn namespace(name: &str) -> LabelSelector {
        match_labels([(NAMESPACE_NAME_LABEL, name)])
    }

    fn ip_block(net: ipnet::IpNet) -> NetworkPolicyPeer {
        NetworkPolicyPeer { ip_block: Some(IPBlock { cidr: net.to_string(), except: None }), ..Default::default() }
    }

    /// How `to`/`from` names `peer` (nothing for [`PeerRef::Any`]: such a rule has no list).
    pub fn peers(peer: PeerRef<'_>) -> Vec<NetworkPolicyPeer> {
        match peer {
            PeerRef::Any => Vec::new(),
            PeerRef::Pods { namespace: ns, labels } => vec![NetworkPolicyPeer {
                namespace_selector: Some(namespace(ns)),
                pod_selector: (!labels.is_empty()).then(|| match_labels(labels.iter().map(|(k, v)| (&**k, &**v)))),
                ..Default::default()
            }],
            PeerRef::Apiserver { addresses } => addresses.iter().map(|a| ip_block((*a).into())).collect(),
            PeerRef::Node { net } => vec![ip_block(net)],
            PeerRef::Networks { nets, .. } => nets.iter().copied().map(ip_block).collect(),
        }
    }

    /// A port by number or by the name the pods give it.
    pub fn port(protocol: crate::model::Protocol, port: IntOrString) -> NetworkPolicyPort {
        NetworkPolicyPort { protocol: Some(protocol.to_string()), port: Some(port), end_port: None }
    }

    fn ports(ports: &[PortProto]) -> Option<Vec<NetworkPolicyPort>> {
        let list: Vec<_> = ports.iter().map(|p| port(p.protocol, IntOrString::Int(p.port.into()))).collect();
        (!list.is_empty()).then_some(list)
    }

    /// One egress rule to `peer` on `ports`; none when the peer has no address to name.
    pub fn egress_rule(peer: PeerRef<'_>, on: &[PortProto]) -> Option<NetworkPolicyEgressRule> {
        let to = peers(peer);
        if to.is_empty() && !matches!(peer, PeerRef::Any) {
            return None;
        }
        Some(NetworkPolicyEgressRule { to: (!to.is_empty()).then_some(to), ports: ports(on) })
    }
}
