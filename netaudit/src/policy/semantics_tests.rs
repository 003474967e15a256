//! Table-driven semantics of each dialect, from the engines' documentation. Every case is a small
//! cluster (YAML), policies (YAML), and connections with the verdict the docs give.

use std::net::IpAddr;

use super::evaluate::{Conn, Evaluator};
use crate::resolve::Party;
use crate::{
    input::{Document, parse_values},
    inventory::{Inventory, Owner},
    model::Protocol,
};

/// Namespaces a, b, kube-system; pods a/web (app=web, port http=8080), a/db (app=db), b/client
/// (app=client), kube-system/dns (k8s-app=kube-dns); nodes n1 (hosts a/web) and n2; the apiserver
/// at 172.18.0.2:6443 (node n2).
const CLUSTER: &str = r#"
- {apiVersion: v1, kind: Namespace, metadata: {name: a, labels: {team: blue}}}
- {apiVersion: v1, kind: Namespace, metadata: {name: b, labels: {team: red}}}
- {apiVersion: v1, kind: Namespace, metadata: {name: kube-system}}
- apiVersion: v1
  kind: Pod
  metadata: {name: web, namespace: a, labels: {app: web}}
  spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
  status: {podIP: 10.0.1.1}
- {apiVersion: v1, kind: Pod, metadata: {name: db, namespace: a, labels: {app: db}}, spec: {nodeName: n1, containers: [{name: c, ports: [{name: pg, containerPort: 5432}]}]}, status: {podIP: 10.0.1.2}}
- {apiVersion: v1, kind: Pod, metadata: {name: client, namespace: b, labels: {app: client}}, spec: {nodeName: n2, containers: [{name: c}]}, status: {podIP: 10.0.2.1}}
- {apiVersion: v1, kind: Pod, metadata: {name: dns, namespace: kube-system, labels: {k8s-app: kube-dns}}, spec: {nodeName: n2, containers: [{name: c}]}, status: {podIP: 10.0.3.1}}
- {apiVersion: v1, kind: Node, metadata: {name: n1}, status: {addresses: [{type: InternalIP, address: 172.18.0.1}]}}
- {apiVersion: v1, kind: Node, metadata: {name: n2}, status: {addresses: [{type: InternalIP, address: 172.18.0.2}]}}
- {apiVersion: v1, kind: Service, metadata: {name: kubernetes, namespace: default}, spec: {clusterIP: 10.96.0.1, ports: [{name: https, port: 443}]}}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: kubernetes, namespace: default, labels: {kubernetes.io/service-name: kubernetes}}
  addressType: IPv4
  endpoints: [{addresses: [172.18.0.2]}]
  ports: [{name: https, port: 6443, protocol: TCP}]
"#;

fn docs(yaml: &str) -> Vec<Document> {
    let mut out = Vec::new();
    for v in parse_values(yaml).unwrap() {
        match v {
            serde_json::Value::Array(items) => {
                out.extend(items.into_iter().map(|value| Document { origin: "test".into(), value }))
            }
            value => out.push(Document { origin: "test".into(), value }),
        }
    }
    out
}

fn endpoint<'a>(inv: &'a Inventory, s: &str, names: &'a [String]) -> Party<'a> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Party { ip, owner: inv.owner(ip), names };
    }
    let (ns, name) = s.split_once('/').unwrap();
    let pod = inv.pod(ns, name).unwrap();
    Party { ip: pod.ips[0], owner: Owner::Pod(pod), names }
}

/// Runs `cases` ("src dst PROTO/port allowed|cut [name]") against `policies` in the test cluster.
fn check(policies: &str, cases: &[&str]) {
    let (inv, rest) = Inventory::from_documents(docs(CLUSTER)).unwrap();
    assert!(rest.is_empty());
    let (ps, rest) = super::from_documents(docs(policies)).unwrap();
    assert!(rest.is_empty());
    let ev = Evaluator::new(&inv, &ps);
    for case in cases {
        let f: Vec<&str> = case.split_whitespace().collect();
        let names: Vec<String> = f.get(4).map(|n| vec![n.to_string()]).unwrap_or_default();
        let (proto, port) = f[2].split_once('/').unwrap_or((f[2], ""));
        let conn = Conn {
            protocol: proto.parse::<Protocol>().unwrap(),
            src: endpoint(&inv, f[0], &[]),
            dst: endpoint(&inv, f[1], &names),
            port: port.parse().ok(),
        };
        let v = ev.judge(&conn);
        let want = f[3] == "allowed";
        let why: Vec<_> = v.sides.iter().map(|s| s.reason.clone()).collect();
        assert_eq!(v.allowed, want, "{case}: {}", why.join("; "));
    }
}

#[test]
fn networkpolicy_ports_endport_and_named_ports() {
    check(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress, namespace: b}
spec:
  podSelector: {}
  egress:
  - ports: [{port: 8000, endPort: 8100}]
  - ports: [{port: pg}]
  - ports: [{protocol: UDP, port: 53}]
"#,
        &[
            "b/client a/web TCP/8080 allowed",
            "b/client a/web TCP/8101 cut",
            "b/client a/db TCP/5432 allowed",
            // A named port means the destination pod's port of that name: web has none.
            "b/client a/web TCP/5432 cut",
            "b/client 192.0.2.1 TCP/5432 cut",
            "b/client kube-system/dns UDP/53 allowed",
            "b/client kube-system/dns TCP/53 cut",
            "b/client 192.0.2.1 ICMP cut",
        ],
    );
}

#[test]
fn networkpolicy_own_node_is_never_blocked_but_other_nodes_are() {
    check(
        "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: deny, namespace: a}, spec: {podSelector: {}}}",
        &["172.18.0.1 a/web TCP/8080 allowed", "172.18.0.2 a/web TCP/8080 cut", "b/client a/web TCP/8080 cut"],
    );
}

#[test]
fn cilium_allow_deny_entities_and_fqdns() {
    check(
        r#"
- apiVersion: cilium.io/v2
  kind: CiliumNetworkPolicy
  metadata: {name: web, namespace: a}
  spec:
    endpointSelector: {matchLabels: {app: web}}
    egress:
    - toEndpoints: [{matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, "k8s:k8s-app": kube-dns}}]
      toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchPattern: "*"}]}}]
    - toEntities: [kube-apiserver]
    - toFQDNs: [{matchPattern: "*.example.com"}]
      toPorts: [{ports: [{port: "443", protocol: TCP}]}]
    - toEndpoints: [{matchLabels: {app: db}}]
    - toCIDR: [172.18.0.2/32, 10.0.2.0/24, 198.51.100.0/24]
    egressDeny:
    - toCIDRSet: [{cidr: 198.51.100.0/24, except: [198.51.100.7/32]}]
    ingress:
    - fromEntities: [cluster]
      toPorts: [{ports: [{port: http}]}]
"#,
        &[
            "a/web kube-system/dns UDP/53 allowed",
            "a/web kube-system/dns TCP/53 allowed",
            "a/web 172.18.0.2 TCP/6443 allowed",
            "a/web 192.0.2.10 TCP/443 allowed s3.example.com",
            "a/web 192.0.2.10 TCP/443 cut example.com",
            "a/web 192.0.2.10 TCP/80 cut s3.example.com",
            // Selectors without the namespace label stay in the policy's namespace.
            "a/web a/db TCP/5432 allowed",
            // CIDR rules never match pods (b/client is in 10.0.2.0/24).
            "a/web b/client TCP/80 cut",
            // Deny wins over the allowing toCIDR; its except is still allowed.
            "a/web 198.51.100.9 TCP/80 cut",
            "a/web 198.51.100.7 TCP/80 allowed",
            "b/client a/web TCP/8080 allowed",
            "b/client a/web TCP/80 cut",
            "203.0.113.5 a/web TCP/8080 cut",
            // a/db is not selected: default allow.
            "b/client a/db TCP/5432 allowed",
        ],
    );
}

#[test]
fn cilium_empty_lists_enforce_nothing_but_an_empty_rule_denies() {
    check(
        r#"
- {apiVersion: cilium.io/v2, kind: CiliumNetworkPolicy, metadata: {name: looks-like-deny, namespace: a}, spec: {endpointSelector: {}, ingress: [], egress: []}}
- {apiVersion: cilium.io/v2, kind: CiliumNetworkPolicy, metadata: {name: deny-ingress, namespace: b}, spec: {endpointSelector: {}, ingress: [{}]}}
"#,
        &["b/client a/web TCP/8080 allowed", "a/web b/client TCP/80 cut", "a/web 192.0.2.1 TCP/80 allowed"],
    );
    check(
        r#"{apiVersion: cilium.io/v2, kind: CiliumNetworkPolicy, metadata: {name: d, namespace: a},
            spec: {endpointSelector: {}, enableDefaultDeny: {egress: true}, egress: []}}"#,
        &["a/web 192.0.2.1 TCP/80 cut", "b/client a/web TCP/8080 allowed"],
    );
}

#[test]
fn cilium_host_remote_node_world_and_clusterwide() {
    check(
        r#"
- apiVersion: cilium.io/v2
  kind: CiliumClusterwideNetworkPolicy
  metadata: {name: web-egress}
  spec:
    endpointSelector: {matchLabels: {"k8s:io.kubernetes.pod.namespace": a, app: web}}
    egress:
    - toEntities: [host]
    - toEntities: [world]
      toPorts: [{ports: [{port: "443"}]}]
    - toEndpoints: [{matchLabels: {app: client}}]
"#,
        &[
            "a/web 172.18.0.1 TCP/10250 allowed",
            "a/web 172.18.0.2 TCP/10250 cut",
            "a/web 192.0.2.1 TCP/443 allowed",
            "a/web 192.0.2.1 TCP/80 cut",
            // Clusterwide selectors without a namespace label look in every namespace.
            "a/web b/client TCP/80 allowed",
        ],
    );
}

#[test]
fn calico_order_actions_and_nets() {
    check(
        r#"
- apiVersion: projectcalico.org/v3
  kind: NetworkPolicy
  metadata: {name: deny-ssh, namespace: a}
  spec:
    order: 100
    selector: app == 'web'
    types: [Egress]
    egress:
    - {action: Deny, protocol: TCP, destination: {ports: [22]}}
    - {action: Pass, destination: {nets: [203.0.113.0/24]}}
- apiVersion: projectcalico.org/v3
  kind: NetworkPolicy
  metadata: {name: allow, namespace: a}
  spec:
    order: 200
    selector: all()
    egress:
    - {action: Allow, protocol: TCP, destination: {nets: [192.0.2.0/24], notNets: [192.0.2.128/25], ports: ["80:90", 443]}}
    - {action: Allow, protocol: UDP, destination: {namespaceSelector: "kubernetes.io/metadata.name == 'kube-system'", selector: "k8s-app == 'kube-dns'", ports: [53]}}
    - {action: Allow, destination: {selector: "app in {'db'}"}}
    - {action: Log}
"#,
        &[
            "a/web 192.0.2.1 TCP/22 cut",
            "a/web 192.0.2.1 TCP/85 allowed",
            "a/web 192.0.2.1 TCP/443 allowed",
            "a/web 192.0.2.200 TCP/443 cut",
            "a/web kube-system/dns UDP/53 allowed",
            "a/web kube-system/dns TCP/53 cut",
            "a/web a/db TCP/5432 allowed",
            // Pass leaves the tier: no later rule, and no end-of-tier deny.
            "a/web 203.0.113.9 TCP/8080 allowed",
            // a/db only has `allow` (its types default to Egress: egress rules only).
            "a/db 192.0.2.1 TCP/22 cut",
            "b/client a/db TCP/5432 allowed",
        ],
    );
}

#[test]
fn calico_before_networkpolicy_by_order() {
    // A Calico deny at order 10 comes before NetworkPolicy (order 1000) allows.
    check(
        r#"
- {apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: allow-all, namespace: a}, spec: {podSelector: {}, ingress: [{}]}}
- apiVersion: projectcalico.org/v3
  kind: NetworkPolicy
  metadata: {name: deny-b, namespace: a}
  spec: {order: 10, selector: all(), ingress: [{action: Deny, source: {namespaceSelector: "team == 'red'"}}]}
"#,
        &["b/client a/web TCP/8080 cut", "kube-system/dns a/web TCP/8080 allowed", "192.0.2.1 a/web TCP/8080 allowed"],
    );
}

#[test]
fn cluster_network_policy_tiers() {
    check(
        r#"
- apiVersion: policy.networking.k8s.io/v1alpha2
  kind: ClusterNetworkPolicy
  metadata: {name: admin}
  spec:
    tier: Admin
    priority: 10
    subject: {namespaces: {}}
    egress:
    - {name: dns, action: Accept, to: [{pods: {namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}, podSelector: {matchLabels: {k8s-app: kube-dns}}}}], protocols: [{udp: {destinationPort: {number: 53}}}]}
    - {name: to-b, action: Pass, to: [{namespaces: {matchLabels: {team: red}}}]}
    - {name: no-ssh, action: Deny, to: [{networks: [0.0.0.0/0]}], protocols: [{tcp: {destinationPort: {number: 22}}}]}
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: web-egress, namespace: a}
  spec: {podSelector: {matchLabels: {app: web}}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 192.0.2.0/24}}]}]}
- apiVersion: policy.networking.k8s.io/v1alpha2
  kind: ClusterNetworkPolicy
  metadata: {name: baseline}
  spec:
    tier: Baseline
    priority: 5
    subject: {namespaces: {matchLabels: {team: blue}}}
    egress:
    - {name: api, action: Accept, to: [{nodes: {}}], protocols: [{tcp: {destinationPort: {range: {start: 6000, end: 7000}}}}]}
    - {name: deny-rest, action: Deny, to: [{networks: [0.0.0.0/0]}]}
"#,
        &[
            // Admin Accept beats the NetworkPolicy that does not allow DNS.
            "a/web kube-system/dns UDP/53 allowed",
            // Admin Deny beats the NetworkPolicy's allow.
            "a/web 192.0.2.1 TCP/22 cut",
            "a/web 192.0.2.1 TCP/80 allowed",
            // Pass goes to NetworkPolicy: web is isolated and b/client is not in its ipBlock.
            "a/web b/client TCP/80 cut",
            // a/db has no NetworkPolicy: Baseline decides.
            "a/db 172.18.0.2 TCP/6443 allowed",
            "a/db 192.0.2.1 TCP/80 cut",
            // Pass from Admin, not isolated by NetworkPolicy, Baseline denies.
            "a/db b/client TCP/80 cut",
            // b is not a Baseline subject.
            "b/client 192.0.2.1 TCP/80 allowed",
        ],
    );
}

#[test]
fn cluster_network_policy_named_ports_and_fail_closed_peers() {
    check(
        r#"
- apiVersion: policy.networking.k8s.io/v1alpha2
  kind: ClusterNetworkPolicy
  metadata: {name: p}
  spec:
    tier: Admin
    priority: 1
    subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}}
    ingress:
    - {action: Accept, from: [{namespaces: {matchLabels: {team: red}}}], protocols: [{destinationNamedPort: http}]}
    - {action: Deny, from: [{namespaces: {}}]}
"#,
        &[
            "b/client a/web TCP/8080 allowed",
            "a/db a/web TCP/8080 cut",
            "b/client a/web TCP/9090 cut",
            "192.0.2.1 a/web TCP/9090 allowed",
        ],
    );
}

#[test]
fn invalid_policies_name_the_field() {
    for (yaml, want) in [
        (
            "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: x, namespace: a}, spec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}}",
            "spec.ingress[0].from[0].ipBlock.cidr",
        ),
        (
            "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: x, namespace: a}, spec: {podSelector: {}, egress: [{ports: [{port: 70000}]}]}}",
            "spec.egress[0].ports[0].port: 70000 is not a port",
        ),
        (
            "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: x, namespace: a}, spec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/8]}}]}]}}",
            "is not inside the block's cidr",
        ),
        (
            "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: x, namespace: a}, spec: {podSelector: {}, ingress: [{ports: [{protocol: ICMP}]}]}}",
            "spec.ingress[0].ports[0].protocol",
        ),
        (
            "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: x, namespace: a}, spec: {podSelector: {}, ingress: [{ports: {port: 80}}]}}",
            "spec.ingress[0].ports",
        ),
        (
            "{apiVersion: cilium.io/v2, kind: CiliumNetworkPolicy, metadata: {name: x, namespace: a}, spec: {endpointSelector: {}, egress: [{toEntities: [internet]}]}}",
            "spec.egress[0].toEntities[0]: `internet` is not a Cilium entity",
        ),
        (
            "{apiVersion: projectcalico.org/v3, kind: NetworkPolicy, metadata: {name: x, namespace: a}, spec: {selector: \"app = 'x'\"}}",
            "spec.selector",
        ),
        (
            "{apiVersion: projectcalico.org/v3, kind: NetworkPolicy, metadata: {name: x, namespace: a}, spec: {egress: [{action: Accept}]}}",
            "spec.egress[0].action: `Accept` is not Allow",
        ),
        (
            "{apiVersion: policy.networking.k8s.io/v1alpha2, kind: ClusterNetworkPolicy, metadata: {name: x}, spec: {tier: Middle, priority: 1, subject: {namespaces: {}}}}",
            "spec.tier: `Middle`",
        ),
        (
            "{apiVersion: policy.networking.k8s.io/v1alpha1, kind: AdminNetworkPolicy, metadata: {name: x}, spec: {}}",
            "cannot evaluate",
        ),
    ] {
        let err = super::from_documents(docs(yaml)).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(want), "{yaml}\n  => {msg}");
    }
}
