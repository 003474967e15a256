//! `check`: every recorded flow judged against the policies in force and classified against the
//! required-traffic matrix. Service traffic is judged at its backends (EndpointSlice addresses
//! and target ports), as the dataplane enforces it after kube-proxy's DNAT.

use std::{collections::BTreeSet, net::IpAddr};

use serde::Serialize;

use crate::{
    chart::{Release, Values},
    error::InputError,
    inventory::{Backend, Inventory, Owner, PodInfo, ServiceInfo},
    matrix::{Classification, Matrix, Observation, UnusedRow},
    model::{Direction, Flow, FlowFile, Losses, Protocol},
    policy::{
        Engine, Policy,
        evaluate::{Conn, ConnVerdict, Endpoint, Evaluator, Side, SideVerdict, describe_endpoint},
        lint::{self, Finding},
    },
};

/// Everything `check` judges with.
pub struct Check<'a> {
    pub inventory: &'a Inventory,
    pub policies: &'a [Policy],
    /// The chart's values, when the policies came from them (or to know the audited pod).
    pub values: &'a Values,
    pub values_given: bool,
    pub release: &'a Release,
    pub matrix: &'a Matrix,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub verdicts: Vec<FlowVerdict>,
    pub summary: Summary,
    /// Indexes of flows no enabled matrix row expects.
    pub unexpected: Vec<usize>,
    pub unused_rows: Vec<UnusedRow>,
    pub lint: Vec<Finding>,
    pub losses: Losses,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub flows: usize,
    pub allowed: usize,
    pub cut: usize,
    pub unexpected: usize,
    pub policies: usize,
}

#[derive(Debug, Serialize)]
pub struct EndpointView {
    pub ip: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `pod ns/name`, `node name`, `Service ns/name`, or `external`.
    pub identity: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct BackendVerdict {
    pub ip: IpAddr,
    pub port: u16,
    pub identity: String,
    #[serde(flatten)]
    pub verdict: ConnVerdict,
}

#[derive(Debug, Serialize)]
pub struct ServiceView {
    pub service: String,
    pub port: u16,
    pub note: String,
}

#[derive(Debug, Serialize)]
pub struct FlowVerdict {
    /// Position in the input flow file.
    pub index: usize,
    pub protocol: Protocol,
    pub src: EndpointView,
    pub dst: EndpointView,
    /// From the audited workload's side: egress when it opened the connection.
    pub direction: Side,
    pub allowed: bool,
    /// The end(s) whose verdict decided: the cutting ends for a cut flow, else the judged ends.
    pub decided_by: Vec<Side>,
    pub reason: String,
    /// Per judged end (absent when judged per Service backend).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sides: Vec<SideVerdict>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceView>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendVerdict>,
    pub matrix: Classification,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check<'_> {
    pub fn run(&self, flows: &FlowFile) -> Result<Report, InputError> {
        let inv = self.inventory;
        let mut notes = Vec::new();
        // Audited pods the inventory does not hold: the chart's pod, when values say what it is.
        let workload_template = self.values.workload_pod(self.release)?;
        let mut synthesized: Vec<PodInfo> = Vec::new();
        let mut unknown_workload = BTreeSet::new();
        for f in &flows.flows {
            let w = workload_ip(f, self.direction(f));
            if inv.pod_by_ip(w).is_none() && !matches!(inv.owner(w), Owner::Node(_)) {
                if self.values_given {
                    if !synthesized.iter().any(|p| p.ips.contains(&w)) {
                        let mut p = workload_template.clone();
                        p.ips = vec![w];
                        synthesized.push(p);
                    }
                } else {
                    unknown_workload.insert(w);
                }
            }
        }
        if !synthesized.is_empty() {
            notes.push(format!(
                "{} audited address(es) are not pods in the inventory; judged as the chart's controller pod ({} in {}) from {}",
                synthesized.len(),
                self.values.fullname(self.release),
                self.release.namespace,
                self.values.origin
            ));
        }
        if !unknown_workload.is_empty() {
            let list: Vec<String> = unknown_workload.iter().map(|ip| ip.to_string()).collect();
            notes.push(format!(
                "audited address(es) {} are not pods in the inventory, so no policy can select them and only the peer's \
                 side was judged; give --inventory with their Pods, or --values for the chart's controller",
                list.join(", ")
            ));
        }
        let ev = Evaluator::new(inv, self.policies);
        let engine = self.values_given.then(|| self.values.engine().ok()).flatten();
        let mut verdicts = Vec::with_capacity(flows.flows.len());
        let mut used = BTreeSet::new();
        for (index, f) in flows.flows.iter().enumerate() {
            let v = self.flow(index, f, &ev, &synthesized, engine)?;
            if let Some(r) = &v.matrix.row
                && !v.matrix.unexpected
            {
                used.insert(r.clone());
            }
            verdicts.push(v);
        }
        let unexpected: Vec<usize> = verdicts.iter().filter(|v| v.matrix.unexpected).map(|v| v.index).collect();
        let summary = Summary {
            flows: verdicts.len(),
            allowed: verdicts.iter().filter(|v| v.allowed).count(),
            cut: verdicts.iter().filter(|v| !v.allowed).count(),
            unexpected: unexpected.len(),
            policies: self.policies.len(),
        };
        if flows.losses.any() {
            notes.push(
                "the flow file reports losses: some traffic was not recorded, so this check may miss cuts".to_string(),
            );
        }
        Ok(Report {
            verdicts,
            summary,
            unexpected,
            unused_rows: self.matrix.unused(&used, self.values)?,
            lint: lint::lint(self.policies, inv),
            losses: flows.losses,
            notes,
        })
    }

    fn direction(&self, f: &Flow) -> Side {
        match f.direction {
            Some(Direction::Egress) => Side::Egress,
            Some(Direction::Ingress) => Side::Ingress,
            // Hand-written flows: the workload is the initiator unless it is the known server.
            None => match self.inventory.pod_by_ip(f.dst.ip) {
                Some(p)
                    if self.values_given
                        && self
                            .values
                            .selector_labels(self.release)
                            .iter()
                            .all(|(k, v)| p.labels.get(k) == Some(v)) =>
                {
                    Side::Ingress
                }
                _ => Side::Egress,
            },
        }
    }

    fn flow(
        &self,
        index: usize,
        f: &Flow,
        ev: &Evaluator<'_>,
        synth: &[PodInfo],
        engine: Option<Engine>,
    ) -> Result<FlowVerdict, InputError> {
        let inv = self.inventory;
        let direction = self.direction(f);
        let owner = |ip: IpAddr| match inv.owner(ip) {
            Owner::External => synth.iter().find(|p| p.ips.contains(&ip)).map(Owner::Pod).unwrap_or(Owner::External),
            o => o,
        };
        let src = Endpoint { ip: f.src.ip, owner: owner(f.src.ip), names: &f.src.names };
        let dst = Endpoint { ip: f.dst.ip, owner: owner(f.dst.ip), names: &f.dst.names };
        let view = |e: &Endpoint<'_>, port, svc: Option<&ServiceInfo>| EndpointView {
            ip: e.ip,
            port,
            identity: match (svc, e.owner) {
                (Some(s), _) => format!("Service {}", s.id()),
                (None, Owner::Pod(p)) => format!("pod {}", p.id()),
                (None, Owner::Node(n)) => format!("node {}", n.name),
                (None, Owner::External) => "external".into(),
            },
            names: e.names.to_vec(),
        };
        let service = inv.service_by_cluster_ip(f.dst.ip);
        let mut out = FlowVerdict {
            index,
            protocol: f.protocol,
            src: view(&src, None, None),
            dst: view(&dst, f.dst.port, service),
            direction,
            allowed: true,
            decided_by: Vec::new(),
            reason: String::new(),
            sides: Vec::new(),
            service: None,
            backends: Vec::new(),
            matrix: Classification { row: None, also: Vec::new(), unexpected: false, why: None },
            fix: None,
        };
        let mut backends_for_matrix = Vec::new();
        if f.internal {
            out.reason = "both ends are inside the audited pod: no network policy applies".into();
        } else if let Some(svc) = service {
            let sp = svc.ports.iter().find(|p| Some(p.port) == f.dst.port && p.protocol == f.protocol);
            let backends: Vec<Backend> = sp.map(|sp| inv.backends(svc, sp)).unwrap_or_default();
            if backends.is_empty() {
                let why = match sp {
                    None => format!("{}/{} is not a port of Service {}", f.protocol, f.dst.port.unwrap_or(0), svc.id()),
                    Some(_) => format!("Service {} has no ready endpoints in the inventory", svc.id()),
                };
                out.service = Some(ServiceView {
                    service: svc.id(),
                    port: f.dst.port.unwrap_or(0),
                    note: format!(
                        "{why}: judged against the ClusterIP itself, which policy engines do not match reliably"
                    ),
                });
                self.judge_single(&mut out, ev, &Conn { protocol: f.protocol, src, dst, port: f.dst.port }, engine);
            } else {
                let list: Vec<String> = backends.iter().map(|b| format!("{}:{}", b.ip, b.port)).collect();
                out.service = Some(ServiceView {
                    service: svc.id(),
                    port: f.dst.port.unwrap_or(0),
                    note: format!(
                        "ClusterIP {}:{} is judged at its backends {} (policy sees the backend after DNAT)",
                        f.dst.ip,
                        f.dst.port.unwrap_or(0),
                        list.join(", ")
                    ),
                });
                let mut cut_reasons = Vec::new();
                let mut decided = BTreeSet::new();
                for b in &backends {
                    let bend = Endpoint { ip: b.ip, owner: owner(b.ip), names: &f.dst.names };
                    backends_for_matrix.push(bend);
                    let v = ev.judge(&Conn { protocol: f.protocol, src, dst: bend, port: Some(b.port) });
                    if !v.allowed {
                        for s in v.sides.iter().filter(|s| !s.allowed) {
                            decided.insert(side_key(s.side));
                            cut_reasons.push(format!("backend {}:{}: {}", b.ip, b.port, s.reason));
                            if out.fix.is_none() {
                                out.fix = Some(fix(engine, direction, s, &src, &bend, f.protocol, Some(b.port), self));
                            }
                        }
                    }
                    out.backends.push(BackendVerdict {
                        ip: b.ip,
                        port: b.port,
                        identity: view(&bend, None, None).identity,
                        verdict: v,
                    });
                }
                out.allowed = cut_reasons.is_empty();
                if out.allowed {
                    let first = out.backends[0].verdict.sides.first().map(|s| s.reason.clone());
                    out.reason = first.unwrap_or_else(|| "no end of the connection is a pod: no policy applies".into());
                    out.decided_by = out.backends[0].verdict.sides.iter().map(|s| s.side).collect();
                } else {
                    out.reason = cut_reasons.join("; ");
                    out.decided_by = decided.into_iter().map(side_of).collect();
                }
            }
        } else {
            self.judge_single(&mut out, ev, &Conn { protocol: f.protocol, src, dst, port: f.dst.port }, engine);
        }
        // Matrix: from the workload's side, the peer is the other end.
        let (peer, backend_ports) = match direction {
            Side::Egress => (dst, out.backends.iter().map(|b| b.port).collect()),
            Side::Ingress => (src, Vec::new()),
        };
        let obs = Observation {
            direction,
            protocol: f.protocol,
            port: f.dst.port,
            backend_ports,
            peer,
            service: if direction == Side::Egress { service } else { None },
            backends: if direction == Side::Egress { backends_for_matrix } else { Vec::new() },
        };
        out.matrix = self.matrix.classify(&obs, inv, self.values)?;
        Ok(out)
    }

    fn judge_single(&self, out: &mut FlowVerdict, ev: &Evaluator<'_>, c: &Conn<'_>, engine: Option<Engine>) {
        let v = ev.judge(c);
        out.allowed = v.allowed;
        if v.sides.is_empty() {
            out.reason = "no end of the connection is a pod: no policy applies".into();
        } else if v.allowed {
            out.decided_by = v.sides.iter().map(|s| s.side).collect();
            out.reason = v.sides.iter().map(|s| s.reason.as_str()).collect::<Vec<_>>().join("; ");
        } else {
            let cut: Vec<&SideVerdict> = v.sides.iter().filter(|s| !s.allowed).collect();
            out.decided_by = cut.iter().map(|s| s.side).collect();
            out.reason = cut.iter().map(|s| s.reason.as_str()).collect::<Vec<_>>().join("; ");
            out.fix = Some(fix(engine, out.direction, cut[0], &c.src, &c.dst, c.protocol, c.port, self));
        }
        out.sides = v.sides;
    }
}

fn side_key(s: Side) -> u8 {
    match s {
        Side::Egress => 0,
        Side::Ingress => 1,
    }
}

fn side_of(k: u8) -> Side {
    if k == 0 { Side::Egress } else { Side::Ingress }
}

fn workload_ip(f: &Flow, direction: Side) -> IpAddr {
    match direction {
        Side::Egress => f.src.ip,
        Side::Ingress => f.dst.ip,
    }
}

/// What to change so the cut end admits the flow, in the engine's terms where we know it.
#[allow(clippy::too_many_arguments)]
fn fix(
    engine: Option<Engine>,
    direction: Side,
    s: &SideVerdict,
    src: &Endpoint<'_>,
    dst: &Endpoint<'_>,
    proto: Protocol,
    port: Option<u16>,
    c: &Check<'_>,
) -> String {
    let port_s = port.map(|p| format!(" port {p}")).unwrap_or_default();
    let peer = match s.side {
        Side::Egress => dst,
        Side::Ingress => src,
    };
    if let Some(p) = &s.policy
        && s.tier != "namespaced"
    {
        return format!(
            "{} {} decides this ({} tier): change that rule, or ask its owner",
            p,
            s.rule.as_deref().unwrap_or(""),
            s.tier
        );
    }
    // The workload opened the connection but the server's own ingress policy cut it.
    if s.side == Side::Ingress && direction == Side::Egress {
        return format!(
            "{} is isolated for ingress by {}: its namespace must allow {proto}{port_s} from {}",
            s.pod,
            s.isolated_by.join(", "),
            describe_endpoint(src)
        );
    }
    let apiserver = c.inventory.is_apiserver(peer.ip);
    let host = match peer.ip {
        IpAddr::V4(ip) => format!("{ip}/32"),
        IpAddr::V6(ip) => format!("{ip}/128"),
    };
    let dir = if s.side == Side::Egress { "egress to" } else { "ingress from" };
    let peer_rule = match (engine, peer.owner) {
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
    };
    let where_ = match (engine, s.side) {
        (Some(Engine::Kubernetes), Side::Egress) => " in networkPolicy.egress.to".to_string(),
        (Some(Engine::Kubernetes), Side::Ingress) => " in networkPolicy.<port>.from or additionalIngress".to_string(),
        (Some(e), Side::Egress) => format!(" in networkPolicy.{}.egress", e.name()),
        (Some(e), Side::Ingress) => format!(" in networkPolicy.{}.ingress", e.name()),
        (None, _) => String::new(),
    };
    let note = if apiserver && s.side == Side::Egress {
        " — the apiserver's endpoint address and port, not the Service's ClusterIP:443"
    } else {
        ""
    };
    format!("allow {dir} {}: {peer_rule}, {proto}{port_s}{where_}{note}", describe_endpoint(peer))
}
