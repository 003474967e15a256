//! From the API's objects to the inventory's slim ones: only what the questions need (who has
//! an address, which Service fronts which backends, which port a name means). The agent keeps
//! these, not the API objects.

use std::net::IpAddr;

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};

use super::{
    ContainerPort, NAMESPACE_NAME_LABEL, NamespaceInfo, NodeInfo, PodInfo, ServiceInfo, ServicePort, SliceInfo,
};
use crate::{error::FieldError, k8s::parse_protocol};

impl NamespaceInfo {
    pub fn from_api(ns: Namespace) -> NamespaceInfo {
        let name = ns.metadata.name.unwrap_or_default();
        let mut labels = ns.metadata.labels.unwrap_or_default();
        labels.entry(NAMESPACE_NAME_LABEL.to_string()).or_insert_with(|| name.clone());
        NamespaceInfo { name, labels }
    }
}

impl PodInfo {
    pub fn from_api(pod: Pod) -> Result<PodInfo, FieldError> {
        let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let spec = pod.spec.unwrap_or_default();
        let status = pod.status.unwrap_or_default();
        let mut ips = Vec::new();
        let listed = status.pod_ips.unwrap_or_default().into_iter().map(|p| p.ip);
        for (i, ip) in status.pod_ip.into_iter().chain(listed).enumerate() {
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| FieldError::new(format!("status.podIPs[{i}]"), format!("`{ip}` is not an IP address")))?;
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
                    e.within(&at())
                })?;
                let protocol =
                    parse_protocol(p.protocol.as_deref()).map_err(|e| e.within(&format!("{}.protocol", at())))?;
                ports.push(ContainerPort { name: p.name.clone(), port, protocol });
            }
        }
        Ok(PodInfo {
            namespace,
            name,
            labels: std::sync::Arc::new(pod.metadata.labels.unwrap_or_default()),
            ips,
            node_name: spec.node_name,
            host_network: spec.host_network.unwrap_or(false),
            service_account: spec.service_account_name,
            ports,
        })
    }
}

impl ServiceInfo {
    pub fn from_api(svc: Service) -> Result<ServiceInfo, FieldError> {
        let spec = svc.spec.unwrap_or_default();
        let mut cluster_ips = Vec::new();
        for ip in spec.cluster_ip.into_iter().chain(spec.cluster_ips.into_iter().flatten()) {
            if ip.is_empty() || ip == "None" {
                continue;
            }
            let ip: IpAddr =
                ip.parse().map_err(|_| FieldError::new("spec.clusterIPs", format!("`{ip}` is not an IP address")))?;
            if !cluster_ips.contains(&ip) {
                cluster_ips.push(ip);
            }
        }
        let mut ports = Vec::new();
        for (i, p) in spec.ports.into_iter().flatten().enumerate() {
            let at = format!("spec.ports[{i}]");
            let port = u16::try_from(p.port)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| FieldError::new(format!("{at}.port"), format!("{} is not a port (1-65535)", p.port)))?;
            let protocol = parse_protocol(p.protocol.as_deref()).map_err(|e| e.within(&format!("{at}.protocol")))?;
            ports.push(ServicePort { name: p.name, port, protocol, target_port: p.target_port });
        }
        Ok(ServiceInfo {
            namespace: svc.metadata.namespace.unwrap_or_else(|| "default".into()),
            name: svc.metadata.name.unwrap_or_default(),
            cluster_ips,
            ports,
            selector: spec.selector,
        })
    }
}

impl NodeInfo {
    pub fn from_api(node: Node) -> Result<NodeInfo, FieldError> {
        let mut addresses = Vec::new();
        for (i, a) in node.status.and_then(|s| s.addresses).into_iter().flatten().enumerate() {
            if a.type_ != "InternalIP" && a.type_ != "ExternalIP" {
                continue;
            }
            let ip: IpAddr = a.address.parse().map_err(|_| {
                let at = format!("status.addresses[{i}].address");
                FieldError::new(at, format!("`{}` is not an IP address", a.address))
            })?;
            addresses.push(ip);
        }
        Ok(NodeInfo {
            name: node.metadata.name.unwrap_or_default(),
            labels: node.metadata.labels.unwrap_or_default(),
            addresses,
        })
    }
}

impl SliceInfo {
    /// None for a slice without its Service's name label: it belongs to no Service.
    pub fn from_api(slice: EndpointSlice) -> Result<Option<SliceInfo>, FieldError> {
        let labels = slice.metadata.labels.unwrap_or_default();
        let Some(service) = labels.get("kubernetes.io/service-name") else {
            return Ok(None);
        };
        let namespace = slice.metadata.namespace.unwrap_or_else(|| "default".into());
        let mut ports = Vec::new();
        for (i, p) in slice.ports.into_iter().flatten().enumerate() {
            let at = format!("ports[{i}]");
            let Some(port) = p.port else { continue };
            let port = u16::try_from(port)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| FieldError::new(format!("{at}.port"), format!("{port} is not a port (1-65535)")))?;
            let protocol = parse_protocol(p.protocol.as_deref()).map_err(|e| e.within(&format!("{at}.protocol")))?;
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
                    FieldError::new(at, format!("`{a}` is not an IP address"))
                })?;
                addresses.push(ip);
            }
        }
        Ok(Some(SliceInfo { namespace, service: service.clone(), ports, addresses }))
    }
}
