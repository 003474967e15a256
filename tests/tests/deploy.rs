//! deploy/ is generated: the committed bundle must equal `netaudit manifests`' output, and every
//! object in it must be its API type (lossless round trip through k8s-openapi).

use netaudit::agent::manifests::{Options, bundle_yaml, typed};
use netaudit_tests::fixtures;

#[test]
fn the_committed_bundle_is_the_generators_output() {
    let path = fixtures().join("../../deploy/netaudit.yaml");
    let committed = std::fs::read_to_string(&path).unwrap();
    let generated = bundle_yaml(&Options::default()).unwrap();
    assert!(
        committed == generated,
        "deploy/netaudit.yaml is out of date: regenerate it with `target/release/netaudit manifests > deploy/netaudit.yaml`"
    );
    let docs = netaudit::input::parse_values(&committed).unwrap();
    assert_eq!(docs.len(), 7);
    for d in docs {
        let kind = d["kind"].as_str().unwrap().to_string();
        let checked = match kind.as_str() {
            "Namespace" => typed::<k8s_openapi::api::core::v1::Namespace>(d),
            "ServiceAccount" => typed::<k8s_openapi::api::core::v1::ServiceAccount>(d),
            "ClusterRole" => typed::<k8s_openapi::api::rbac::v1::ClusterRole>(d),
            "ClusterRoleBinding" => typed::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>(d),
            "CustomResourceDefinition" => {
                typed::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>(d)
            }
            "DaemonSet" => typed::<k8s_openapi::api::apps::v1::DaemonSet>(d),
            "NetworkPolicy" => typed::<k8s_openapi::api::networking::v1::NetworkPolicy>(d),
            other => panic!("unexpected kind {other} in the bundle"),
        };
        checked.unwrap_or_else(|e| panic!("{kind}: {e:#}"));
    }
    assert!(fixtures().join("../../deploy/Containerfile").is_file());
}
