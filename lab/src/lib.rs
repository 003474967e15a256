//! A self-contained lab standing in for a cluster, on one Linux machine: the audited "pod" in a
//! network namespace and cgroup of its own, everything else in a "cluster" namespace on a veth
//! link, Service ClusterIPs DNAT'ed to their backends *in the cluster namespace* (as kube-proxy
//! does on the host, after the pod's cgroup hooks), a DNS server answering for the lab's names.
//! Addresses are documentation ranges only (192.0.2.0/24 pods and nodes, 203.0.113.0/24
//! ClusterIPs, 198.51.100.0/24 outside the cluster), with no route off the machine.
//!
//! The tables below are the one description of the lab: addresses, DNAT rules, servers and the
//! inventory handed to `check`/`propose` all come from them.

pub mod actors;
pub mod host;

use std::{fmt::Write as _, net::Ipv4Addr, path::Path};

use anyhow::{Context, Result};

use netaudit::{
    chart::{CHART_NAME, Release, Values},
    model::{DNS_PORT, Protocol},
};

use self::host::{Cgroup, Netns};

/// The audited controller pod.
pub const POD_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 5);
/// The pod's own node ("worker"): the kubelet probes from here; the pod's gateway.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The control-plane node ("cp"): the apiserver's endpoint, and the webhook's caller.
pub const CP_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// The apiserver's endpoint port (not the Service's 443).
pub const APISERVER_PORT: u16 = 6443;

pub struct LabPod {
    pub namespace: &'static str,
    pub name: &'static str,
    pub labels: &'static [(&'static str, &'static str)],
    pub ip: Ipv4Addr,
    /// Named container ports: (name, port, protocol).
    pub ports: &'static [(&'static str, u16, Protocol)],
}

/// Pods of the lab cluster other than the controller (which the chart describes).
pub const PODS: [LabPod; 5] = [
    LabPod {
        namespace: "kube-system",
        name: "coredns-6f6b679f8f-lab01",
        labels: &[("k8s-app", "kube-dns"), ("pod-template-hash", "6f6b679f8f")],
        ip: Ipv4Addr::new(192, 0, 2, 53),
        ports: &[("dns", DNS_PORT, Protocol::Udp), ("dns-tcp", DNS_PORT, Protocol::Tcp)],
    },
    LabPod {
        namespace: "flux-system",
        name: "source-controller-7c9f8d5b4-lab02",
        labels: &[("app", "source-controller"), ("pod-template-hash", "7c9f8d5b4")],
        ip: Ipv4Addr::new(192, 0, 2, 20),
        ports: &[("http", 9090, Protocol::Tcp)],
    },
    LabPod {
        namespace: "monitoring",
        name: "prometheus-0",
        labels: &[("app.kubernetes.io/name", "prometheus")],
        ip: Ipv4Addr::new(192, 0, 2, 30),
        ports: &[],
    },
    LabPod {
        namespace: "flagger-system",
        name: "flagger-5d4b7c9f-lab04",
        labels: &[("app.kubernetes.io/name", "flagger")],
        ip: Ipv4Addr::new(192, 0, 2, 31),
        ports: &[],
    },
    LabPod {
        namespace: "observability",
        name: "otel-collector-0",
        labels: &[("app.kubernetes.io/name", "opentelemetry-collector")],
        ip: Ipv4Addr::new(192, 0, 2, 40),
        ports: &[("otlp-grpc", 4317, Protocol::Tcp)],
    },
];

pub struct LabService {
    pub namespace: &'static str,
    pub name: &'static str,
    pub cluster_ip: Ipv4Addr,
    /// (name, port, protocol, target port)
    pub ports: &'static [(&'static str, u16, Protocol, u16)],
    pub backend: Ipv4Addr,
    /// The in-cluster DNS name the lab's DNS server answers for it.
    pub dns_name: &'static str,
}

pub const SERVICES: [LabService; 4] = [
    LabService {
        namespace: "default",
        name: "kubernetes",
        cluster_ip: Ipv4Addr::new(203, 0, 113, 1),
        ports: &[("https", 443, Protocol::Tcp, APISERVER_PORT)],
        backend: CP_IP,
        dns_name: "kubernetes.default.svc.cluster.local",
    },
    LabService {
        namespace: "kube-system",
        name: "kube-dns",
        cluster_ip: Ipv4Addr::new(203, 0, 113, 10),
        ports: &[("dns", DNS_PORT, Protocol::Udp, DNS_PORT), ("dns-tcp", DNS_PORT, Protocol::Tcp, DNS_PORT)],
        backend: Ipv4Addr::new(192, 0, 2, 53),
        dns_name: "kube-dns.kube-system.svc.cluster.local",
    },
    LabService {
        namespace: "flux-system",
        name: "source-controller",
        cluster_ip: Ipv4Addr::new(203, 0, 113, 20),
        ports: &[("http", 80, Protocol::Tcp, 9090)],
        backend: Ipv4Addr::new(192, 0, 2, 20),
        dns_name: "source-controller.flux-system.svc.cluster.local",
    },
    LabService {
        namespace: "observability",
        name: "otel-collector",
        cluster_ip: Ipv4Addr::new(203, 0, 113, 40),
        ports: &[("otlp-grpc", 4317, Protocol::Tcp, 4317)],
        backend: Ipv4Addr::new(192, 0, 2, 40),
        dns_name: "otel-collector.observability.svc.cluster.local",
    },
];

/// Hosts outside the cluster: (address, port, DNS name or "", what it stands for).
pub const EXTERNAL: [(Ipv4Addr, u16, &str, &str); 2] = [
    (Ipv4Addr::new(198, 51, 100, 20), 443, "s3.example.com", "the S3 rollback store"),
    (Ipv4Addr::new(198, 51, 100, 66), 22, "", "an SSH host nobody configured (the unexpected flow)"),
];

/// Who calls the controller: (source address, chart port name, who it stands for).
pub const INGRESS_CLIENTS: [(Ipv4Addr, &str, &str); 4] = [
    (Ipv4Addr::new(192, 0, 2, 30), "metrics", "Prometheus scraping"),
    (Ipv4Addr::new(192, 0, 2, 31), "gate", "Flagger polling the gate"),
    (NODE_IP, "health", "the kubelet probing"),
    (CP_IP, "webhook", "the apiserver calling the webhook"),
];

/// The chart values the lab's controller runs with.
pub const CONTROLLER_VALUES: &str = "\
rollbackStore:
  backend: s3
  s3: {endpoint: s3.example.com, bucket: rollbacks, region: lab-1}
controller:
  tracing: {endpoint: otel-collector.observability.svc:4317}
";

/// The chart documentation's example egress block, with the lab's addresses but the
/// documentation's ports: the apiserver as an ipBlock on 443 (its endpoint listens on 6443).
pub fn docs_example_values() -> String {
    let api = format!("{CP_IP}/32");
    let otlp = SERVICES[3].backend;
    format!(
        "{CONTROLLER_VALUES}\
networkPolicy:
  enabled: true
  engine: kubernetes
  egress:
    enabled: true
    dns: true
    dnsNamespace: kube-system
    to:
      - to: [{{ipBlock: {{cidr: {api}}}}}]
        ports: [{{protocol: TCP, port: 443}}]
      - to: [{{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: flux-system}}}}}}]
      - to: [{{ipBlock: {{cidr: 198.51.100.0/24}}}}]
        ports: [{{protocol: TCP, port: 443}}]
      - to: [{{ipBlock: {{cidr: {otlp}/32}}}}]
        ports: [{{protocol: TCP, port: 4317}}]
"
    )
}

/// The DNS names the lab's DNS server answers: `name=address`.
pub fn dns_records() -> Vec<String> {
    let mut out: Vec<String> = SERVICES.iter().map(|s| format!("{}={}", s.dns_name, s.cluster_ip)).collect();
    out.extend(EXTERNAL.iter().filter(|e| !e.2.is_empty()).map(|e| format!("{}={}", e.2, e.0)));
    out
}

/// The built lab: namespaces and the audited cgroup, removed on drop.
pub struct Lab {
    pub release: Release,
    pub cgroup: Cgroup,
    pub pod: Netns,
    pub cluster: Netns,
}

impl Lab {
    pub fn build(tag: &str) -> Result<Lab> {
        let pod = Netns::new(format!("na-pod-{tag}"))?;
        let cluster = Netns::new(format!("na-cluster-{tag}"))?;
        let (a, b) = (format!("nap{tag}"), format!("nac{tag}"));
        host::run(&[
            "ip",
            "link",
            "add",
            &a,
            "netns",
            &pod.name,
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            &cluster.name,
        ])
        .context("creating the veth link between the lab's pod and cluster")?;
        pod.exec(&["ip", "addr", "add", &format!("{POD_IP}/24"), "dev", &a])?;
        pod.exec(&["ip", "link", "set", &a, "up"])?;
        // ClusterIPs and the outside world are reached through the node, as in a cluster; there
        // is no default route, so nothing can leave the lab.
        for net in ["203.0.113.0/24", "198.51.100.0/24"] {
            pod.exec(&["ip", "route", "add", net, "via", &NODE_IP.to_string()])?;
        }
        let mut addresses = vec![NODE_IP, CP_IP];
        addresses.extend(PODS.iter().map(|p| p.ip));
        addresses.extend(EXTERNAL.iter().map(|e| e.0));
        for ip in &addresses {
            let prefix = if ip.octets()[0] == 192 { 24 } else { 32 };
            cluster.exec(&["ip", "addr", "add", &format!("{ip}/{prefix}"), "dev", &b])?;
        }
        cluster.exec(&["ip", "link", "set", &b, "up"])?;
        cluster
            .exec_with_input(&["nft", "-f", "-"], &nft_rules())
            .context("loading the lab's ClusterIP DNAT rules (needs nftables: apt-get install nftables)")?;
        let cgroup = Cgroup::new(&format!("netaudit-demo-{tag}"))?;
        let release = Release { name: CHART_NAME.into(), namespace: "stageset-system".into() };
        Ok(Lab { release, cgroup, pod, cluster })
    }
}

/// kube-proxy's job: ClusterIP:port → backend:targetPort, in the "host" (cluster) namespace.
fn nft_rules() -> String {
    let mut rules =
        String::from("table ip netaudit_lab {\n  chain prerouting {\n    type nat hook prerouting priority dstnat;\n");
    for s in &SERVICES {
        for (_, port, proto, target) in s.ports {
            let p = proto.to_string().to_ascii_lowercase();
            let _ = writeln!(rules, "    ip daddr {} {p} dport {port} dnat to {}:{target}", s.cluster_ip, s.backend);
        }
    }
    rules += "  }\n}\n";
    rules
}

/// The lab described as a cluster, in the shape `kubectl get … -o yaml` prints.
pub fn inventory_yaml(values: &Values, release: &Release) -> Result<String> {
    let mut y = String::from(
        "# The netaudit demo lab described as a cluster (generated).\napiVersion: v1\nkind: List\nitems:\n",
    );
    let mut namespaces: Vec<&str> = vec!["default", release.namespace.as_str()];
    namespaces.extend(PODS.iter().map(|p| p.namespace));
    namespaces.extend(SERVICES.iter().map(|s| s.namespace));
    namespaces.sort();
    namespaces.dedup();
    for ns in namespaces {
        let _ = writeln!(
            y,
            "- {{apiVersion: v1, kind: Namespace, metadata: {{name: {ns}, labels: {{kubernetes.io/metadata.name: {ns}}}}}}}"
        );
    }
    for (name, ip) in [("worker", NODE_IP), ("cp", CP_IP)] {
        let _ = writeln!(
            y,
            "- {{apiVersion: v1, kind: Node, metadata: {{name: {name}}}, status: {{addresses: [{{type: InternalIP, address: {ip}}}]}}}}"
        );
    }
    let pod = |y: &mut String, ns: &str, name: &str, labels: String, ip: Ipv4Addr, ports: String| {
        let _ = writeln!(
            y,
            "- apiVersion: v1\n  kind: Pod\n  metadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\n  \
             spec: {{nodeName: worker, containers: [{{name: main, ports: [{ports}]}}]}}\n  status: {{podIP: {ip}, podIPs: [{{ip: {ip}}}]}}"
        );
    };
    for p in &PODS {
        let labels = p.labels.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ");
        let ports = p
            .ports
            .iter()
            .map(|(n, port, proto)| format!("{{name: {n}, containerPort: {port}, protocol: {proto}}}"))
            .collect::<Vec<_>>()
            .join(", ");
        pod(&mut y, p.namespace, p.name, labels, p.ip, ports);
    }
    // The controller, as the chart labels it, with the chart's named ports.
    let labels =
        values.selector_labels(release).iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ");
    let ports: Vec<String> =
        values.enabled_ports().iter().map(|(name, port)| format!("{{name: {name}, containerPort: {port}}}")).collect();
    pod(
        &mut y,
        &release.namespace,
        &format!("{}-6b7d9c-lab00", values.fullname(release)),
        labels,
        POD_IP,
        ports.join(", "),
    );
    for s in &SERVICES {
        let ports = s
            .ports
            .iter()
            .map(|(n, port, proto, target)| {
                format!("{{name: {n}, port: {port}, protocol: {proto}, targetPort: {target}}}")
            })
            .collect::<Vec<_>>()
            .join(", ");
        let slice_ports = s
            .ports
            .iter()
            .map(|(n, _, proto, target)| format!("{{name: {n}, port: {target}, protocol: {proto}}}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            y,
            "- {{apiVersion: v1, kind: Service, metadata: {{name: {n}, namespace: {ns}}}, spec: {{clusterIP: {ip}, clusterIPs: [{ip}], ports: [{ports}]}}}}\n\
             - apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata: {{name: {n}-lab, namespace: {ns}, labels: {{kubernetes.io/service-name: {n}}}}}\n  \
             addressType: IPv4\n  endpoints: [{{addresses: [{b}], conditions: {{ready: true}}}}]\n  ports: [{slice_ports}]",
            n = s.name,
            ns = s.namespace,
            ip = s.cluster_ip,
            b = s.backend
        );
    }
    Ok(y)
}

/// Whether anything of a lab tagged `tag` is left behind (for tests).
pub fn leftovers(tag: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(o) = std::process::Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            if line.contains(&format!("-{tag}")) && line.starts_with("na-") {
                out.push(format!("netns {line}"));
            }
        }
    }
    if let Ok(mount) = netaudit::capture::cgroup::cgroup2_mount()
        && Path::new(&mount.join(format!("netaudit-demo-{tag}"))).exists()
    {
        out.push(format!("cgroup netaudit-demo-{tag}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lab_inventory_reads_as_a_cluster() {
        let values = Values::defaults();
        let release = Release { name: CHART_NAME.into(), namespace: "stageset-system".into() };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("inv.yaml");
        std::fs::write(&p, inventory_yaml(&values, &release).unwrap()).unwrap();
        let (inv, rest) = netaudit::inventory::Inventory::load(&p).unwrap();
        assert!(rest.is_empty());
        assert!(inv.is_apiserver(CP_IP.into()));
        let svc = inv.service_by_cluster_ip(SERVICES[2].cluster_ip.into()).unwrap();
        assert_eq!(inv.backends(svc, &svc.ports[0])[0].port, 9090);
        assert!(nft_rules().contains("ip daddr 203.0.113.1 tcp dport 443 dnat to 192.0.2.2:6443"), "{}", nft_rules());
    }
}
