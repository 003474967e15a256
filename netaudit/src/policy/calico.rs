//! `projectcalico.org/v3` NetworkPolicy and GlobalNetworkPolicy.
//!
//! Semantics (docs.tigera.io, "NetworkPolicy" and "Get started with policy"): policies apply in
//! `order` (lower first, none = last); within a policy the first rule whose every criterion
//! matches decides (Allow, Deny; Pass goes to the next tier; Log goes on); an endpoint selected by
//! any policy of a direction and matched by no rule is denied. `types` defaults to Ingress, or
//! Egress when there are only egress rules, or both. A rule's `selector` without a
//! `namespaceSelector` stays in the policy's namespace; `!=` and `not in` also match an absent
//! label. NetworkPolicy objects sit in the same list at order 1000, as Calico places them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    Action, Engine, NsSel, PeerSel, Policy, PolicyId, PortSel, PortSpec, Rule, Selector, Subject, Tier,
    parse_cidr_or_ip, selector::CalicoExpr,
};
use crate::{
    error::{FieldError, InputError},
    input::Document,
    model::Protocol,
};

#[derive(Deserialize)]
struct Object {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Spec,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Spec {
    order: Option<f64>,
    tier: Option<String>,
    selector: Option<String>,
    namespace_selector: Option<String>,
    types: Option<Vec<String>>,
    ingress: Option<Vec<CalicoRule>>,
    egress: Option<Vec<CalicoRule>>,
}

/// One rule; `source`/`destination` name the two ends whatever the direction.
#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct CalicoRule {
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_protocol: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_version: Option<u8>,
    #[serde(default, skip_serializing_if = "EntityRule::is_empty")]
    pub source: EntityRule,
    #[serde(default, skip_serializing_if = "EntityRule::is_empty")]
    pub destination: EntityRule,
}

#[derive(Deserialize, Serialize, Default, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EntityRule {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nets: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub net: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_nets: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_selector: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_ports: Option<Vec<Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_accounts: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub services: Option<Value>,
}

impl EntityRule {
    fn is_empty(&self) -> bool {
        *self == EntityRule::default()
    }
}

pub fn parse(doc: &Document) -> Result<Policy, InputError> {
    let obj: Object = doc.parse()?;
    let err = |e: FieldError| doc.error(e);
    let global = doc.kind() == "GlobalNetworkPolicy";
    let namespace =
        if global { None } else { Some(obj.metadata.namespace.clone().unwrap_or_else(|| "default".into())) };
    let spec = obj.spec;
    if let Some(t) = spec.tier.as_deref().filter(|t| *t != "default") {
        tracing::warn!("{}: {}: tier `{t}` is evaluated as the default tier", doc.origin, doc.describe());
    }
    let pods = Selector::Calico(expr(spec.selector.as_deref(), "spec.selector").map_err(err)?);
    let ns = match (&namespace, &spec.namespace_selector) {
        (Some(ns), _) => NsSel::Named(ns.clone()),
        (None, Some(s)) => NsSel::Matching(Selector::Calico(expr(Some(s), "spec.namespaceSelector").map_err(err)?)),
        (None, None) => NsSel::Any,
    };
    let has_ingress = spec.ingress.as_ref().is_some_and(|r| !r.is_empty());
    let has_egress = spec.egress.as_ref().is_some_and(|r| !r.is_empty());
    let (ingress_type, egress_type) = match &spec.types {
        None => (has_ingress || !has_egress, has_egress),
        Some(types) => {
            let (mut i, mut e) = (false, false);
            for (n, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => i = true,
                    "Egress" => e = true,
                    other => {
                        return Err(err(FieldError::new(
                            format!("spec.types[{n}]"),
                            format!("`{other}` is not Ingress or Egress"),
                        )));
                    }
                }
            }
            (i, e)
        }
    };
    let rules = |list: &Option<Vec<CalicoRule>>, dir: &str, ingress: bool| -> Result<Vec<Rule>, InputError> {
        let mut out = Vec::new();
        for (i, r) in list.iter().flatten().enumerate() {
            out.push(rule(r, namespace.as_deref(), &format!("spec.{dir}[{i}]"), ingress).map_err(err)?);
        }
        Ok(out)
    };
    let ingress = rules(&spec.ingress, "ingress", true)?;
    let egress = rules(&spec.egress, "egress", false)?;
    Ok(Policy {
        id: std::sync::Arc::new(PolicyId {
            engine: Engine::Calico,
            kind: doc.kind().to_string(),
            namespace: namespace.clone(),
            name: obj.metadata.name.unwrap_or_default(),
            origin: doc.origin.clone(),
        }),
        tier: Tier::Namespaced(spec.order.unwrap_or(f64::INFINITY)),
        subject: Subject { ns, pods },
        ingress: ingress_type.then_some(ingress),
        egress: egress_type.then_some(egress),
        isolates: true,
        findings: Vec::new(),
    })
}

fn expr(s: Option<&str>, at: &str) -> Result<CalicoExpr, FieldError> {
    CalicoExpr::parse(s.unwrap_or("all()")).map_err(|e| e.within(at))
}

fn rule(r: &CalicoRule, namespace: Option<&str>, at: &str, ingress: bool) -> Result<Rule, FieldError> {
    let action = match r.action.as_str() {
        "Allow" => Action::Allow,
        "Deny" => Action::Deny,
        "Pass" => Action::Pass,
        "Log" => Action::Log,
        other => {
            return Err(FieldError::new(format!("{at}.action"), format!("`{other}` is not Allow, Deny, Pass or Log")));
        }
    };
    let protocol = r.protocol.as_ref().map(|p| protocol_of(p, &format!("{at}.protocol"))).transpose()?;
    let (peer_side, local_side, peer_name, local_name) = if ingress {
        (&r.source, &r.destination, "source", "destination")
    } else {
        (&r.destination, &r.source, "destination", "source")
    };
    let mut peer = entity(peer_side, namespace, &format!("{at}.{peer_name}"))?;
    if let Some(v) = r.ip_version {
        let any: ipnet::IpNet = match v {
            4 => "0.0.0.0/0".parse().unwrap(),
            6 => "::/0".parse().unwrap(),
            _ => return Err(FieldError::new(format!("{at}.ipVersion"), format!("{v} is not 4 or 6"))),
        };
        peer = PeerSel::All(vec![peer, PeerSel::Ip { net: any, except: Vec::new(), world_only: false }]);
    }
    // The subject's own side may narrow the rule too (a selector on the subject; its nets are the
    // subject's addresses, which every selected pod has).
    let local = local_side
        .selector
        .as_deref()
        .map(|s| expr(Some(s), &format!("{at}.{local_name}.selector")).map(Selector::Calico))
        .transpose()?;
    if local_side.ports.is_some() && !ingress {
        tracing::warn!("{at}.source.ports: source (ephemeral) ports are not recorded; ignored");
    }
    // Destination ports: the subject's on ingress, the peer's on egress — both `destination`.
    let ports_at = format!("{at}.destination.ports");
    let mut ports = ports(r.destination.ports.as_deref(), protocol, &ports_at)?;
    if ports.is_empty()
        && let Some(p) = protocol
    {
        ports.push(PortSel { protocol: Some(p), port: PortSpec::Any });
    }
    let mut not_ports =
        ports_list(r.destination.not_ports.as_deref(), protocol, &format!("{at}.destination.notPorts"))?;
    if let Some(np) = &r.not_protocol {
        not_ports.push(PortSel { protocol: Some(protocol_of(np, &format!("{at}.notProtocol"))?), port: PortSpec::Any });
    }
    Ok(Rule { label: at.to_string(), action, peer, ports, not_ports, local })
}

fn entity(e: &EntityRule, namespace: Option<&str>, at: &str) -> Result<PeerSel, FieldError> {
    let mut all = Vec::new();
    let nets: Vec<&String> = e.nets.iter().flatten().chain(e.net.iter()).collect();
    if !nets.is_empty() {
        let mut any = Vec::new();
        for (i, n) in nets.iter().enumerate() {
            any.push(PeerSel::Ip {
                net: parse_cidr_or_ip(n, &format!("{at}.nets[{i}]"))?,
                except: Vec::new(),
                world_only: false,
            });
        }
        all.push(PeerSel::AnyOf(any));
    }
    for (i, n) in e.not_nets.iter().flatten().enumerate() {
        all.push(PeerSel::Not(Box::new(PeerSel::Ip {
            net: parse_cidr_or_ip(n, &format!("{at}.notNets[{i}]"))?,
            except: Vec::new(),
            world_only: false,
        })));
    }
    let ns = match &e.namespace_selector {
        Some(s) => NsSel::Matching(Selector::Calico(expr(Some(s), &format!("{at}.namespaceSelector"))?)),
        None => namespace.map(|n| NsSel::Named(n.into())).unwrap_or(NsSel::Any),
    };
    if e.selector.is_some() || e.namespace_selector.is_some() {
        let pods = Selector::Calico(expr(e.selector.as_deref(), &format!("{at}.selector"))?);
        all.push(PeerSel::Pods { ns: ns.clone(), pods });
    }
    if let Some(s) = &e.not_selector {
        let pods = Selector::Calico(expr(Some(s), &format!("{at}.notSelector"))?);
        all.push(PeerSel::Not(Box::new(PeerSel::Pods { ns, pods })));
    }
    if e.service_accounts.is_some() || e.services.is_some() {
        tracing::warn!(
            "{at}: serviceAccounts/services matches are not evaluated by netaudit; the rule matches nothing"
        );
        all.push(PeerSel::Nothing);
    }
    Ok(match all.len() {
        0 => PeerSel::Any,
        1 => all.pop().unwrap(),
        _ => PeerSel::All(all),
    })
}

fn protocol_of(p: &Value, at: &str) -> Result<Protocol, FieldError> {
    match p {
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| u8::try_from(n).ok())
            .map(Protocol::from_number)
            .ok_or_else(|| FieldError::new(at, format!("{n} is not an IP protocol number (0-255)"))),
        Value::String(s) => match s.as_str() {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            "ICMP" => Ok(Protocol::Icmp),
            "ICMPv6" => Ok(Protocol::Icmpv6),
            "UDPLite" => Ok(Protocol::Other(136)),
            other => other.parse::<u8>().map(Protocol::from_number).map_err(|_| {
                FieldError::new(at, format!("`{other}` is not TCP, UDP, SCTP, ICMP, ICMPv6, UDPLite or a number"))
            }),
        },
        other => Err(FieldError::new(
            at,
            format!("expected a protocol name or number, found {}", crate::input::type_name(other)),
        )),
    }
}

fn ports(list: Option<&[Value]>, protocol: Option<Protocol>, at: &str) -> Result<Vec<PortSel>, FieldError> {
    if list.is_some_and(|l| !l.is_empty()) && !protocol.is_some_and(|p| p.has_ports()) {
        return Err(FieldError::new(at, "ports need the rule's `protocol` to be TCP, UDP or SCTP"));
    }
    ports_list(list, protocol, at)
}

fn ports_list(list: Option<&[Value]>, protocol: Option<Protocol>, at: &str) -> Result<Vec<PortSel>, FieldError> {
    let mut out = Vec::new();
    for (i, p) in list.into_iter().flatten().enumerate() {
        let at = format!("{at}[{i}]");
        let text = match p {
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            other => {
                return Err(FieldError::new(
                    at,
                    format!("expected a port, range or name, found {}", crate::input::type_name(other)),
                ));
            }
        };
        let num = |s: &str| {
            s.trim()
                .parse::<u16>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| FieldError::new(&at, format!("`{s}` is not a port (1-65535)")))
        };
        let port = match text.split_once(':') {
            Some((lo, hi)) => {
                let (lo, hi) = (num(lo)?, num(hi)?);
                if hi < lo {
                    return Err(FieldError::new(&at, format!("range `{text}` ends before it starts")));
                }
                PortSpec::Range(lo, hi)
            }
            None if text.bytes().all(|b| b.is_ascii_digit()) => {
                let n = num(&text)?;
                PortSpec::Range(n, n)
            }
            None => PortSpec::Named(crate::k8s::valid_port_name(&text).map_err(|e| e.within(&at))?),
        };
        out.push(PortSel { protocol, port });
    }
    Ok(out)
}

/// Writing Calico rules with the types they are read with.
pub mod write {
    use serde_json::Value;

    use super::{CalicoRule, EntityRule};
    use crate::{
        inventory::NAMESPACE_NAME_LABEL,
        model::Protocol,
        policy::{PeerRef, PortProto},
    };

    /// A selector expression of exactly these labels (`k == 'v' && …`).
    pub fn selector<'a>(labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
        labels.into_iter().map(|(k, v)| format!("{k} == '{v}'")).collect::<Vec<_>>().join(" && ")
    }

    /// The destination end naming `peer`; none when the peer has no address to name.
    pub fn destination(peer: PeerRef<'_>) -> Option<EntityRule> {
        let nets = |n: Vec<String>| EntityRule { nets: Some(n), ..EntityRule::default() };
        Some(match peer {
            PeerRef::Any => EntityRule::default(),
            PeerRef::Pods { namespace, labels } => EntityRule {
                namespace_selector: Some(selector([(NAMESPACE_NAME_LABEL, namespace)])),
                selector: (!labels.is_empty()).then(|| selector(labels.iter().map(|(k, v)| (&**k, &**v)))),
                ..EntityRule::default()
            },
            PeerRef::Apiserver { addresses: [] } => return None,
            PeerRef::Apiserver { addresses } => {
                nets(addresses.iter().map(|a| ipnet::IpNet::from(*a).to_string()).collect())
            }
            PeerRef::Node { net } => nets(vec![net.to_string()]),
            PeerRef::Networks { nets: n, .. } => nets(n.iter().map(ToString::to_string).collect()),
        })
    }

    /// Allow rules to `peer` on `ports`: one per protocol (a Calico rule takes one).
    pub fn egress_rules(peer: PeerRef<'_>, ports: &[PortProto]) -> Vec<CalicoRule> {
        let Some(destination) = destination(peer) else { return Vec::new() };
        let allow = |protocol: Option<Protocol>, destination| CalicoRule {
            action: "Allow".into(),
            protocol: protocol.map(|p| Value::String(p.to_string())),
            not_protocol: None,
            ip_version: None,
            source: EntityRule::default(),
            destination,
        };
        if ports.is_empty() {
            return vec![allow(None, destination)];
        }
        let mut protocols: Vec<Protocol> = ports.iter().map(|p| p.protocol).collect();
        protocols.dedup();
        protocols
            .into_iter()
            .map(|proto| {
                let on = ports.iter().filter(|p| p.protocol == proto).map(|p| Value::from(p.port)).collect();
                allow(Some(proto), EntityRule { ports: Some(on), ..destination.clone() })
            })
            .collect()
    }
}
