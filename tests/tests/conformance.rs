//! The upstream NetworkPolicy conformance cases (`../shared/conformance/netpol`, 59 cases from the
//! Kubernetes e2e suite and cyclonus): every expected verdict, reported per case so a regression
//! names the scenario it broke. The corpus is read in place, never copied into this repository.

use std::{net::IpAddr, path::PathBuf};

use netaudit::{
    inventory::{Inventory, Owner},
    model::Protocol,
    policy::{
        self,
        evaluate::{Conn, Evaluator},
    },
    resolve::Party,
};

fn corpus() -> PathBuf {
    match std::env::var_os("NETAUDIT_CONFORMANCE") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance/netpol"),
    }
}

#[derive(serde::Deserialize)]
struct Expected {
    src: String,
    dst: String,
    protocol: String,
    port: u16,
    allowed: bool,
}

fn endpoint<'a>(inv: &'a Inventory, s: &str) -> Party<'a> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Party { ip, owner: inv.owner(ip), names: &[] };
    }
    let (ns, name) = s.split_once('/').expect("ns/pod");
    let pod = inv.pod(ns, name).unwrap_or_else(|| panic!("pod {s} not in objects.yaml"));
    Party { ip: pod.ips[0], owner: Owner::Pod(pod), names: &[] }
}

#[test]
fn upstream_networkpolicy_cases() {
    let root = corpus();
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("conformance corpus {} is missing ({e}); set NETAUDIT_CONFORMANCE", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("expected.json").is_file())
        .collect();
    cases.sort();
    assert!(cases.len() >= 59, "expected the 59 upstream cases, found {}", cases.len());
    let mut failed_cases = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let (inv, rest) = Inventory::load(&case.join("objects.yaml")).unwrap();
        let (policies, rest) = policy::from_documents(rest).unwrap();
        assert!(rest.is_empty(), "{name}: unread objects");
        let ev = Evaluator::new(&inv, &policies);
        let expected: Vec<Expected> =
            serde_json::from_str(&std::fs::read_to_string(case.join("expected.json")).unwrap()).unwrap();
        let mut failures = Vec::new();
        for e in &expected {
            let conn = Conn {
                protocol: e.protocol.parse::<Protocol>().unwrap(),
                src: endpoint(&inv, &e.src),
                dst: endpoint(&inv, &e.dst),
                port: Some(e.port),
            };
            let v = ev.judge(&conn);
            if v.allowed != e.allowed {
                let why: Vec<_> = v.sides.iter().map(|s| s.reason.clone()).collect();
                failures.push(format!(
                    "  {} -> {} {}/{}: expected {}, got {} ({})",
                    e.src,
                    e.dst,
                    e.protocol,
                    e.port,
                    e.allowed,
                    v.allowed,
                    why.join("; ")
                ));
            }
        }
        println!("{name}: {}/{} pass", expected.len() - failures.len(), expected.len());
        if !failures.is_empty() {
            println!("{}", failures.join("\n"));
            failed_cases.push(name);
        }
    }
    assert!(failed_cases.is_empty(), "{} of {} cases failed: {failed_cases:?}", failed_cases.len(), cases.len());
}
