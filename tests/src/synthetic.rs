//! A synthetic cluster and flow set for the benchmarks, generated deterministically (the same
//! numbers every run): 100 namespaces × 20 pods, 100 Services with EndpointSlices (named target
//! ports), 10 nodes, 1 000 NetworkPolicies; 100 000 flows (50 % pod→pod, 20 % pod→Service
//! ClusterIP, 20 % pod→external, 10 % node→pod).

use std::net::{IpAddr, Ipv4Addr};

use netaudit::{
    input::Document,
    model::{Direction, Flow, FlowFile, Protocol},
};
use serde_json::{Value, json};

pub const NAMESPACES: usize = 100;
pub const PODS_PER_NS: usize = 20;
pub const POLICIES_PER_NS: usize = 10;
pub const FLOWS: usize = 100_000;

/// A small deterministic generator (no dependency, same numbers every run).
pub struct Lcg(pub u64);
impl Lcg {
    pub fn next(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n
    }
}

pub fn pod_ip(ns: usize, pod: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, ns as u8, pod as u8 + 1)
}

pub fn doc(value: Value) -> Document {
    Document { origin: "bench".into(), value }
}

pub fn cluster(rng: &mut Lcg) -> Vec<Document> {
    let mut out = Vec::new();
    for n in 0..10 {
        out.push(doc(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{n}")},
            "status": {"addresses": [{"type": "InternalIP", "address": format!("172.18.0.{}", n + 1)}]}})));
    }
    for ns in 0..NAMESPACES {
        let name = format!("ns-{ns}");
        out.push(doc(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name,
            "labels": {"kubernetes.io/metadata.name": name, "tier": format!("t{}", ns % 5)}}})));
        for p in 0..PODS_PER_NS {
            out.push(doc(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("pod-{p}"), "namespace": name,
                    "labels": {"app": format!("app-{}", p % 5), "role": format!("r{}", p % 3)}},
                "spec": {"nodeName": format!("node-{}", rng.next(10)),
                    "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}, {"name": "metrics", "containerPort": 9090}]}]},
                "status": {"podIP": pod_ip(ns, p).to_string()}})));
        }
        out.push(doc(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc", "namespace": name},
            "spec": {"clusterIP": format!("10.96.{ns}.1"), "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})));
        out.push(doc(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "svc-1", "namespace": name, "labels": {"kubernetes.io/service-name": "svc"}},
            "addressType": "IPv4",
            "endpoints": (0..3).map(|p| json!({"addresses": [pod_ip(ns, p).to_string()]})).collect::<Vec<_>>(),
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})));
        for i in 0..POLICIES_PER_NS {
            let peer = match i % 4 {
                0 => json!({"podSelector": {"matchLabels": {"app": format!("app-{}", rng.next(5))}}}),
                1 => {
                    json!({"namespaceSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["t1", "t2"]}]}})
                }
                2 => json!({"ipBlock": {"cidr": "198.51.100.0/24", "except": ["198.51.100.128/25"]}}),
                _ => {
                    json!({"namespaceSelector": {"matchLabels": {"tier": "t3"}}, "podSelector": {"matchExpressions": [{"key": "role", "operator": "NotIn", "values": ["r0"]}]}})
                }
            };
            let ports = match i % 3 {
                0 => json!([{"port": 8080}]),
                1 => json!([{"port": "http"}, {"port": 9000, "endPort": 9100}]),
                _ => json!([{"protocol": "UDP", "port": 53}, {"port": 443}]),
            };
            out.push(doc(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": format!("np-{i}"), "namespace": name},
                "spec": {"podSelector": {"matchLabels": {"app": format!("app-{}", i % 5)}},
                    "policyTypes": ["Ingress", "Egress"],
                    "ingress": [{"from": [peer.clone()], "ports": ports.clone()}],
                    "egress": [{"to": [peer], "ports": ports}]}})));
        }
    }
    out
}

pub fn flows(rng: &mut Lcg) -> FlowFile {
    let ports = [80u16, 443, 8080, 9050, 53, 5432];
    let flows = (0..FLOWS)
        .map(|i| {
            let src_pod = IpAddr::V4(pod_ip(rng.next(NAMESPACES), rng.next(PODS_PER_NS)));
            let (src, dst, direction) = match i % 10 {
                0..=4 => (src_pod, IpAddr::V4(pod_ip(rng.next(NAMESPACES), rng.next(PODS_PER_NS))), Direction::Egress),
                5 | 6 => (src_pod, IpAddr::V4(Ipv4Addr::new(10, 96, rng.next(NAMESPACES) as u8, 1)), Direction::Egress),
                7 | 8 => (src_pod, IpAddr::V4(Ipv4Addr::new(198, 51, 100, rng.next(256) as u8)), Direction::Egress),
                _ => (IpAddr::V4(Ipv4Addr::new(172, 18, 0, rng.next(10) as u8 + 1)), src_pod, Direction::Ingress),
            };
            let port = if i % 10 >= 5 && i % 10 <= 6 { 80 } else { ports[rng.next(ports.len())] };
            let protocol = if port == 53 { Protocol::Udp } else { Protocol::Tcp };
            Flow::new(protocol, src, dst, Some(port))
                .with_direction(direction)
                .with_traffic((1, 100), (0, 0))
                .with_connections(1)
        })
        .collect();
    FlowFile::new(flows)
}
