//! Lint of the policies themselves: objects the API server would reject, and rules that do not do
//! what they look like they do (the audited chart's known defects among them, see CHART.md).

use serde::Serialize;

use super::{Action, Engine, NsSel, PeerSel, Policy, PortSpec, Rule, Tier, cluster_network_policy::MAX_PRIORITY};
use crate::{
    inventory::{Inventory, Owner},
    model::{DNS_PORT, Protocol},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The API server rejects the object, or the policy cannot work as written.
    Error,
    Warning,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// Stable identifier of the check.
    pub code: &'static str,
    /// The policy (and rule) it is about.
    pub policy: String,
    pub message: String,
    pub fix: String,
}

pub fn lint(policies: &[Policy], inv: &Inventory) -> Vec<Finding> {
    let mut out = Vec::new();
    for p in policies {
        out.extend(p.findings.iter().cloned());
        let id = p.id.to_string();
        if let Tier::Admin(prio) | Tier::Baseline(prio) = p.tier
            && !(0..=MAX_PRIORITY).contains(&prio)
        {
            out.push(Finding {
                severity: Severity::Error,
                code: "cnp-priority-range",
                policy: id.clone(),
                message: format!(
                    "priority {prio} is outside 0-{MAX_PRIORITY}: the API server rejects this ClusterNetworkPolicy"
                ),
                fix: format!(
                    "use a priority between 0 and {MAX_PRIORITY} (for the chart: networkPolicy.defaultDeny.order)"
                ),
            });
        }
        for (side, rules) in [("ingress", &p.ingress), ("egress", &p.egress)] {
            for r in rules.iter().flatten() {
                let at = format!("{id} {}", r.label);
                match p.id.engine {
                    Engine::ClusterNetworkPolicy if r.action == Action::Deny && pods_only(&r.peer) => out.push(Finding {
                        severity: Severity::Warning,
                        code: "cnp-deny-pods-only",
                        policy: at,
                        message: format!(
                            "this Deny names `namespaces`/`pods` peers only: they cover pods, never nodes or addresses outside \
                             the cluster, so {side} {} the apiserver, the kubelet, S3, OTLP collectors and anything external \
                             stays open",
                            if side == "egress" { "to" } else { "from" }
                        ),
                        fix: if side == "egress" {
                            "add `networks: [0.0.0.0/0, ::/0]` (and `nodes: {}`) peers to the Deny to make it deny-all".into()
                        } else {
                            "ingress peers can only be pods; deny non-pod sources with a NetworkPolicy or the CNI's own policy".into()
                        },
                    }),
                    Engine::Calico if side == "egress" && r.action == Action::Allow && r.peer == PeerSel::Any && is_dns(r) => {
                        out.push(Finding {
                            severity: Severity::Warning,
                            code: "calico-dns-any-destination",
                            policy: at,
                            message: "allows port 53 to every destination: any resolver on the internet, and DNS tunnelling \
                                      past the allowlist"
                                .into(),
                            fix: "add `destination: {namespaceSelector: \"kubernetes.io/metadata.name == 'kube-system'\", \
                                  selector: \"k8s-app == 'kube-dns'\"}` (and the node-local cache's address if used)"
                                .into(),
                        })
                    }
                    Engine::Cilium if side == "egress" && r.action == Action::Allow => cilium_egress(r, at, inv, &mut out),
                    _ => {}
                }
            }
        }
    }
    out.sort_by(|a, b| a.severity.cmp(&b.severity).then_with(|| a.policy.cmp(&b.policy)));
    out
}

/// Cilium egress allows: a DNS rule whose selector no DNS pod matches, a CIDR over the apiserver.
fn cilium_egress(r: &Rule, at: String, inv: &Inventory, out: &mut Vec<Finding>) {
    if is_dns(r)
        && !inv.pods.is_empty()
        && let Some((ns, sel)) = pod_selector_of(&r.peer)
    {
        let any = inv.pods.iter().any(|pod| ns_fits(ns, &pod.namespace) && sel.matches(&pod.labels));
        if !any {
            let dns_labels: Vec<String> = inv
                .pods
                .iter()
                .filter(|p| serves_dns(inv, p))
                .flat_map(|p| p.labels.iter().map(|(k, v)| format!("{k}={v}")))
                .collect();
            out.push(Finding {
                severity: Severity::Error,
                code: "cilium-dns-selector-matches-nothing",
                policy: at.clone(),
                message: format!(
                    "this DNS rule selects pods `{sel}` that no pod in the inventory has: DNS is cut{}",
                    if dns_labels.is_empty() {
                        String::new()
                    } else {
                        format!(" (the DNS pods are labelled {})", dns_labels.join(", "))
                    }
                ),
                fix: "select the DNS pods by the labels they really carry, in networkPolicy.cilium.egress \
                          (set networkPolicy.egress.dns: false to drop the chart's own rule)"
                    .into(),
            });
        }
    }
    if let Some(ip) = cidr_covering_apiserver(&r.peer, inv) {
        out.push(Finding {
            severity: Severity::Error,
            code: "cilium-cidr-apiserver",
            policy: at,
            message: format!(
                "this CIDR rule covers the apiserver ({ip}), but Cilium never matches the apiserver by CIDR: \
                     it carries the kube-apiserver identity"
            ),
            fix: "use `toEntities: [kube-apiserver]` for the apiserver".into(),
        });
    }
}

fn pods_only(p: &PeerSel) -> bool {
    match p {
        PeerSel::Pods { .. } => true,
        PeerSel::AnyOf(v) => v.iter().all(pods_only),
        _ => false,
    }
}

fn is_dns(r: &Rule) -> bool {
    r.ports.iter().any(|p| match p.port {
        PortSpec::Range(lo, hi) => {
            (lo..=hi).contains(&DNS_PORT) && p.protocol.is_none_or(|x| x == Protocol::Udp || x == Protocol::Tcp)
        }
        _ => false,
    })
}

fn pod_selector_of(p: &PeerSel) -> Option<(&NsSel, &super::Selector)> {
    match p {
        PeerSel::Pods { ns, pods } => Some((ns, pods)),
        PeerSel::AnyOf(v) if v.len() == 1 => pod_selector_of(&v[0]),
        _ => None,
    }
}

fn ns_fits(ns: &NsSel, name: &str) -> bool {
    match ns {
        NsSel::Any | NsSel::Matching(_) => true,
        NsSel::Named(n) => n == name,
    }
}

/// Pods behind a Service that serves port 53.
fn serves_dns(inv: &Inventory, pod: &crate::inventory::PodInfo) -> bool {
    inv.services.iter().any(|s| {
        s.namespace == pod.namespace
            && s.ports.iter().any(|p| p.port == DNS_PORT)
            && s.selector
                .as_ref()
                .is_some_and(|sel| !sel.is_empty() && sel.iter().all(|(k, v)| pod.labels.get(k) == Some(v)))
    })
}

fn cidr_covering_apiserver(p: &PeerSel, inv: &Inventory) -> Option<std::net::IpAddr> {
    match p {
        PeerSel::Ip { net, world_only: true, .. } => inv
            .apiserver_endpoints()
            .into_iter()
            .map(|b| b.ip)
            .find(|ip| net.contains(ip) && !matches!(inv.owner(*ip), Owner::Pod(_))),
        PeerSel::AnyOf(v) => v.iter().find_map(|x| cidr_covering_apiserver(x, inv)),
        _ => None,
    }
}
