//! `propose`: the smallest allowlist that admits every expected flow the workload really made,
//! per engine, as the chart's values, as complete manifests, or as data.
//!
//! It builds on `check`'s per-flow resolution (direction, Service backends and target ports,
//! matrix row), so a proposal and a check see each flow the same way. Egress is proposed peer by
//! peer (one rule per peer, with the ports that peer was used on); ingress port by port. DNS and
//! the apiserver are always present. Nothing is widened unless `--aggregate` says how.

pub mod render;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    str::FromStr,
};

use ipnet::IpNet;
use serde::Serialize;

use crate::{
    chart::{Chart, Release, Values, default_values},
    error::{FieldError, InputError},
    inventory::{Inventory, Labels, Owner, PodInfo},
    matrix::Matrix,
    model::{DNS_PORT, Direction, Flow, FlowFile, Protocol, Timestamp},
    policy::Engine,
    resolve::{Party, ResolvedFlow, Resolver},
};

/// Labels that identify an application; hashes and per-pod labels never go into a selector.
const IDENTIFYING_LABELS: [&str; 7] = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app",
    "k8s-app",
    "name",
    "component",
];

#[derive(Clone, Debug)]
pub struct Options {
    pub engine: Engine,
    pub include_unexpected: bool,
    pub aggregate: Option<Aggregate>,
}

/// How addresses may be widened into prefixes (`--aggregate prefix=24,prefix6=64,min=2`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Aggregate {
    pub prefix_v4: u8,
    pub prefix_v6: u8,
    /// Only widen when at least this many seen addresses share the prefix.
    pub min_addresses: usize,
}

impl FromStr for Aggregate {
    type Err = FieldError;
    fn from_str(s: &str) -> Result<Aggregate, FieldError> {
        let mut a = Aggregate { prefix_v4: 32, prefix_v6: 128, min_addresses: 2 };
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                FieldError::whole(format!("`{part}`: expected key=value (prefix=24, prefix6=64, min=2)"))
            })?;
            let n: u32 = v
                .trim_start_matches('/')
                .parse()
                .map_err(|_| FieldError::whole(format!("`{part}`: `{v}` is not a number")))?;
            match k {
                "prefix" if (8..=32).contains(&n) => a.prefix_v4 = n as u8,
                "prefix6" if (16..=128).contains(&n) => a.prefix_v6 = n as u8,
                "min" if n >= 1 => a.min_addresses = n as usize,
                "prefix" => {
                    return Err(FieldError::whole(format!("`{part}`: an IPv4 prefix must be /8 to /32 (never /0)")));
                }
                "prefix6" => {
                    return Err(FieldError::whole(format!("`{part}`: an IPv6 prefix must be /16 to /128 (never /0)")));
                }
                "min" => return Err(FieldError::whole(format!("`{part}`: min must be at least 1"))),
                other => {
                    return Err(FieldError::whole(format!(
                        "`{other}` is not an aggregation setting (prefix, prefix6, min)"
                    )));
                }
            }
        }
        Ok(a)
    }
}

/// Who a rule lets the workload talk to (or be reached by).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Peer {
    /// Pods in a namespace, narrowed by their shared identifying labels (none: the namespace).
    Pods { namespace: String, labels: Labels },
    /// The local apiserver's endpoints (never the Service's ClusterIP).
    Apiserver { addresses: Vec<IpAddr> },
    /// Addresses no selector can name: /32 (/128) each, or aggregated prefixes.
    Addresses { nets: Vec<IpNet>, names: Vec<String> },
}

pub use crate::policy::PortProto;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Evidence {
    pub flows: usize,
    pub connections: u64,
    pub bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Timestamp>,
    /// The peers seen (pod names, addresses with their DNS names).
    pub seen: BTreeSet<String>,
}

impl Evidence {
    fn add(&mut self, f: &Flow, seen: String) {
        self.merge(&Evidence {
            flows: 1,
            connections: f.connections,
            bytes: f.bytes,
            first_seen: f.first_seen,
            last_seen: f.last_seen,
            seen: BTreeSet::from([seen]),
        });
    }

    fn merge(&mut self, o: &Evidence) {
        self.flows += o.flows;
        self.connections += o.connections;
        self.bytes += o.bytes;
        if o.first_seen.is_some() && (self.first_seen.is_none() || o.first_seen < self.first_seen) {
            self.first_seen = o.first_seen;
        }
        if o.last_seen > self.last_seen {
            self.last_seen = o.last_seen;
        }
        self.seen.extend(o.seen.iter().cloned());
    }

    /// `3 flows, 12 connections, 4.1 kB, 10:31:49 → 10:36:02, seen: …`
    pub fn summary(&self) -> String {
        let mut s = format!("{} flow{}", self.flows, if self.flows == 1 { "" } else { "s" });
        if self.connections > 0 {
            s += &format!(", {} connection{}", self.connections, if self.connections == 1 { "" } else { "s" });
        }
        if self.bytes > 0 {
            s += &format!(", {} bytes", self.bytes);
        }
        if let (Some(a), Some(b)) = (&self.first_seen, &self.last_seen) {
            s += &format!(", seen {a} .. {b}");
        }
        s
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct EgressRule {
    pub peer: Peer,
    pub ports: Vec<PortProto>,
    /// Matrix rows of the flows behind it.
    pub rows: Vec<String>,
    /// DNS and the apiserver: kept even when the window saw nothing.
    pub required: bool,
    pub evidence: Evidence,
    /// Why the rule has this shape.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Dns {
    /// The namespace of the cluster DNS pods (the chart's `dnsNamespace`).
    pub namespace: String,
    /// The DNS pods' identifying labels, for engines whose chart rule must be replaced.
    pub labels: Labels,
    /// Whether the chart's own DNS rule is right for this engine and cluster.
    pub chart_rule: bool,
    pub evidence: Evidence,
    pub note: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct IngressPort {
    pub name: String,
    pub port: u16,
    /// Empty with `open`: open to all sources.
    pub from: Vec<Peer>,
    pub open: bool,
    pub why: String,
    pub evidence: Evidence,
}

#[derive(Clone, Debug, Serialize)]
pub struct Unexpected {
    pub index: usize,
    pub protocol: Protocol,
    pub src: String,
    pub dst: String,
    pub port: Option<u16>,
    pub why: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Proposal {
    pub engine: Engine,
    pub release: String,
    pub namespace: String,
    pub dns: Dns,
    pub egress: Vec<EgressRule>,
    pub ingress: Vec<IngressPort>,
    /// Flows no enabled matrix row expects: listed, not allowlisted (unless asked).
    pub unexpected: Vec<Unexpected>,
    pub include_unexpected: bool,
    pub notes: Vec<String>,
}

/// Builds the proposal for `flows`: every flow resolved and classified, then allowlisted by
/// peer (egress) and by port (ingress); the apiserver and DNS always.
pub fn propose(
    flows: &FlowFile,
    inv: &Inventory,
    chart: Option<&Chart>,
    matrix: &Matrix,
    opts: &Options,
) -> Result<Proposal, InputError> {
    let resolver = Resolver::new(inv, chart, &flows.flows)?;
    let values = chart.map(|c| &c.values).unwrap_or(default_values());
    let mut c = Collector {
        inv,
        egress: BTreeMap::new(),
        dns_evidence: Evidence::default(),
        dns_pods: Vec::new(),
        ingress_seen: BTreeMap::new(),
        unexpected: Vec::new(),
        notes: resolver.notes.clone(),
    };
    for (index, f) in flows.flows.iter().enumerate() {
        if f.internal {
            continue;
        }
        let r = resolver.resolve(index, f);
        let class = matrix.classify(&r, inv, values)?;
        if class.unexpected {
            c.unexpected.push(Unexpected {
                index,
                protocol: f.protocol,
                src: format!("{} ({})", f.src.ip, endpoint_identity(&r, &r.src)),
                dst: format!("{} ({})", f.dst.ip, endpoint_identity(&r, &r.dst)),
                port: f.dst.port,
                why: class.why.clone().unwrap_or_default(),
            });
            if !opts.include_unexpected {
                continue;
            }
        }
        match r.direction {
            Direction::Egress => c.egress(&r, class.row.as_deref()),
            Direction::Ingress => c.ingress(&r),
        }
    }
    let Collector { egress, dns_evidence, dns_pods, ingress_seen, unexpected, mut notes, .. } = c;
    let mut rules = vec![apiserver_rule(inv, egress.get(&Peer::Apiserver { addresses: vec![] }).cloned(), &mut notes)];
    let mut rest: Vec<EgressRule> =
        egress.into_iter().filter(|(k, _)| !matches!(k, Peer::Apiserver { .. })).map(|(_, r)| r).collect();
    if let Some(agg) = opts.aggregate {
        rest = aggregate(rest, agg, &mut notes);
    }
    for r in &mut rest {
        r.ports.sort();
        r.rows.sort();
        if let Peer::Addresses { names, .. } = &mut r.peer {
            names.sort();
        }
    }
    rules.extend(rest);
    let ingress = ingress_proposal(ingress_seen, values, flows, inv)?;
    if !opts.include_unexpected && !unexpected.is_empty() {
        notes.push(format!(
            "{} unexpected flow(s) are listed below and NOT allowlisted; review them, then pass --include-unexpected \
             or extend the matrix if they are legitimate",
            unexpected.len()
        ));
    }
    let release = chart
        .map(|c| c.release.clone())
        .unwrap_or_else(|| Release::infer(None, None, inv.pods.iter().map(|p| &**p), "default").0);
    Ok(Proposal {
        engine: opts.engine,
        release: release.name,
        namespace: release.namespace,
        dns: dns_proposal(inv, &dns_pods, dns_evidence, opts.engine),
        egress: rules,
        ingress,
        unexpected,
        include_unexpected: opts.include_unexpected,
        notes,
    })
}

/// `Service ns/name` for a ClusterIP destination, else who owns the address.
fn endpoint_identity(r: &ResolvedFlow<'_>, p: &Party<'_>) -> String {
    match r.service {
        Some(s) if std::ptr::eq(p, &r.dst) => format!("Service {}", s.service.id()),
        _ => p.identity(),
    }
}

/// What the flows showed, gathered per peer and port.
struct Collector<'a> {
    inv: &'a Inventory,
    egress: BTreeMap<Peer, EgressRule>,
    dns_evidence: Evidence,
    dns_pods: Vec<&'a PodInfo>,
    ingress_seen: BTreeMap<u16, Vec<(Peer, String, usize)>>,
    unexpected: Vec<Unexpected>,
    notes: Vec<String>,
}

impl<'a> Collector<'a> {
    /// An egress flow, at each place it really went (Service backends and their target ports).
    fn egress(&mut self, r: &ResolvedFlow<'_>, row: Option<&str>) {
        let (inv, f) = (self.inv, r.flow);
        for t in &r.targets {
            let (ip, port) = (t.party.ip, t.port);
            let owner = inv.owner(ip);
            if row == Some("dns")
                && let Owner::Pod(p) = owner
            {
                self.dns_evidence.add(f, format!("pod {}", p.id()));
                if !self.dns_pods.iter().any(|x| std::ptr::eq(*x, p)) {
                    self.dns_pods.push(p);
                }
                continue;
            }
            let (peer, seen) = match owner {
                _ if inv.is_apiserver(ip) => {
                    (Peer::Apiserver { addresses: vec![] }, format!("apiserver endpoint {ip}:{}", port.unwrap_or(0)))
                }
                Owner::Pod(p) => (
                    Peer::Pods { namespace: p.namespace.clone(), labels: identifying(&p.labels) },
                    format!("pod {}", p.id()),
                ),
                _ => (
                    Peer::Addresses { nets: vec![IpNet::from(ip)], names: Vec::new() },
                    describe_addr(ip, &f.dst.names),
                ),
            };
            let rule = self.egress.entry(peer.clone()).or_insert_with(|| EgressRule {
                peer,
                ports: Vec::new(),
                rows: Vec::new(),
                required: false,
                evidence: Evidence::default(),
                note: None,
            });
            if let Peer::Addresses { names, .. } = &mut rule.peer {
                for n in &f.dst.names {
                    if !names.contains(n) {
                        names.push(n.clone());
                    }
                }
            }
            if let Some(port) = port {
                let pp = PortProto { protocol: f.protocol, port };
                if !rule.ports.contains(&pp) {
                    rule.ports.push(pp);
                }
            }
            if let Some(r) = row
                && !rule.rows.iter().any(|x| x == r)
            {
                rule.rows.push(r.to_string());
            }
            rule.evidence.add(f, seen);
        }
    }

    /// An ingress flow: its source, under the port it reached.
    fn ingress(&mut self, r: &ResolvedFlow<'_>) {
        let f = r.flow;
        let Some(port) = f.dst.port else { return };
        let (peer, seen) = match self.inv.owner(f.src.ip) {
            Owner::Pod(p) => (
                Peer::Pods { namespace: p.namespace.clone(), labels: identifying(&p.labels) },
                format!("pod {}", p.id()),
            ),
            Owner::Node(n) => (
                Peer::Addresses { nets: vec![IpNet::from(f.src.ip)], names: vec![] },
                format!("node {} ({})", n.name, f.src.ip),
            ),
            Owner::External => (
                Peer::Addresses { nets: vec![IpNet::from(f.src.ip)], names: vec![] },
                describe_addr(f.src.ip, &f.src.names),
            ),
        };
        self.ingress_seen.entry(port).or_default().push((peer, seen, r.index));
    }
}

/// The apiserver rule: always, by its endpoints and endpoint ports (never the Service's
/// ClusterIP:443), with what the window saw of it.
fn apiserver_rule(inv: &Inventory, seen: Option<EgressRule>, notes: &mut Vec<String>) -> EgressRule {
    let endpoints = inv.apiserver_endpoints();
    let mut api = seen.unwrap_or_else(|| EgressRule {
        peer: Peer::Apiserver { addresses: vec![] },
        ports: Vec::new(),
        rows: vec!["apiserver".into()],
        required: true,
        evidence: Evidence::default(),
        note: None,
    });
    api.required = true;
    let mut addrs: Vec<IpAddr> = endpoints.iter().map(|b| b.ip).collect();
    addrs.sort();
    addrs.dedup();
    for b in &endpoints {
        let pp = PortProto { protocol: Protocol::Tcp, port: b.port };
        if !api.ports.contains(&pp) {
            api.ports.push(pp);
        }
    }
    api.ports.sort();
    if addrs.is_empty() {
        notes.push(
            "the apiserver's endpoints are unknown (no `kubernetes` EndpointSlice in the inventory): the apiserver rule \
             is a placeholder; give --inventory so it names the endpoint addresses and port"
                .into(),
        );
    }
    api.note = Some(if api.evidence.flows == 0 {
        "required: the controller cannot work without the apiserver, even though this window saw no connection".into()
    } else {
        "the endpoints of default/kubernetes and their port: policy sees the apiserver after the Service's DNAT".into()
    });
    api.peer = Peer::Apiserver { addresses: addrs };
    api
}

fn describe_addr(ip: IpAddr, names: &[String]) -> String {
    if names.is_empty() { ip.to_string() } else { format!("{ip} ({})", names.join(", ")) }
}

/// The identifying labels of a pod (never hashes or per-pod labels).
fn identifying(labels: &Labels) -> Labels {
    labels
        .iter()
        .filter(|(k, _)| IDENTIFYING_LABELS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn dns_proposal(inv: &Inventory, pods: &[&PodInfo], evidence: Evidence, engine: Engine) -> Dns {
    // The DNS pods: those the window saw, else those behind kube-dns.
    let svc_pods: Vec<&PodInfo> = if pods.is_empty() {
        inv.services
            .iter()
            .filter(|s| s.name == "kube-dns")
            .flat_map(|s| s.ports.iter().flat_map(|p| inv.backends(s, p)))
            .filter_map(|b| inv.pod_by_ip(b.ip))
            .collect()
    } else {
        pods.to_vec()
    };
    let namespace = svc_pods.first().map(|p| p.namespace.clone()).unwrap_or_else(|| "kube-system".into());
    let labels = svc_pods
        .first()
        .map(|p| identifying(&p.labels))
        .unwrap_or_else(|| Labels::from([("k8s-app".into(), "kube-dns".into())]));
    let labelled_kube_dns = labels.get("k8s-app").map(String::as_str) == Some("kube-dns");
    let (chart_rule, note) = match engine {
        Engine::Cilium if !labelled_kube_dns => (
            false,
            format!(
                "the chart's Cilium DNS rule selects k8s-app=kube-dns, but the DNS pods are labelled {}: replaced by a rule \
                 on their real labels (with the DNS visibility rule toFQDNs needs)",
                render::labels_text(&labels)
            ),
        ),
        Engine::Calico => (
            false,
            "the chart's Calico DNS rule opens port 53 to every destination: replaced by a rule to the DNS pods only"
                .into(),
        ),
        _ => (true, format!("the chart's DNS rule: pods in namespace {namespace} on UDP and TCP {DNS_PORT}")),
    };
    let note =
        if evidence.flows == 0 { format!("{note}; required even though this window saw no DNS query") } else { note };
    Dns { namespace, labels, chart_rule, evidence, note }
}

/// Ingress port by port: the narrowest `from` the observed sources allow.
fn ingress_proposal(
    seen: BTreeMap<u16, Vec<(Peer, String, usize)>>,
    values: &Values,
    flows: &FlowFile,
    inv: &Inventory,
) -> Result<Vec<IngressPort>, InputError> {
    let mut out = Vec::new();
    for (name, port) in values.enabled_ports() {
        let sources = seen.get(&port).cloned().unwrap_or_default();
        let mut evidence = Evidence::default();
        for (_, s, i) in &sources {
            evidence.add(&flows.flows[*i], s.clone());
        }
        let non_pod: Vec<&String> =
            sources.iter().filter(|(p, _, _)| !matches!(p, Peer::Pods { .. })).map(|(_, s, _)| s).collect();
        let (open, from, why) = match name {
            "health" => (true, vec![], "must stay open: the kubelet probes from the node's own address, which no selector names (and policy never blocks the resident node)".to_string()),
            "webhook" => (true, vec![], "must stay open: the kube-apiserver calls the webhook from the control plane's host network, which no pod or namespace selector can name".to_string()),
            _ if sources.is_empty() => (true, vec![], format!("no traffic to {name} ({port}) in this window: left as the chart renders it; set its `from` to the namespace of its expected client")),
            _ if !non_pod.is_empty() && inv.is_empty() => (true, vec![], "sources are not known pods (no inventory): left open".to_string()),
            _ => {
                let mut peers: Vec<Peer> = sources.iter().map(|(p, _, _)| p.clone()).collect();
                peers.sort();
                peers.dedup();
                let who: Vec<&String> = evidence.seen.iter().collect();
                (false, peers, format!("only what this window saw: {}", who.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")))
            }
        };
        out.push(IngressPort { name: name.into(), port, from, open, why, evidence });
    }
    Ok(out)
}

/// Widens addresses with the same ports into prefixes, as `--aggregate` allows (never /0).
fn aggregate(rules: Vec<EgressRule>, agg: Aggregate, notes: &mut Vec<String>) -> Vec<EgressRule> {
    let mut out = Vec::new();
    let mut groups: BTreeMap<(Vec<PortProto>, IpNet), Vec<EgressRule>> = BTreeMap::new();
    for r in rules {
        match &r.peer {
            Peer::Addresses { nets, .. } if nets.len() == 1 => {
                let ip = nets[0].addr();
                let prefix = if ip.is_ipv4() { agg.prefix_v4 } else { agg.prefix_v6 };
                let net = IpNet::new(ip, prefix).expect("prefix checked").trunc();
                let mut ports = r.ports.clone();
                ports.sort();
                groups.entry((ports, net)).or_default().push(r);
            }
            _ => out.push(r),
        }
    }
    for ((_, net), members) in groups {
        if members.len() < agg.min_addresses || members.len() == 1 {
            out.extend(members);
            continue;
        }
        notes.push(format!("aggregated {} addresses into {net} (--aggregate)", members.len()));
        let mut merged = members[0].clone();
        let mut names = Vec::new();
        for m in &members {
            if let Peer::Addresses { names: n, .. } = &m.peer {
                names.extend(n.iter().cloned());
            }
        }
        for m in &members[1..] {
            merged.evidence.merge(&m.evidence);
            for r in &m.rows {
                if !merged.rows.contains(r) {
                    merged.rows.push(r.clone());
                }
            }
        }
        names.sort();
        names.dedup();
        merged.peer = Peer::Addresses { nets: vec![net], names };
        out.push(merged);
    }
    out
}
