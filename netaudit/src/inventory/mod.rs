//! The cluster as netaudit sees it: Namespaces, Pods, Services, EndpointSlices and Nodes read
//! with the k8s-openapi types (from `kubectl get … -o yaml`, a YAML stream or JSON; live from
//! watches in the agent), indexed for the questions the evaluator asks: who has this IP, which Service
//! owns this ClusterIP, which backends serve it, which port a name means.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::Path,
};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::{
    error::{FieldError, InputError},
    input::Document,
    model::{FlowFile, Identity, IdentityKind, Protocol},
};

pub type Labels = BTreeMap<String, String>;

/// The label every namespace carries with its own name (set by the API server since 1.21).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Clone, Debug)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: Labels,
}

#[derive(Clone, Debug)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    pub node_name: Option<String>,
    pub host_network: bool,
    pub service_account: Option<String>,
    pub ports: Vec<ContainerPort>,
}

impl PodInfo {
    /// The container port a named port means for `protocol` (none: the name matches nothing).
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports.iter().find(|p| p.name.as_deref() == Some(name) && p.protocol == protocol).map(|p| p.port)
    }

    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub name: String,
    pub labels: Labels,
    pub addresses: Vec<IpAddr>,
}

#[derive(Clone, Debug)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
    pub target_port: Option<IntOrString>,
}

#[derive(Clone, Debug)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub selector: Option<Labels>,
}

impl ServiceInfo {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug)]
struct SliceInfo {
    ports: Vec<(Option<String>, u16, Protocol)>,
    addresses: Vec<IpAddr>,
}

/// A Service backend: where the dataplane really sends a ClusterIP connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub ip: IpAddr,
    pub port: u16,
}

/// The inventory. Policies found beside the objects are returned by [`Inventory::load`]
/// separately; kinds it does not know are skipped with a note.
#[derive(Debug, Default)]
pub struct Inventory {
    pub namespaces: BTreeMap<String, NamespaceInfo>,
    pub pods: Vec<PodInfo>,
    pub services: Vec<ServiceInfo>,
    pub nodes: Vec<NodeInfo>,
    slices: HashMap<(String, String), Vec<SliceInfo>>,
    pod_by_ip: HashMap<IpAddr, usize>,
    service_by_ip: HashMap<IpAddr, usize>,
    node_by_ip: HashMap<IpAddr, usize>,
    /// Per Service (same index as `services`): its EndpointSlices.
    slices_of_service: Vec<Vec<SliceInfo>>,
    /// The apiserver's ClusterIPs and endpoint addresses.
    apiserver_ips: std::collections::HashSet<IpAddr>,
    /// What was skipped and why (unknown kinds), for the user's information.
    pub notes: Vec<String>,
}

/// Who owns an address.
/// Collects objects for an [`Inventory`]; [`InventoryBuilder::build`] indexes them, so no
/// inventory is ever asked a question before its indexes exist.
#[derive(Debug)]
pub struct InventoryBuilder(Inventory);

impl InventoryBuilder {
    /// Adds the inventory kinds among `docs`; returns the others. On error nothing of the failing
    /// document was added.
    pub fn add_documents(&mut self, docs: Vec<Document>) -> Result<Vec<Document>, InputError> {
        self.0.add_documents(docs)
    }

    pub fn build(mut self) -> Inventory {
        self.0.index();
        self.0
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Owner<'a> {
    Pod(&'a PodInfo),
    Node(&'a NodeInfo),
    /// Neither a pod nor a node in the inventory: outside the cluster, or unknown.
    External,
}

/// The Service the apiserver is published as.
pub const APISERVER_SERVICE: (&str, &str) = ("default", "kubernetes");

impl Inventory {
    /// Reads an inventory file. Returns the inventory and the documents it did not consume (for
    /// the policy loader).
    pub fn load(path: &Path) -> Result<(Inventory, Vec<Document>), InputError> {
        Inventory::from_documents(crate::input::read_objects(path)?)
    }

    /// The inventory of `docs`; returns it and the documents that are not inventory kinds.
    pub fn from_documents(docs: Vec<Document>) -> Result<(Inventory, Vec<Document>), InputError> {
        let mut b = Inventory::builder();
        let rest = b.add_documents(docs)?;
        Ok((b.build(), rest))
    }

    /// An inventory built object by object (the agent adds what it can read, skipping the rest).
    pub fn builder() -> InventoryBuilder {
        InventoryBuilder(Inventory::default())
    }

    /// Adds the inventory kinds among `docs`; returns the others.
    fn add_documents(&mut self, docs: Vec<Document>) -> Result<Vec<Document>, InputError> {
        let mut rest = Vec::new();
        for doc in docs {
            match (doc.api_version(), doc.kind()) {
                ("v1", "Namespace") => self.add_namespace(doc.parse()?),
                ("v1", "Pod") => self.add_pod(&doc, doc.parse()?)?,
                ("v1", "Service") => self.add_service(&doc, doc.parse()?)?,
                ("v1", "Node") => self.add_node(&doc, doc.parse()?)?,
                ("discovery.k8s.io/v1", "EndpointSlice") => self.add_slice(&doc, doc.parse()?)?,
                _ => rest.push(doc),
            }
        }
        Ok(rest)
    }

    pub fn note_skipped(&mut self, doc: &Document) {
        self.notes.push(format!(
            "{}: skipped {} ({}): not a kind netaudit reads",
            doc.origin,
            doc.describe(),
            doc.api_version()
        ));
    }

    fn add_namespace(&mut self, ns: Namespace) {
        let name = ns.metadata.name.unwrap_or_default();
        let mut labels = ns.metadata.labels.unwrap_or_default();
        labels.entry(NAMESPACE_NAME_LABEL.to_string()).or_insert_with(|| name.clone());
        self.namespaces.insert(name.clone(), NamespaceInfo { name, labels });
    }

    fn add_pod(&mut self, doc: &Document, pod: Pod) -> Result<(), InputError> {
        let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let spec = pod.spec.unwrap_or_default();
        let status = pod.status.unwrap_or_default();
        let mut ips = Vec::new();
        let listed = status.pod_ips.unwrap_or_default().into_iter().map(|p| p.ip);
        for (i, ip) in status.pod_ip.into_iter().chain(listed).enumerate() {
            let ip: IpAddr = ip.parse().map_err(|_| {
                doc.error(FieldError::new(format!("status.podIPs[{i}]"), format!("`{ip}` is not an IP address")))
            })?;
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        let mut ports = Vec::new();
        for (ci, c) in spec.containers.iter().chain(spec.init_containers.iter().flatten()).enumerate() {
            for (pi, p) in c.ports.iter().flatten().enumerate() {
                let at = || format!("spec.containers[{ci}].ports[{pi}]");
                let port = u16::try_from(p.container_port).ok().filter(|p| *p > 0).ok_or_else(|| {
                    let e = FieldError::new("containerPort", format!("{} is not a port (1-65535)", p.container_port));
                    doc.error(e.within(&at()))
                })?;
                let protocol = parse_protocol(p.protocol.as_deref())
                    .map_err(|e| doc.error(e.within(&format!("{}.protocol", at()))))?;
                ports.push(ContainerPort { name: p.name.clone(), port, protocol });
            }
        }
        self.pods.push(PodInfo {
            namespace,
            name,
            labels: pod.metadata.labels.unwrap_or_default(),
            ips,
            node_name: spec.node_name,
            host_network: spec.host_network.unwrap_or(false),
            service_account: spec.service_account_name,
            ports,
        });
        Ok(())
    }

    fn add_service(&mut self, doc: &Document, svc: Service) -> Result<(), InputError> {
        let spec = svc.spec.unwrap_or_default();
        let mut cluster_ips = Vec::new();
        for ip in spec.cluster_ip.into_iter().chain(spec.cluster_ips.into_iter().flatten()) {
            if ip.is_empty() || ip == "None" {
                continue;
            }
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| doc.error(FieldError::new("spec.clusterIPs", format!("`{ip}` is not an IP address"))))?;
            if !cluster_ips.contains(&ip) {
                cluster_ips.push(ip);
            }
        }
        let mut ports = Vec::new();
        for (i, p) in spec.ports.into_iter().flatten().enumerate() {
            let at = format!("spec.ports[{i}]");
            let port = u16::try_from(p.port).ok().filter(|p| *p > 0).ok_or_else(|| {
                doc.error(FieldError::new(format!("{at}.port"), format!("{} is not a port (1-65535)", p.port)))
            })?;
            let protocol =
                parse_protocol(p.protocol.as_deref()).map_err(|e| doc.error(e.within(&format!("{at}.protocol"))))?;
            ports.push(ServicePort { name: p.name, port, protocol, target_port: p.target_port });
        }
        self.services.push(ServiceInfo {
            namespace: svc.metadata.namespace.unwrap_or_else(|| "default".into()),
            name: svc.metadata.name.unwrap_or_default(),
            cluster_ips,
            ports,
            selector: spec.selector,
        });
        Ok(())
    }

    fn add_node(&mut self, doc: &Document, node: Node) -> Result<(), InputError> {
        let mut addresses = Vec::new();
        for (i, a) in node.status.and_then(|s| s.addresses).into_iter().flatten().enumerate() {
            if a.type_ != "InternalIP" && a.type_ != "ExternalIP" {
                continue;
            }
            let ip: IpAddr = a.address.parse().map_err(|_| {
                let at = format!("status.addresses[{i}].address");
                doc.error(FieldError::new(at, format!("`{}` is not an IP address", a.address)))
            })?;
            addresses.push(ip);
        }
        self.nodes.push(NodeInfo {
            name: node.metadata.name.unwrap_or_default(),
            labels: node.metadata.labels.unwrap_or_default(),
            addresses,
        });
        Ok(())
    }

    fn add_slice(&mut self, doc: &Document, slice: EndpointSlice) -> Result<(), InputError> {
        let labels = slice.metadata.labels.unwrap_or_default();
        let Some(service) = labels.get("kubernetes.io/service-name") else {
            self.notes.push(format!(
                "{}: {} has no kubernetes.io/service-name label; not tied to a Service",
                doc.origin,
                doc.describe()
            ));
            return Ok(());
        };
        let namespace = slice.metadata.namespace.unwrap_or_else(|| "default".into());
        let mut ports = Vec::new();
        for (i, p) in slice.ports.into_iter().flatten().enumerate() {
            let at = format!("ports[{i}]");
            let Some(port) = p.port else { continue };
            let port = u16::try_from(port).ok().filter(|p| *p > 0).ok_or_else(|| {
                doc.error(FieldError::new(format!("{at}.port"), format!("{port} is not a port (1-65535)")))
            })?;
            let protocol =
                parse_protocol(p.protocol.as_deref()).map_err(|e| doc.error(e.within(&format!("{at}.protocol"))))?;
            ports.push((p.name.filter(|n| !n.is_empty()), port, protocol));
        }
        let mut addresses = Vec::new();
        for (i, e) in slice.endpoints.iter().flatten().enumerate() {
            // Not-ready endpoints receive no Service traffic.
            if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            for a in &e.addresses {
                let ip: IpAddr = a.parse().map_err(|_| {
                    let at = format!("endpoints[{i}].addresses");
                    doc.error(FieldError::new(at, format!("`{a}` is not an IP address")))
                })?;
                addresses.push(ip);
            }
        }
        self.slices.entry((namespace, service.clone())).or_default().push(SliceInfo { ports, addresses });
        Ok(())
    }

    /// Builds the lookup indexes. Host-network pods share their node's address: that address is
    /// the node's (policies see node traffic there, not a pod).
    fn index(&mut self) {
        self.pod_by_ip.clear();
        self.service_by_ip.clear();
        self.node_by_ip.clear();
        for (i, n) in self.nodes.iter().enumerate() {
            for ip in &n.addresses {
                self.node_by_ip.insert(*ip, i);
            }
        }
        for (i, p) in self.pods.iter().enumerate() {
            if p.host_network {
                continue;
            }
            for ip in &p.ips {
                self.pod_by_ip.insert(*ip, i);
            }
        }
        for (i, s) in self.services.iter().enumerate() {
            for ip in &s.cluster_ips {
                self.service_by_ip.insert(*ip, i);
            }
        }
        self.slices_of_service = self
            .services
            .iter()
            .map(|s| self.slices.get(&(s.namespace.clone(), s.name.clone())).cloned().unwrap_or_default())
            .collect();
        let (ns, name) = APISERVER_SERVICE;
        self.apiserver_ips = self
            .slices
            .get(&(ns.to_string(), name.to_string()))
            .into_iter()
            .flatten()
            .flat_map(|s| s.addresses.iter().copied())
            .chain(self.service(ns, name).into_iter().flat_map(|s| s.cluster_ips.iter().copied()))
            .collect();
    }

    pub fn owner(&self, ip: IpAddr) -> Owner<'_> {
        if let Some(&i) = self.pod_by_ip.get(&ip) {
            Owner::Pod(&self.pods[i])
        } else if let Some(&i) = self.node_by_ip.get(&ip) {
            Owner::Node(&self.nodes[i])
        } else {
            Owner::External
        }
    }

    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&PodInfo> {
        self.pod_by_ip.get(&ip).map(|&i| &self.pods[i])
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodInfo> {
        self.pods.iter().find(|p| p.namespace == namespace && p.name == name)
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn namespace_labels(&self, ns: &str) -> Option<&Labels> {
        self.namespaces.get(ns).map(|n| &n.labels)
    }

    pub fn service_by_cluster_ip(&self, ip: IpAddr) -> Option<&ServiceInfo> {
        self.service_by_ip.get(&ip).map(|&i| &self.services[i])
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&ServiceInfo> {
        self.services.iter().find(|s| s.namespace == namespace && s.name == name)
    }

    /// The ready backends of `svc`'s port: EndpointSlice addresses with the slice port of the
    /// same name (the target port, resolved by the endpoints controller).
    pub fn backends(&self, svc: &ServiceInfo, port: &ServicePort) -> Vec<Backend> {
        let mut out = Vec::new();
        let index = self.services.iter().position(|s| std::ptr::eq(s, svc));
        let slices = match index {
            Some(i) => self.slices_of_service.get(i),
            None => self.slices.get(&(svc.namespace.clone(), svc.name.clone())),
        };
        for slice in slices.into_iter().flatten() {
            let Some(&(_, bport, _)) =
                slice.ports.iter().find(|(name, _, proto)| *name == port.name && *proto == port.protocol)
            else {
                continue;
            };
            for ip in &slice.addresses {
                let b = Backend { ip: *ip, port: bport };
                if !out.contains(&b) {
                    out.push(b);
                }
            }
        }
        out
    }

    /// Addresses that are the apiserver: the endpoints of `default/kubernetes`.
    pub fn is_apiserver(&self, ip: IpAddr) -> bool {
        self.apiserver_ips.contains(&ip)
    }

    pub fn apiserver_endpoints(&self) -> Vec<Backend> {
        let (ns, name) = APISERVER_SERVICE;
        match self.service(ns, name) {
            Some(svc) => svc.ports.iter().flat_map(|p| self.backends(svc, p)).collect(),
            None => Vec::new(),
        }
    }

    /// Who `ip` is in the cluster: the apiserver, a Service's ClusterIP, a pod or a node.
    pub fn identify(&self, ip: IpAddr) -> Option<Identity> {
        let id = |kind, namespace: Option<&str>, name: &str, labels: &Labels, node: Option<&String>| Identity {
            kind,
            namespace: namespace.map(str::to_string),
            name: name.to_string(),
            labels: labels.clone(),
            node: node.cloned(),
        };
        if let Some(svc) = self.service_by_cluster_ip(ip) {
            let kind = if self.is_apiserver(ip) { IdentityKind::Apiserver } else { IdentityKind::Service };
            return Some(id(kind, Some(&svc.namespace), &svc.name, &Labels::new(), None));
        }
        if self.is_apiserver(ip) {
            let (ns, name) = APISERVER_SERVICE;
            return Some(id(IdentityKind::Apiserver, Some(ns), name, &Labels::new(), None));
        }
        match self.owner(ip) {
            Owner::Pod(p) => Some(id(IdentityKind::Pod, Some(&p.namespace), &p.name, &p.labels, p.node_name.as_ref())),
            Owner::Node(n) => Some(id(IdentityKind::Node, None, &n.name, &Labels::new(), None)),
            Owner::External => None,
        }
    }

    /// Sets the identity of both ends of every flow (cleared where the address is unknown now).
    pub fn enrich(&self, file: &mut FlowFile) {
        for f in &mut file.flows {
            f.src.identity = self.identify(f.src.ip);
            f.dst.identity = self.identify(f.dst.ip);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty() && self.nodes.is_empty() && self.services.is_empty()
    }
}

/// Parses a Kubernetes protocol name (absent means TCP, as the API defaults it).
pub fn parse_protocol(p: Option<&str>) -> Result<Protocol, FieldError> {
    match p {
        None => Ok(Protocol::Tcp),
        Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => {
            Err(FieldError::whole(format!("`{other}` is not a protocol Kubernetes accepts (TCP, UDP or SCTP)")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Inventory {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("inv.yaml");
        std::fs::write(&p, text).unwrap();
        Inventory::load(&p).unwrap().0
    }

    const CLUSTER: &str = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: kubernetes, namespace: default}
  spec: {clusterIP: 10.96.0.1, ports: [{name: https, port: 443, targetPort: 6443}]}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: kubernetes, namespace: default, labels: {kubernetes.io/service-name: kubernetes}}
  addressType: IPv4
  endpoints: [{addresses: [172.18.0.2]}]
  ports: [{name: https, port: 6443, protocol: TCP}]
- apiVersion: v1
  kind: Node
  metadata: {name: cp}
  status: {addresses: [{type: InternalIP, address: 172.18.0.2}, {type: Hostname, address: cp}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: web, namespace: app, labels: {app: web}}
  spec:
    nodeName: cp
    containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]
  status: {podIP: 10.244.0.5, podIPs: [{ip: 10.244.0.5}, {ip: "fd00::5"}]}
"#;

    #[test]
    fn indexes_pods_nodes_services_and_backends() {
        let inv = load(CLUSTER);
        assert!(matches!(inv.owner("10.244.0.5".parse().unwrap()), Owner::Pod(p) if p.name == "web"));
        assert!(matches!(inv.owner("fd00::5".parse().unwrap()), Owner::Pod(_)));
        assert!(matches!(inv.owner("172.18.0.2".parse().unwrap()), Owner::Node(n) if n.name == "cp"));
        assert!(matches!(inv.owner("192.0.2.9".parse().unwrap()), Owner::External));
        let svc = inv.service_by_cluster_ip("10.96.0.1".parse().unwrap()).unwrap();
        let b = inv.backends(svc, &svc.ports[0]);
        assert_eq!(b, [Backend { ip: "172.18.0.2".parse().unwrap(), port: 6443 }]);
        assert!(inv.is_apiserver("172.18.0.2".parse().unwrap()));
        let pod = inv.pod_by_ip("10.244.0.5".parse().unwrap()).unwrap();
        assert_eq!(pod.named_port("http", Protocol::Tcp), Some(8080));
        assert_eq!(pod.named_port("http", Protocol::Udp), None);
    }

    #[test]
    fn bad_fields_name_file_object_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("inv.yaml");
        std::fs::write(
            &p,
            "apiVersion: v1\nkind: Pod\nmetadata: {name: x, namespace: ns1}\nstatus: {podIP: 10.0.0.300}\n",
        )
        .unwrap();
        let msg = format!("{:#}", Inventory::load(&p).unwrap_err());
        assert!(msg.contains("inv.yaml") && msg.contains("Pod ns1/x") && msg.contains("status.podIPs"), "{msg}");
        std::fs::write(&p, "apiVersion: v1\nkind: Pod\nmetadata: {name: x, namespace: ns1}\nspec: {containers: 3}\n")
            .unwrap();
        let msg = format!("{:#}", Inventory::load(&p).unwrap_err());
        assert!(msg.contains("Pod ns1/x") && msg.contains("spec.containers"), "{msg}");
    }
}
