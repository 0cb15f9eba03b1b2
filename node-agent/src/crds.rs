//! keyway's CustomResourceDefinitions, generated from the same Rust types that read the
//! resources, so the schema the API server enforces and the one the agent parses cannot drift
//! apart. `manifests/base/crds.yaml` is this module's output, pinned by a test.
//!
//! OverlayAttachment is not among them: it is the `file` source's stand-in for the pod annotation
//! (`keyway.io/overlay`) through which agents publish pods' overlay addresses on a cluster.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::model::{
    ClusterConfigResource, DirectPathResource, ExternalEntityResource, OverlayBlockResource,
    OverlayNetworkResource,
};

/// Every CRD keyway installs, in name order.
pub fn all() -> Vec<CustomResourceDefinition> {
    let mut v = vec![
        ClusterConfigResource::crd(),
        DirectPathResource::crd(),
        ExternalEntityResource::crd(),
        OverlayBlockResource::crd(),
        OverlayNetworkResource::crd(),
    ];
    v.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    v
}

/// The CRDs as one multi-document YAML file.
pub fn render_yaml() -> String {
    let mut out = String::from(
        "# Generated from node-agent/src/model/resources.rs by node-agent/src/crds.rs; do not edit.\n\
         # Regenerate: UPDATE_MANIFESTS=1 cargo test -p keyway-agent --lib crds\n",
    );
    for crd in all() {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&crd).expect("a CRD serializes"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn crds_yaml_matches_the_types() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/base/crds.yaml");
        let want = render_yaml();
        if std::env::var_os("UPDATE_MANIFESTS").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let got = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            got == want,
            "manifests/base/crds.yaml is not what the types generate; run UPDATE_MANIFESTS=1 cargo test -p keyway-agent --lib crds"
        );
    }

    #[test]
    fn each_crd_is_in_keyway_io_with_its_scope() {
        let scopes: Vec<(String, String)> = all()
            .into_iter()
            .map(|c| (c.spec.names.kind, c.spec.scope))
            .collect();
        assert_eq!(
            scopes,
            [
                ("ClusterConfig", "Cluster"),
                ("DirectPath", "Namespaced"),
                ("ExternalEntity", "Namespaced"),
                ("OverlayBlock", "Cluster"),
                ("OverlayNetwork", "Cluster"),
            ]
            .map(|(k, s)| (k.to_string(), s.to_string()))
        );
        for c in all() {
            assert_eq!(c.spec.group, "keyway.io");
            assert_eq!(c.spec.versions[0].name, "v1alpha1");
        }
    }
}
