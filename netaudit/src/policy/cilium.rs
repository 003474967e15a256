//! `cilium.io/v2` CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy.
//!
//! Semantics (docs.cilium.io, "Policy Enforcement Modes", "Layer 3/4 examples", "Deny Policies"):
//! allow rules are additive across policies; deny rules win over any allow; an endpoint is in
//! default-deny for a direction as soon as a rule selecting it has rules there (`enableDefaultDeny`
//! overrides; an empty `ingress: []` has no rules and so enforces nothing). Within one rule the L3
//! selectors (endpoints, CIDRs, entities, FQDNs, nodes) are ORed and ANDed with `toPorts`; a rule
//! with only `toPorts` applies to every peer; a rule with neither (`{}`) matches nothing. Label
//! keys may carry a source prefix (`k8s:`, `any:`); `io.kubernetes.pod.namespace` selects the
//! namespace, and in a namespaced policy selectors without it stay in the policy's namespace.
//! CIDR rules never match pods, nodes or the apiserver: those have identities of their own.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector as K8sLabelSelector, ObjectMeta};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    Action, Engine, LabelSelector, NETWORK_POLICY_ORDER, NsSel, PeerSel, Policy, PolicyId, PortSel, PortSpec, Rule,
    Selector, Subject, Tier,
    lint::{Finding, Severity},
    parse_cidr_or_ip,
    selector::{Op, Requirement},
};
use crate::{
    error::{FieldError, InputError},
    input::Document,
    inventory::NAMESPACE_NAME_LABEL,
    model::Protocol,
};

/// The label Cilium gives every endpoint with its namespace.
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

#[derive(Deserialize)]
struct Object {
    #[serde(default)]
    metadata: ObjectMeta,
    spec: Option<CiliumRule>,
    specs: Option<Vec<CiliumRule>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct CiliumRule {
    endpoint_selector: Option<K8sLabelSelector>,
    node_selector: Option<K8sLabelSelector>,
    ingress: Option<Vec<PeerRule>>,
    ingress_deny: Option<Vec<PeerRule>>,
    egress: Option<Vec<PeerRule>>,
    egress_deny: Option<Vec<PeerRule>>,
    enable_default_deny: Option<DefaultDeny>,
}

#[derive(Deserialize, Default)]
struct DefaultDeny {
    ingress: Option<bool>,
    egress: Option<bool>,
}

/// Ingress and egress rules share a shape: `from*` on ingress, `to*` on egress (written with the
/// `to*` names; [`write::ingress`] renames them for an ingress rule).
#[derive(Deserialize, Serialize, Default, Debug, Clone)]
pub struct PeerRule {
    #[serde(alias = "fromEndpoints", rename = "toEndpoints", skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<K8sLabelSelector>>,
    #[serde(alias = "fromCIDR", rename = "toCIDR", skip_serializing_if = "Option::is_none")]
    pub cidr: Option<Vec<String>>,
    #[serde(alias = "fromCIDRSet", rename = "toCIDRSet", skip_serializing_if = "Option::is_none")]
    pub cidr_set: Option<Vec<CidrRule>>,
    #[serde(alias = "fromEntities", rename = "toEntities", skip_serializing_if = "Option::is_none")]
    pub entities: Option<Vec<String>>,
    #[serde(alias = "fromNodes", rename = "toNodes", skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Vec<K8sLabelSelector>>,
    #[serde(rename = "toFQDNs", skip_serializing_if = "Option::is_none")]
    pub fqdns: Option<Vec<FqdnSelector>>,
    #[serde(rename = "toPorts", skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortRule>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmps: Option<Vec<Value>>,
    /// Everything else (toServices, toGroups, fromRequires, authentication, …).
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct CidrRule {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cidr_group_ref: Option<String>,
}

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct FqdnSelector {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub match_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub match_pattern: Option<String>,
}

#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct PortRule {
    #[serde(default)]
    pub ports: Vec<PortProtocol>,
    /// L7 rules: netaudit reads none of them (they narrow within an allowed port); it writes the
    /// DNS visibility rule a `toFQDNs` policy needs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rules: Option<L7Rules>,
}

#[derive(Deserialize, Serialize, Debug, Clone, Default)]
pub struct L7Rules {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<FqdnSelector>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct PortProtocol {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

pub fn parse(doc: &Document) -> Result<Vec<Policy>, InputError> {
    let obj: Object = doc.parse()?;
    let clusterwide = doc.kind() == "CiliumClusterwideNetworkPolicy";
    let namespace =
        if clusterwide { None } else { Some(obj.metadata.namespace.clone().unwrap_or_else(|| "default".into())) };
    let name = obj.metadata.name.clone().unwrap_or_default();
    let specs: Vec<(String, CiliumRule)> = match (obj.spec, obj.specs) {
        (Some(s), None) => vec![("spec".into(), s)],
        (None, Some(v)) => v.into_iter().enumerate().map(|(i, s)| (format!("specs[{i}]"), s)).collect(),
        (None, None) => return Err(doc.error(FieldError::whole("needs `spec` or `specs`"))),
        (Some(_), Some(_)) => return Err(doc.error(FieldError::whole("has both `spec` and `specs`; use one"))),
    };
    let mut out = Vec::new();
    for (at, mut rule) in specs {
        let err = |e: FieldError| doc.error(e);
        let id = std::sync::Arc::new(PolicyId {
            engine: Engine::Cilium,
            kind: doc.kind().to_string(),
            namespace: namespace.clone(),
            name: name.clone(),
            origin: doc.origin.clone(),
        });
        let Some(sel) = &rule.endpoint_selector else {
            if rule.node_selector.is_some() {
                tracing::warn!("{}: {id} {at}: nodeSelector (host firewall) policies are not evaluated", doc.origin);
                continue;
            }
            return Err(err(FieldError::new(at, "needs endpointSelector or nodeSelector")));
        };
        let (ns, pods) =
            endpoint_selector(sel, namespace.as_deref(), &format!("{at}.endpointSelector")).map_err(err)?;
        let subject = Subject { ns, pods };
        let dd = rule.enable_default_deny.take().unwrap_or_default();
        let rules = |list: &Option<Vec<PeerRule>>, dir: &str, action| -> Result<Vec<Rule>, InputError> {
            let mut out = Vec::new();
            for (i, r) in list.iter().flatten().enumerate() {
                let prefix = if dir.starts_with("egress") { "to" } else { "from" };
                out.push(peer_rule(r, namespace.as_deref(), &format!("{at}.{dir}[{i}]"), prefix, action).map_err(err)?);
            }
            Ok(out)
        };
        let ingress = rules(&rule.ingress, "ingress", Action::Allow)?;
        let egress = rules(&rule.egress, "egress", Action::Allow)?;
        let ingress_deny = rules(&rule.ingress_deny, "ingressDeny", Action::Deny)?;
        let egress_deny = rules(&rule.egress_deny, "egressDeny", Action::Deny)?;
        // Default deny per direction: explicit, or "the policy has rules there".
        let ingress_enforced = dd.ingress.unwrap_or(!ingress.is_empty() || !ingress_deny.is_empty());
        let egress_enforced = dd.egress.unwrap_or(!egress.is_empty() || !egress_deny.is_empty());
        let findings = empty_lists(&rule, &dd, &format!("{id} {at}"));
        let part = |ingress: Option<Vec<Rule>>, egress: Option<Vec<Rule>>, order, isolates| Policy {
            id: id.clone(),
            tier: Tier::Namespaced(order),
            subject: subject.clone(),
            ingress,
            egress,
            isolates,
            findings: Vec::new(),
        };
        // Deny rules sort before every allow.
        if !ingress_deny.is_empty() || !egress_deny.is_empty() {
            out.push(part(Some(ingress_deny), Some(egress_deny), f64::NEG_INFINITY, false));
        }
        let some_if = |rules: Vec<Rule>, enforced: bool| (enforced || !rules.is_empty()).then_some(rules);
        if ingress_enforced == egress_enforced {
            out.push(part(
                some_if(ingress, ingress_enforced),
                some_if(egress, egress_enforced),
                NETWORK_POLICY_ORDER,
                ingress_enforced,
            ));
        } else {
            out.push(part(some_if(ingress, ingress_enforced), None, NETWORK_POLICY_ORDER, ingress_enforced));
            out.push(part(None, some_if(egress, egress_enforced), NETWORK_POLICY_ORDER, egress_enforced));
        }
        if let Some(last) = out.last_mut() {
            last.findings = findings;
        }
    }
    Ok(out)
}

/// `ingress: []` reads like "deny all ingress" but has no rules, so it enforces nothing.
fn empty_lists(rule: &CiliumRule, dd: &DefaultDeny, at: &str) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (dir, list, deny, explicit) in [
        ("ingress", &rule.ingress, &rule.ingress_deny, dd.ingress),
        ("egress", &rule.egress, &rule.egress_deny, dd.egress),
    ] {
        if list.as_ref().is_some_and(|l| l.is_empty())
            && deny.as_ref().is_none_or(|d| d.is_empty())
            && explicit.is_none()
        {
            findings.push(Finding {
                severity: Severity::Error,
                code: "cilium-empty-list-enforces-nothing",
                policy: format!("{at}.{dir}"),
                message: format!(
                    "`{dir}: []` has no rules, and Cilium only enforces default deny for directions with rules: \
                     this does not deny any {dir}"
                ),
                fix: format!(
                    "write `{dir}: [{{}}]` (a rule that matches nothing) or `enableDefaultDeny: {{{dir}: true}}`"
                ),
            });
        }
    }
    findings
}

/// `dir`: `to` on egress, `from` on ingress (for field names in messages).
fn peer_rule(r: &PeerRule, namespace: Option<&str>, at: &str, dir: &str, action: Action) -> Result<Rule, FieldError> {
    for key in r.other.keys() {
        tracing::warn!("{at}.{key} is not evaluated by netaudit; the rule's other selectors still apply");
    }
    let mut peers = Vec::new();
    for (i, s) in r.endpoints.iter().flatten().enumerate() {
        let at = format!("{at}.{dir}Endpoints[{i}]");
        peers.push(match reserved_entity(s, &at)? {
            Some(e) => PeerSel::Entity(e),
            None => {
                let (ns, pods) = endpoint_selector(s, namespace, &at)?;
                PeerSel::Pods { ns, pods }
            }
        });
    }
    for (i, c) in r.cidr.iter().flatten().enumerate() {
        peers.push(PeerSel::Ip {
            net: parse_cidr_or_ip(c, &format!("{at}.{dir}CIDR[{i}]"))?,
            except: Vec::new(),
            world_only: true,
        });
    }
    for (i, c) in r.cidr_set.iter().flatten().enumerate() {
        let at = format!("{at}.{dir}CIDRSet[{i}]");
        let Some(cidr) = &c.cidr else {
            if c.cidr_group_ref.is_some() {
                tracing::warn!("{at}.cidrGroupRef is not evaluated by netaudit (CiliumCIDRGroup objects are not read)");
                continue;
            }
            return Err(FieldError::new(at, "needs cidr"));
        };
        let net = parse_cidr_or_ip(cidr, &format!("{at}.cidr"))?;
        let except = c
            .except
            .iter()
            .enumerate()
            .map(|(j, e)| parse_cidr_or_ip(e, &format!("{at}.except[{j}]")))
            .collect::<Result<_, _>>()?;
        peers.push(PeerSel::Ip { net, except, world_only: true });
    }
    for (i, e) in r.entities.iter().flatten().enumerate() {
        peers.push(PeerSel::Entity(e.parse().map_err(|m: FieldError| m.within(&format!("{at}.{dir}Entities[{i}]")))?));
    }
    for (i, s) in r.nodes.iter().flatten().enumerate() {
        peers.push(PeerSel::Nodes(Selector::Label(LabelSelector::from_k8s(s, &format!("{at}.{dir}Nodes[{i}]"))?)));
    }
    let mut fqdns = Vec::new();
    for (i, f) in r.fqdns.iter().flatten().enumerate() {
        match (&f.match_name, &f.match_pattern) {
            (Some(n), None) => fqdns.push(n.replace('*', "")),
            (None, Some(p)) => fqdns.push(p.clone()),
            _ => {
                return Err(FieldError::new(
                    format!("{at}.toFQDNs[{i}]"),
                    "needs exactly one of matchName, matchPattern",
                ));
            }
        }
    }
    if !fqdns.is_empty() {
        peers.push(PeerSel::Fqdn(fqdns));
    }
    let mut ports = Vec::new();
    for (i, pr) in r.to_ports.iter().flatten().enumerate() {
        for (j, p) in pr.ports.iter().enumerate() {
            ports.push(port(p, &format!("{at}.toPorts[{i}].ports[{j}]"))?);
        }
        if pr.ports.is_empty() {
            ports.push(PortSel { protocol: None, port: PortSpec::Any });
        }
    }
    if r.icmps.is_some() {
        ports.push(PortSel { protocol: Some(Protocol::Icmp), port: PortSpec::Any });
        ports.push(PortSel { protocol: Some(Protocol::Icmpv6), port: PortSpec::Any });
    }
    let has_l3 = r.endpoints.is_some()
        || r.cidr.is_some()
        || r.cidr_set.is_some()
        || r.entities.is_some()
        || r.nodes.is_some()
        || r.fqdns.is_some()
        || !r.other.is_empty();
    let peer = match (has_l3, peers.len()) {
        // `{}`: selects nothing (the documented way to default-deny a direction).
        (false, _) if ports.is_empty() => PeerSel::Nothing,
        (false, _) => PeerSel::Any,
        (true, 0) => PeerSel::Nothing,
        (true, 1) => peers.pop().unwrap(),
        (true, _) => PeerSel::AnyOf(peers),
    };
    Ok(Rule { label: at.to_string(), action, peer, ports, not_ports: Vec::new(), local: None })
}

fn port(p: &PortProtocol, at: &str) -> Result<PortSel, FieldError> {
    let protocol = match p.protocol.as_deref().unwrap_or("ANY") {
        "ANY" => None,
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        other => {
            return Err(FieldError::new(format!("{at}.protocol"), format!("`{other}` is not TCP, UDP, SCTP or ANY")));
        }
    };
    let text = match &p.port {
        None => return Ok(PortSel { protocol, port: PortSpec::Any }),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => {
            return Err(FieldError::new(
                format!("{at}.port"),
                format!("expected a port number or name, found {}", crate::input::type_name(other)),
            ));
        }
    };
    let port = match text.parse::<i64>() {
        Ok(0) => PortSpec::Any,
        Ok(n) => {
            let lo = u16::try_from(n)
                .map_err(|_| FieldError::new(format!("{at}.port"), format!("{n} is not a port (1-65535)")))?;
            let hi = match p.end_port {
                None | Some(0) => lo,
                Some(e) => u16::try_from(e).ok().filter(|e| *e >= lo).ok_or_else(|| {
                    FieldError::new(format!("{at}.endPort"), format!("{e} must be a port not below {lo}"))
                })?,
            };
            PortSpec::Range(lo, hi)
        }
        Err(_) => PortSpec::Named(crate::k8s::valid_port_name(&text).map_err(|e| e.within(&format!("{at}.port")))?),
    };
    Ok(PortSel { protocol, port })
}

/// Strips a label source prefix (`k8s:`, `any:`).
fn plain_key(key: &str) -> &str {
    key.strip_prefix("k8s:").or_else(|| key.strip_prefix("any:")).unwrap_or(key)
}

/// A selector naming a reserved identity (`reserved:host`) is an entity peer.
fn reserved_entity(sel: &K8sLabelSelector, at: &str) -> Result<Option<super::Entity>, FieldError> {
    let ls = LabelSelector::from_k8s(sel, at)?;
    let Some(r) = ls.reqs.iter().find(|r| r.key.starts_with("reserved:")) else { return Ok(None) };
    let name = &r.key["reserved:".len()..];
    name.parse().map(Some).map_err(|e| FieldError::new(at, format!("reserved label: {e}")))
}

/// Splits a Cilium endpoint selector into the namespaces it looks in and the pod labels it needs.
fn endpoint_selector(
    sel: &K8sLabelSelector,
    policy_ns: Option<&str>,
    at: &str,
) -> Result<(NsSel, Selector), FieldError> {
    let ls = LabelSelector::from_k8s(sel, at)?;
    let mut ns_reqs = Vec::new();
    let mut pod_reqs = Vec::new();
    for r in ls.reqs {
        let key = plain_key(&r.key);
        if key == NAMESPACE_LABEL {
            ns_reqs.push(Requirement { key: NAMESPACE_NAME_LABEL.into(), ..r });
        } else if let Some(label) = key.strip_prefix(NAMESPACE_LABELS_PREFIX) {
            ns_reqs.push(Requirement { key: label.into(), ..r });
        } else {
            pod_reqs.push(Requirement { key: key.into(), ..r });
        }
    }
    let ns = match (ns_reqs.is_empty(), policy_ns) {
        (true, Some(ns)) => NsSel::Named(ns.into()),
        (true, None) => NsSel::Any,
        (false, _) => match ns_reqs.as_slice() {
            [Requirement { op: Op::In, values, key }] if values.len() == 1 && key == NAMESPACE_NAME_LABEL => {
                NsSel::Named(values[0].clone())
            }
            _ => NsSel::Matching(Selector::Label(LabelSelector { reqs: ns_reqs })),
        },
    };
    Ok((ns, Selector::Label(LabelSelector { reqs: pod_reqs })))
}

/// Writing Cilium rules with the types they are read with.
pub mod write {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use serde_json::Value;

    use super::{FqdnSelector, L7Rules, NAMESPACE_LABEL, PeerRule, PortProtocol, PortRule};
    use crate::policy::{PeerRef, PortProto};

    /// Endpoints of a namespace with these labels (Cilium's `k8s:` source prefix on each key).
    pub fn endpoints<'a>(namespace: &str, labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> LabelSelector {
        let mut m = std::collections::BTreeMap::new();
        m.insert(format!("k8s:{NAMESPACE_LABEL}"), namespace.to_string());
        for (k, v) in labels {
            m.insert(format!("k8s:{k}"), v.to_string());
        }
        LabelSelector { match_labels: Some(m), match_expressions: None }
    }

    /// The ports as one `toPorts` entry (Cilium writes port numbers as strings).
    pub fn port_rule(ports: &[PortProto]) -> PortRule {
        let ports = ports
            .iter()
            .map(|p| PortProtocol {
                port: Some(Value::String(p.port.to_string())),
                end_port: None,
                protocol: Some(p.protocol.to_string()),
            })
            .collect();
        PortRule { ports, rules: None }
    }

    /// One egress rule to `peer` on `ports`. Addresses that answered to DNS names are named by
    /// them (`toFQDNs`, which needs [`with_dns_visibility`] on the DNS rule), else by CIDR.
    pub fn egress_rule(peer: PeerRef<'_>, ports: &[PortProto]) -> PeerRule {
        let mut r = PeerRule::default();
        match peer {
            PeerRef::Any => {}
            PeerRef::Pods { namespace, labels } => {
                r.endpoints = Some(vec![endpoints(namespace, labels.iter().map(|(k, v)| (&**k, &**v)))]);
            }
            PeerRef::Apiserver { .. } => r.entities = Some(vec!["kube-apiserver".into()]),
            PeerRef::Node { .. } => r.entities = Some(vec!["host".into(), "remote-node".into()]),
            PeerRef::Networks { names, .. } if !names.is_empty() => {
                let names = names.iter().map(|n| FqdnSelector { match_name: Some(n.clone()), match_pattern: None });
                r.fqdns = Some(names.collect());
            }
            PeerRef::Networks { nets, .. } => r.cidr = Some(nets.iter().map(ToString::to_string).collect()),
        }
        if !ports.is_empty() {
            r.to_ports = Some(vec![port_rule(ports)]);
        }
        r
    }

    /// `rule` with DNS visibility on its ports: the proxy sees every answer, which `toFQDNs`
    /// rules need to learn the names' addresses.
    pub fn with_dns_visibility(mut rule: PeerRule) -> PeerRule {
        let everything = FqdnSelector { match_name: None, match_pattern: Some("*".into()) };
        for p in rule.to_ports.iter_mut().flatten() {
            p.rules = Some(L7Rules { dns: vec![everything.clone()], other: Default::default() });
        }
        rule
    }

    /// `rule` as an ingress rule: the `from*` names for its peers.
    pub fn ingress(rule: &PeerRule) -> Value {
        let mut v = serde_json::to_value(rule).expect("plain data");
        if let Some(m) = v.as_object_mut() {
            for key in ["toEndpoints", "toCIDR", "toCIDRSet", "toEntities", "toNodes"] {
                if let Some(x) = m.remove(key) {
                    m.insert(key.replacen("to", "from", 1), x);
                }
            }
        }
        v
    }
}
