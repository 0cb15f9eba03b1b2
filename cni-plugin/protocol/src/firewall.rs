//! keyway's nftables table in each pod's network namespace: service traffic that reaches the pod
//! any way but the overlay is dropped, and an egress-isolated pod reaches nothing off the overlay
//! unless its policy's ipBlocks allow it.
//!
//! Every exemption is a rule with a comment saying why (`nft list table inet keyway` shows them):
//! - loopback, both ways: a pod talking to itself is never blocked;
//! - the overlay devices, both ways: keyway's endpoint enforces policy there;
//! - replies to connections the pod opened (`ct state established,related`);
//! - GUE to the pod's keyway endpoint (UDP 6080 in; out only with keyway's socket mark, which a
//!   workload cannot set): every datagram is then checked by key. Unmarked GUE going out is
//!   dropped whatever the egress policy: a workload has no business speaking it;
//! - the node's addresses (the primary CNI's gateways and `nodeAddresses`): kubelet's health
//!   probes, and NetworkPolicy never blocks traffic between a pod and its node;
//! - IPv6 neighbour discovery, without which the pod's IPv6 underlay would not work.
//!
//! The table is replaced whole in one transaction, by the plugin at ADD (egress closed) and by
//! the agent whenever the pod's egress policy changes.

use ipnetwork::IpNetwork;
use keyway_core::packet::{PROTO_ICMPV6, PROTO_UDP};
use keyway_sap::io::nft::{Chain, Family, Hook, Policy, Rule, Table, Verdict, ct_state};
use keyway_sap::io::udp::GUE_MARK;

pub const TABLE: &str = "keyway";
pub const FAMILY: Family = Family::Inet;
/// Before other filter chains: keyway's drop is final whatever they accept.
const PRIORITY: i32 = -10;

/// What the pod's table is made from, besides its egress policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFirewall {
    pub overlay_devices: Vec<String>,
    pub gue_port: u16,
    pub node_addresses: Vec<IpNetwork>,
}

/// A protocol and, optionally, a port range (inclusive).
pub type PortMatch = (u8, Option<(u16, u16)>);

/// A destination off the overlay that an egress-isolated pod may reach (a NetworkPolicy ipBlock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressAllow {
    pub cidr: IpNetwork,
    pub except: Vec<IpNetwork>,
    /// (protocol, port range); empty: every protocol and port.
    pub ports: Vec<PortMatch>,
}

/// The pod's egress policy for destinations off the overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Egress {
    /// Nothing leaves but the exemptions: the state between ADD and the agent's first word.
    Closed,
    /// Not egress-isolated.
    Open,
    /// Egress-isolated, with these allows.
    Allow(Vec<EgressAllow>),
}

impl PodFirewall {
    pub fn table(&self, egress: &Egress) -> Table {
        let mut input = vec![
            Rule::new()
                .iifname("lo")
                .accept()
                .comment("loopback is never blocked"),
        ];
        let mut output = vec![
            Rule::new()
                .oifname("lo")
                .accept()
                .comment("loopback is never blocked"),
        ];
        for dev in &self.overlay_devices {
            input.push(
                Rule::new()
                    .iifname(dev)
                    .accept()
                    .comment("the overlay: keyway's endpoint enforces policy"),
            );
            output.push(
                Rule::new()
                    .oifname(dev)
                    .accept()
                    .comment("the overlay: keyway's endpoint enforces policy"),
            );
        }
        let established = ct_state::ESTABLISHED | ct_state::RELATED;
        input.push(
            Rule::new()
                .ct_state(established)
                .accept()
                .comment("replies to connections the pod opened"),
        );
        output.push(
            Rule::new()
                .ct_state(established)
                .accept()
                .comment("replies within allowed connections"),
        );
        input.push(
            Rule::new()
                .l4proto(PROTO_UDP)
                .dport_range(self.gue_port, self.gue_port)
                .accept()
                .comment("GUE to the pod's keyway endpoint: each datagram is checked by key"),
        );
        output.push(
            Rule::new()
                .mark(GUE_MARK)
                .l4proto(PROTO_UDP)
                .sport(self.gue_port)
                .accept()
                .comment("GUE from keyway's endpoint (marked; workloads cannot set marks)"),
        );
        output.push(
            Rule::new()
                .l4proto(PROTO_UDP)
                .dport_range(self.gue_port, self.gue_port)
                .counter()
                .drop_()
                .comment("GUE that keyway's endpoint did not send: workloads never speak it"),
        );
        for node in &self.node_addresses {
            input.push(
                Rule::new()
                    .saddr(*node)
                    .accept()
                    .comment("the node: kubelet probes; policy never blocks the node"),
            );
            output.push(
                Rule::new()
                    .daddr(*node)
                    .accept()
                    .comment("the node: policy never blocks the node"),
            );
        }
        for rules in [&mut input, &mut output] {
            rules.push(
                Rule::new()
                    .l4proto(PROTO_ICMPV6)
                    .icmp_type_range(133, 137)
                    .accept()
                    .comment("IPv6 neighbour discovery on the pod network"),
            );
        }
        input.push(
            Rule::new()
                .counter()
                .drop_()
                .comment("service traffic that did not come over the overlay"),
        );
        output.push(Rule::new().verdict(Verdict::Jump("egress".into())));

        let mut chains = vec![
            Chain {
                name: "input".into(),
                hook: Some((Hook::Input, PRIORITY, Policy::Accept)),
                rules: input,
            },
            Chain {
                name: "output".into(),
                hook: Some((Hook::Output, PRIORITY, Policy::Accept)),
                rules: output,
            },
        ];
        let drop_rest = || {
            Rule::new()
                .counter()
                .drop_()
                .comment("egress-isolated: nothing else leaves off the overlay")
        };
        let egress_rules = match egress {
            Egress::Closed => vec![
                Rule::new()
                    .counter()
                    .drop_()
                    .comment("closed until the agent applies the pod's policy"),
            ],
            Egress::Open => vec![Rule::new().accept().comment("not egress-isolated")],
            Egress::Allow(allows) => {
                let mut rules = Vec::new();
                for (i, a) in allows.iter().enumerate() {
                    let name = format!("ipblock-{i}");
                    rules.push(Rule::new().verdict(Verdict::Jump(name.clone())));
                    let mut sub: Vec<Rule> = a
                        .except
                        .iter()
                        .map(|e| {
                            Rule::new()
                                .daddr(*e)
                                .verdict(Verdict::Return)
                                .comment("ipBlock except")
                        })
                        .collect();
                    if a.ports.is_empty() {
                        sub.push(Rule::new().daddr(a.cidr).accept().comment("ipBlock"));
                    }
                    for (proto, range) in &a.ports {
                        let r = Rule::new().daddr(a.cidr).l4proto(*proto);
                        let r = match range {
                            Some((s, e)) => r.dport_range(*s, *e),
                            None => r,
                        };
                        sub.push(r.accept().comment("ipBlock with ports"));
                    }
                    chains.push(Chain {
                        name,
                        hook: None,
                        rules: sub,
                    });
                }
                rules.push(drop_rest());
                rules
            }
        };
        chains.push(Chain {
            name: "egress".into(),
            hook: None,
            rules: egress_rules,
        });
        Table {
            family: FAMILY,
            name: TABLE.into(),
            chains,
        }
    }
}
