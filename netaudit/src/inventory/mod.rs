//! The cluster as netaudit sees it: Namespaces, Pods, Services, EndpointSlices and Nodes read
//! with the k8s-openapi types (from `kubectl get … -o yaml`, a YAML stream or JSON; live from
//! watches in the agent), indexed for the questions the evaluator asks: who has this IP, which Service
//! owns this ClusterIP, which backends serve it, which port a name means.

mod objects;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::Path,
    sync::Arc,
};

use k8s_openapi::{
    api::{core::v1::Namespace, discovery::v1::EndpointSlice},
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::{
    error::InputError,
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
    /// Shared: a workload's replicas carry the same labels, and the agent holds every pod.
    pub labels: std::sync::Arc<Labels>,
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

/// One EndpointSlice of a Service: its ports (by name) and ready addresses.
#[derive(Clone, Debug)]
pub struct SliceInfo {
    pub namespace: String,
    pub service: String,
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
    pub namespaces: BTreeMap<String, Arc<NamespaceInfo>>,
    pub pods: Vec<Arc<PodInfo>>,
    pub services: Vec<Arc<ServiceInfo>>,
    pub nodes: Vec<Arc<NodeInfo>>,
    slices: HashMap<(String, String), Vec<Arc<SliceInfo>>>,
    pod_by_ip: HashMap<IpAddr, usize>,
    service_by_ip: HashMap<IpAddr, usize>,
    node_by_ip: HashMap<IpAddr, usize>,
    /// Per Service (same index as `services`): its EndpointSlices.
    slices_of_service: Vec<Vec<Arc<SliceInfo>>>,
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

    // Objects already read (the agent's stores share them with every inventory it builds).

    pub fn add_namespace(&mut self, ns: Arc<NamespaceInfo>) {
        self.0.namespaces.insert(ns.name.clone(), ns);
    }

    pub fn add_pod(&mut self, pod: Arc<PodInfo>) {
        self.0.pods.push(pod);
    }

    pub fn add_service(&mut self, svc: Arc<ServiceInfo>) {
        self.0.services.push(svc);
    }

    pub fn add_node(&mut self, node: Arc<NodeInfo>) {
        self.0.nodes.push(node);
    }

    pub fn add_slice(&mut self, slice: Arc<SliceInfo>) {
        self.0.add_slice_info(slice);
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
                ("v1", "Pod") => self.pods.push(Arc::new(PodInfo::from_api(doc.parse()?).map_err(|e| doc.error(e))?)),
                ("v1", "Service") => {
                    self.services.push(Arc::new(ServiceInfo::from_api(doc.parse()?).map_err(|e| doc.error(e))?))
                }
                ("v1", "Node") => {
                    self.nodes.push(Arc::new(NodeInfo::from_api(doc.parse()?).map_err(|e| doc.error(e))?))
                }
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
        self.add_namespace_info(NamespaceInfo::from_api(ns));
    }

    fn add_namespace_info(&mut self, ns: NamespaceInfo) {
        self.namespaces.insert(ns.name.clone(), Arc::new(ns));
    }

    fn add_slice(&mut self, doc: &Document, slice: EndpointSlice) -> Result<(), InputError> {
        match SliceInfo::from_api(slice).map_err(|e| doc.error(e))? {
            Some(s) => self.add_slice_info(Arc::new(s)),
            None => self.notes.push(format!(
                "{}: {} has no kubernetes.io/service-name label; not tied to a Service",
                doc.origin,
                doc.describe()
            )),
        }
        Ok(())
    }

    fn add_slice_info(&mut self, s: Arc<SliceInfo>) {
        self.slices.entry((s.namespace.clone(), s.service.clone())).or_default().push(s);
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
        self.pod_by_ip.get(&ip).map(|&i| &*self.pods[i])
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodInfo> {
        self.pods.iter().find(|p| p.namespace == namespace && p.name == name).map(|p| &**p)
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.name == name).map(|n| &**n)
    }

    pub fn namespace_labels(&self, ns: &str) -> Option<&Labels> {
        self.namespaces.get(ns).map(|n| &n.labels)
    }

    pub fn service_by_cluster_ip(&self, ip: IpAddr) -> Option<&ServiceInfo> {
        self.service_by_ip.get(&ip).map(|&i| &*self.services[i])
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&ServiceInfo> {
        self.services.iter().find(|s| s.namespace == namespace && s.name == name).map(|s| &**s)
    }

    /// The ready backends of `svc`'s port: EndpointSlice addresses with the slice port of the
    /// same name (the target port, resolved by the endpoints controller).
    pub fn backends(&self, svc: &ServiceInfo, port: &ServicePort) -> Vec<Backend> {
        let mut out = Vec::new();
        let index = self.services.iter().position(|s| std::ptr::eq(&**s, svc));
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
        // Each address once: a drain holds many flows per peer.
        let mut known: foldhash::HashMap<IpAddr, Option<Arc<Identity>>> = Default::default();
        let mut identify = |ip: IpAddr| known.entry(ip).or_insert_with(|| self.identify(ip).map(Arc::new)).clone();
        for f in &mut file.flows {
            f.src.identity = identify(f.src.ip);
            f.dst.identity = identify(f.dst.ip);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty() && self.nodes.is_empty() && self.services.is_empty()
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
