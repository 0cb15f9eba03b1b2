//! NetworkPolicy semantics that do not depend on the cluster: labels and selectors, protocols by
//! name, and validation. A policy the API server would refuse is refused here too, with the place
//! of the mistake, so that a bad file never half-applies. The model and the compiler build on this
//! module; it builds on nothing of theirs.

use std::collections::BTreeMap;

use ipnetwork::IpNetwork;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// An object's labels.
pub type Labels = BTreeMap<String, String>;

/// Why a policy (or a part of a document policy reads) is refused: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{place}: {reason}")]
pub struct PolicyError {
    /// Where in the object: `ingress[0].from[1]`, `podSelector`, `protocol`.
    pub place: String,
    pub reason: String,
}

fn refuse(place: &str, reason: impl Into<String>) -> PolicyError {
    PolicyError {
        place: place.to_string(),
        reason: reason.into(),
    }
}

/// The IP protocol number of a protocol as Kubernetes spells it; absent means TCP.
pub fn protocol(name: Option<&str>) -> Result<u8, PolicyError> {
    let name = name.unwrap_or("TCP");
    keyway_core::packet::protocol_number(name)
        .ok_or_else(|| refuse("protocol", format!("{name:?} is not TCP, UDP or SCTP")))
}

/// The name of a protocol [`protocol`] accepts.
pub fn protocol_name(number: u8) -> &'static str {
    keyway_core::packet::protocol_name(number).unwrap_or("TCP")
}

/// Whether `labels` match `selector`: every matchLabels pair and every matchExpressions
/// requirement (In, NotIn, Exists, DoesNotExist). The empty selector matches everything.
pub fn matches(selector: &LabelSelector, labels: &Labels) -> bool {
    if let Some(ml) = &selector.match_labels
        && !ml.iter().all(|(k, v)| labels.get(k) == Some(v))
    {
        return false;
    }
    for e in selector.match_expressions.iter().flatten() {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        let ok = match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            // Refused by validate(); never matches if it slipped through.
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

fn validate_selector(s: &LabelSelector, what: &str) -> Result<(), PolicyError> {
    for e in s.match_expressions.iter().flatten() {
        let n = e.values.as_ref().map_or(0, Vec::len);
        match e.operator.as_str() {
            "In" | "NotIn" if n == 0 => {
                return Err(refuse(
                    what,
                    format!("operator {} on {:?} needs values", e.operator, e.key),
                ));
            }
            "Exists" | "DoesNotExist" if n > 0 => {
                return Err(refuse(
                    what,
                    format!("operator {} on {:?} takes no values", e.operator, e.key),
                ));
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => return Err(refuse(what, format!("unknown operator {other:?}"))),
        }
    }
    Ok(())
}

fn validate_peer(p: &NetworkPolicyPeer, what: &str) -> Result<(), PolicyError> {
    match (&p.ip_block, &p.pod_selector, &p.namespace_selector) {
        (None, None, None) => {
            return Err(refuse(
                what,
                "a peer needs podSelector, namespaceSelector or ipBlock",
            ));
        }
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return Err(refuse(what, "ipBlock cannot be combined with selectors"));
        }
        _ => {}
    }
    if let Some(s) = &p.pod_selector {
        validate_selector(s, what)?;
    }
    if let Some(s) = &p.namespace_selector {
        validate_selector(s, what)?;
    }
    if let Some(b) = &p.ip_block {
        let cidr: IpNetwork = b
            .cidr
            .parse()
            .map_err(|e| refuse(what, format!("ipBlock cidr {:?}: {e}", b.cidr)))?;
        for x in b.except.iter().flatten() {
            let ex: IpNetwork = x
                .parse()
                .map_err(|e| refuse(what, format!("ipBlock except {x:?}: {e}")))?;
            if ex.is_ipv4() != cidr.is_ipv4()
                || !cidr.contains(ex.network())
                || ex.prefix() < cidr.prefix()
            {
                return Err(refuse(what, format!("except {x} is not inside {}", b.cidr)));
            }
        }
    }
    Ok(())
}

fn validate_port(p: &NetworkPolicyPort, what: &str) -> Result<(), PolicyError> {
    protocol(p.protocol.as_deref()).map_err(|e| refuse(what, e.reason))?;
    match (&p.port, p.end_port) {
        (Some(IntOrString::Int(n)), end) => {
            if !(1..=65535).contains(n) {
                return Err(refuse(what, format!("port {n} is outside 1..=65535")));
            }
            if let Some(e) = end
                && (e < *n || e > 65535)
            {
                return Err(refuse(
                    what,
                    format!("endPort {e} must be between port {n} and 65535"),
                ));
            }
        }
        (Some(IntOrString::String(name)), end) => {
            if name.is_empty() {
                return Err(refuse(what, "empty port name"));
            }
            if end.is_some() {
                return Err(refuse(
                    what,
                    format!("endPort needs a numeric port, not {name:?}"),
                ));
            }
        }
        (None, Some(_)) => return Err(refuse(what, "endPort without port")),
        (None, None) => {}
    }
    Ok(())
}

/// Checks a policy as the API server would.
pub fn validate(np: &NetworkPolicy) -> Result<(), PolicyError> {
    let spec = np.spec.as_ref().ok_or_else(|| refuse("spec", "missing"))?;
    validate_selector(
        &spec.pod_selector.clone().unwrap_or_default(),
        "podSelector",
    )?;
    for t in spec.policy_types.iter().flatten() {
        if t != "Ingress" && t != "Egress" {
            return Err(refuse(
                "policyTypes",
                format!("{t:?} is not Ingress or Egress"),
            ));
        }
    }
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        for (j, p) in r.from.iter().flatten().enumerate() {
            validate_peer(p, &format!("ingress[{i}].from[{j}]"))?;
        }
        for (j, p) in r.ports.iter().flatten().enumerate() {
            validate_port(p, &format!("ingress[{i}].ports[{j}]"))?;
        }
    }
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        for (j, p) in r.to.iter().flatten().enumerate() {
            validate_peer(p, &format!("egress[{i}].to[{j}]"))?;
        }
        for (j, p) in r.ports.iter().flatten().enumerate() {
            validate_port(p, &format!("egress[{i}].ports[{j}]"))?;
        }
    }
    Ok(())
}

/// The directions a policy isolates: `policyTypes` when given, else Ingress always and Egress when
/// the policy has egress rules.
pub fn types(np: &NetworkPolicy) -> (bool, bool) {
    let spec = np.spec.as_ref();
    match spec.and_then(|s| s.policy_types.as_ref()) {
        Some(t) => (
            t.iter().any(|x| x == "Ingress"),
            t.iter().any(|x| x == "Egress"),
        ),
        None => (true, spec.is_some_and(|s| s.egress.is_some())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: if values.is_empty() {
                None
            } else {
                Some(values.iter().map(|s| s.to_string()).collect())
            },
        }
    }

    #[test]
    fn selectors_follow_kubernetes() {
        let l = labels(&[("pod", "a"), ("tier", "web")]);
        assert!(matches(&LabelSelector::default(), &l), "empty selects all");
        let ml = LabelSelector {
            match_labels: Some([("pod".to_string(), "a".to_string())].into()),
            ..Default::default()
        };
        assert!(matches(&ml, &l));
        assert!(!matches(&ml, &labels(&[("pod", "b")])));
        let ex = |r| LabelSelector {
            match_expressions: Some(vec![r]),
            ..Default::default()
        };
        assert!(matches(&ex(req("pod", "In", &["a", "b"])), &l));
        assert!(!matches(&ex(req("pod", "In", &["c"])), &l));
        assert!(matches(&ex(req("pod", "NotIn", &["c"])), &l));
        assert!(
            matches(&ex(req("missing", "NotIn", &["c"])), &l),
            "NotIn matches an absent key"
        );
        assert!(matches(&ex(req("tier", "Exists", &[])), &l));
        assert!(!matches(&ex(req("tier", "DoesNotExist", &[])), &l));
        assert!(matches(&ex(req("zone", "DoesNotExist", &[])), &l));
        // matchLabels and matchExpressions are ANDed.
        let both = LabelSelector {
            match_expressions: Some(vec![req("tier", "In", &["db"])]),
            ..ml
        };
        assert!(!matches(&both, &l));
    }

    fn policy(yaml: &str) -> NetworkPolicy {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn invalid_policies_are_refused_with_the_place_of_the_mistake() {
        let bad = [
            (
                "spec: {podSelector: {matchExpressions: [{key: a, operator: In}]}}",
                "needs values",
            ),
            (
                "spec: {podSelector: {matchExpressions: [{key: a, operator: Near, values: [b]}]}}",
                "unknown operator",
            ),
            (
                "spec: {podSelector: {}, ingress: [{from: [{}]}]}",
                "ingress[0].from[0]",
            ),
            (
                "spec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]}",
                "cannot be combined",
            ),
            (
                "spec: {podSelector: {}, egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/8]}}]}]}",
                "not inside",
            ),
            (
                "spec: {podSelector: {}, egress: [{to: [{ipBlock: {cidr: nonsense}}]}]}",
                "egress[0].to[0]",
            ),
            (
                "spec: {podSelector: {}, ingress: [{ports: [{port: 80, endPort: 70}]}]}",
                "endPort 70",
            ),
            (
                "spec: {podSelector: {}, ingress: [{ports: [{port: http, endPort: 90}]}]}",
                "numeric port",
            ),
            (
                "spec: {podSelector: {}, ingress: [{ports: [{port: 0}]}]}",
                "outside",
            ),
            (
                "spec: {podSelector: {}, ingress: [{ports: [{protocol: ICMP, port: 1}]}]}",
                "ICMP",
            ),
            (
                "spec: {podSelector: {}, policyTypes: [Sideways]}",
                "Sideways",
            ),
        ];
        for (y, needle) in bad {
            let err = validate(&policy(y)).unwrap_err().to_string();
            assert!(
                err.contains(needle),
                "{y}: {err:?} should mention {needle:?}"
            );
        }
        validate(&policy("spec: {podSelector: {}, ingress: [{ports: [{port: 80, endPort: 90}, {port: serve-80-tcp}, {protocol: UDP}]}]}")).unwrap();
    }

    #[test]
    fn policy_types_default_as_the_api_says() {
        assert_eq!(types(&policy("spec: {podSelector: {}}")), (true, false));
        assert_eq!(
            types(&policy("spec: {podSelector: {}, egress: []}")),
            (true, true)
        );
        assert_eq!(
            types(&policy("spec: {podSelector: {}, policyTypes: [Egress]}")),
            (false, true)
        );
    }
}
