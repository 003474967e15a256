//! resolve: a recorded flow plus the inventory (and the workload's description) → who is who.
//!
//! Every stage that judges a flow needs the same answers first: which end is the audited
//! workload (the flow's direction), who owns each address (a pod, a node, nothing the cluster
//! knows), and — for traffic to a Service's ClusterIP — where the dataplane really sends it: the
//! EndpointSlice backends and their target ports, after kube-proxy's DNAT. [`Resolver`] answers
//! them once per flow; [`crate::matrix`] classifies and [`crate::policy`] judges the result.

use std::{collections::BTreeSet, net::IpAddr};

use crate::{
    chart::{CHART_NAME, Chart},
    error::InputError,
    inventory::{Inventory, Labels, Owner, PodInfo, ServiceInfo, ServicePort},
    model::{Direction, Flow},
};

/// One end of a connection: an address, who owns it, and the names the workload resolved to it.
#[derive(Clone, Copy, Debug)]
pub struct Party<'a> {
    pub ip: IpAddr,
    pub owner: Owner<'a>,
    /// DNS names the workload resolved to this address (for FQDN rules).
    pub names: &'a [String],
}

impl Party<'_> {
    /// `pod ns/name`, `node name` or `external`.
    pub fn identity(&self) -> String {
        match self.owner {
            Owner::Pod(p) => format!("pod {}", p.id()),
            Owner::Node(n) => format!("node {}", n.name),
            Owner::External => "external".into(),
        }
    }
}

/// `pod x/a (10.0.0.1)`, `node cp (172.18.0.2)`, `192.0.2.9 (s3.example.com)`: written straight
/// into the reason or hint it is part of.
impl std::fmt::Display for Party<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.owner {
            Owner::Pod(p) => write!(f, "pod {}/{} ({})", p.namespace, p.name, self.ip),
            Owner::Node(n) => write!(f, "node {} ({})", n.name, self.ip),
            Owner::External if self.names.is_empty() => write!(f, "{}", self.ip),
            Owner::External => write!(f, "{} ({})", self.ip, self.names.join(", ")),
        }
    }
}

/// Where a connection arrives after the dataplane's translation: the party and its port.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub party: Party<'a>,
    pub port: Option<u16>,
}

/// A flow to a Service's ClusterIP.
#[derive(Clone, Copy, Debug)]
pub struct ServiceHop<'a> {
    pub service: &'a ServiceInfo,
    /// The Service port the flow used; none when the port is not one of the Service's.
    pub port: Option<&'a ServicePort>,
    /// Whether the targets are the Service's ready backends (else the ClusterIP itself: no
    /// backend is known for the port).
    pub via_backends: bool,
}

/// A flow with its ends resolved.
#[derive(Clone, Debug)]
pub struct ResolvedFlow<'a> {
    /// Position in the flow file.
    pub index: usize,
    pub flow: &'a Flow,
    /// From the audited workload's side: egress when it opened the connection.
    pub direction: Direction,
    pub src: Party<'a>,
    pub dst: Party<'a>,
    pub service: Option<ServiceHop<'a>>,
    /// Where the connection went: the Service's backends (target ports), or the recorded
    /// destination.
    pub targets: Vec<Target<'a>>,
}

impl<'a> ResolvedFlow<'a> {
    /// The audited workload's end.
    pub fn workload(&self) -> &Party<'a> {
        match self.direction {
            Direction::Egress => &self.src,
            Direction::Ingress => &self.dst,
        }
    }

    /// The other end, as recorded (a ClusterIP for Service traffic).
    pub fn peer(&self) -> &Party<'a> {
        match self.direction {
            Direction::Egress => &self.dst,
            Direction::Ingress => &self.src,
        }
    }

    /// Whether the targets are Service backends.
    pub fn via_backends(&self) -> bool {
        self.service.is_some_and(|s| s.via_backends)
    }
}

/// Resolves the flows of one flow file against one inventory.
pub struct Resolver<'a> {
    inv: &'a Inventory,
    /// The labels that make a pod the audited workload.
    workload: Labels,
    /// Audited addresses the inventory does not hold, as the chart's pod (with values).
    synthesized: Vec<PodInfo>,
    /// What the reader of a report must know about the resolution.
    pub notes: Vec<String>,
}

impl<'a> Resolver<'a> {
    /// The workload is the chart's controller: by the chart's selector labels when its values are
    /// known, else by its name label. Audited addresses the inventory does not hold are taken
    /// for the chart's pod when the chart is known, and noted otherwise.
    pub fn new(inv: &'a Inventory, chart: Option<&Chart>, flows: &[Flow]) -> Result<Resolver<'a>, InputError> {
        let workload = match chart {
            Some(c) => c.values.selector_labels(&c.release),
            None => Labels::from([("app.kubernetes.io/name".to_string(), CHART_NAME.to_string())]),
        };
        let mut r = Resolver { inv, workload, synthesized: Vec::new(), notes: Vec::new() };
        let template = chart.map(|c| c.values.workload_pod(&c.release));
        let mut unknown = BTreeSet::new();
        for f in flows {
            let w = match r.direction(f) {
                Direction::Egress => f.src.ip,
                Direction::Ingress => f.dst.ip,
            };
            if inv.pod_by_ip(w).is_some() || matches!(inv.owner(w), Owner::Node(_)) {
                continue;
            }
            match &template {
                Some(t) if !r.synthesized.iter().any(|p| p.ips.contains(&w)) => {
                    r.synthesized.push(PodInfo { ips: vec![w], ..t.clone() })
                }
                Some(_) => {}
                None => {
                    unknown.insert(w);
                }
            }
        }
        if let (Some(c), false) = (chart, r.synthesized.is_empty()) {
            r.notes.push(format!(
                "{} audited address(es) are not pods in the inventory; judged as the chart's controller pod ({} in {}) from {}",
                r.synthesized.len(),
                c.values.fullname(&c.release),
                c.release.namespace,
                c.values.origin
            ));
        }
        if !unknown.is_empty() {
            let list: Vec<String> = unknown.iter().map(|ip| ip.to_string()).collect();
            r.notes.push(format!(
                "audited address(es) {} are not pods in the inventory, so no policy can select them and only the peer's \
                 side was judged; give --inventory with their Pods, or --values for the chart's controller",
                list.join(", ")
            ));
        }
        Ok(r)
    }

    pub fn inventory(&self) -> &'a Inventory {
        self.inv
    }

    /// The recorded direction; for hand-written flows without one, ingress when the destination
    /// is the workload's pod and the source is not, else egress (the workload opened it).
    pub fn direction(&self, f: &Flow) -> Direction {
        if let Some(d) = f.direction {
            return d;
        }
        let is_workload =
            |ip| self.inv.pod_by_ip(ip).is_some_and(|p| self.workload.iter().all(|(k, v)| p.labels.get(k) == Some(v)));
        if is_workload(f.dst.ip) && !is_workload(f.src.ip) { Direction::Ingress } else { Direction::Egress }
    }

    /// Who owns `ip`: the inventory's answer, else a synthesized workload pod.
    pub fn owner(&self, ip: IpAddr) -> Owner<'_> {
        match self.inv.owner(ip) {
            Owner::External => {
                self.synthesized.iter().find(|p| p.ips.contains(&ip)).map(Owner::Pod).unwrap_or(Owner::External)
            }
            o => o,
        }
    }

    pub fn resolve<'r>(&'r self, index: usize, flow: &'r Flow) -> ResolvedFlow<'r>
    where
        'a: 'r,
    {
        let party = |e: &'r crate::model::Endpoint| Party { ip: e.ip, owner: self.owner(e.ip), names: &e.names };
        let (src, dst) = (party(&flow.src), party(&flow.dst));
        let mut targets = Vec::new();
        // Both ends inside the pod: no Service translation applies either.
        let service = (!flow.internal).then(|| self.inv.service_by_cluster_ip(flow.dst.ip)).flatten().map(|svc| {
            let port = svc.ports.iter().find(|p| Some(p.port) == flow.dst.port && p.protocol == flow.protocol);
            for b in port.map(|p| self.inv.backends(svc, p)).unwrap_or_default() {
                let party = Party { ip: b.ip, owner: self.owner(b.ip), names: &flow.dst.names };
                targets.push(Target { party, port: Some(b.port) });
            }
            ServiceHop { service: svc, port, via_backends: !targets.is_empty() }
        });
        if targets.is_empty() {
            targets.push(Target { party: dst, port: flow.dst.port });
        }
        ResolvedFlow { index, flow, direction: self.direction(flow), src, dst, service, targets }
    }
}
