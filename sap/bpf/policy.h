// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// The node's compiled policy, as every keyway program that judges by it reads it: the node's
// SaP (node.bpf.c) and the pods' endpoints (endpoint.bpf.c). The agent compiles it from the same
// tables as the engine and writes it once per node; an endpoint's programs share the node's maps
// (the loader hands them the node's), so a compile costs the same however many pods the node has.
// Keep in step with sap/src/io/bpf.rs (NodePrograms' configuration words, SapRoute, SapPair).

#ifndef KEYWAY_POLICY_H
#define KEYWAY_POLICY_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

// What the agent tells the node's programs (one array slot).
struct node_config {
	__u32 gue_port;         // network order, low 16 bits
	__u32 lease_lo;         // until when (bpf_ktime_get_ns) the maps may be used
	__u32 lease_hi;
	__u32 sap_v4;           // the SaP's address, network order (0: no kernel SaP)
	__u32 policy_gen;       // the generation of kw_sap_routes and kw_sap_pairs in force (0:
				// none: the kernel SaP forwards only the flows in kw_sap_flows)
	__u32 policy_flags;     // POLICY_*
};

// kw_sap_pairs holds every pair of identities with one side this SaP fronts that policy allows
// anything or that is direct: a pair that is not there is allowed nothing and goes through its
// SaPs, so an endpoint may judge by it (a compile cut short by its budget leaves this off).
#define POLICY_COMPLETE 1

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct node_config);
} kw_node_config SEC(".maps");

// The node's configuration while the agent's lease on the maps holds, and, for a program that
// sends from the SaP's address (`with_sap`), while there is one; NULL otherwise (the program
// lets the packet go on as it came).
static __always_inline struct node_config *leased(int with_sap)
{
	__u32 zero = 0;
	struct node_config *cfg = bpf_map_lookup_elem(&kw_node_config, &zero);
	if (!cfg || (with_sap && !cfg->sap_v4))
		return NULL;
	__u64 lease = ((__u64)cfg->lease_hi << 32) | cfg->lease_lo;
	return bpf_ktime_get_ns() < lease ? cfg : NULL;
}

// kw_sap_routes: the engine's FIB, every IPv4 prefix of it (longest prefix wins, as there). Its
// IPv6 prefixes are in the node's kw_sap_routes6 (node.bpf.c), which only the node's SaP reads.
struct sap_route_key {
	__u32 prefixlen;
	__u32 addr;             // network order
};

#define ROUTE_OUTSIDE 1         // off the overlay: never a destination, speaks only via its SaP
#define ROUTE_TO_SAP 2          // its endpoint is a SaP's address: the engine refuses (a loop)
#define ROUTE_FRONTED 4         // this SaP fronts it: the kernel may forward to it
#define ROUTE_UNUSABLE 8        // the kernel cannot judge it (an IPv6 endpoint): user space

struct sap_route {
	__u32 gen;              // the compilation it belongs to (node_config.policy_gen)
	__u32 identity;
	__u32 infra_v4;         // its endpoint, network order
	__u32 infra_port;       // network order, low 16 bits
	__u32 sap_v4;           // the SaP that fronts it, network order (0: none)
	__u32 flags;            // ROUTE_*
	__u32 nkeys;            // the keys it accepts throughout the agent's lease (0..3)
	__u32 keys[3];          // host order
	__u32 sap_port;         // the SaP's port, network order, low 16 bits
	__u32 send_key;         // the key a sender puts on what it sends it now (0: none the
				// kernel may use: user space)
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct sap_route_key);
	__type(value, struct sap_route);
} kw_sap_routes SEC(".maps");

// kw_sap_pairs: what policy allows from one identity to another (keyway_core::acl::PairPolicy):
// destination port ranges for TCP and UDP, or everything; and whether the pair is direct.
#define PAIR_RANGES 8
#define PAIR_EVERYTHING 1
#define PAIR_MESH 2             // both meshed: TCP to HBONE_PORT is judged by PAIR_HBONE alone
#define PAIR_HBONE 4
#define PAIR_DIRECT 8           // the pair bypasses SaPs
#define PAIR_UNKNOWN 16         // its policy needs more ranges than fit: user space judges it
#define HBONE_PORT 15008

struct sap_pair_key {
	__u32 src;
	__u32 dst;
};

struct sap_pair {
	__u32 gen;
	__u32 flags;            // PAIR_*
	__u32 ntcp;
	__u32 nudp;
	__u16 tcp[PAIR_RANGES][2]; // inclusive, host order
	__u16 udp[PAIR_RANGES][2];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sap_pair_key);
	__type(value, struct sap_pair);
} kw_sap_pairs SEC(".maps");

static __always_inline struct sap_route *route_of(__u32 addr, __u32 gen)
{
	struct sap_route_key k = {.prefixlen = 32, .addr = addr};
	struct sap_route *r = bpf_map_lookup_elem(&kw_sap_routes, &k);
	return r && r->gen == gen && !(r->flags & ROUTE_UNUSABLE) ? r : NULL;
}

static __always_inline struct sap_pair *pair_of(__u32 gen, __u32 src, __u32 dst)
{
	struct sap_pair_key k = {.src = src, .dst = dst};
	struct sap_pair *p = bpf_map_lookup_elem(&kw_sap_pairs, &k);
	return p && p->gen == gen ? p : NULL;
}

static __always_inline int in_ranges(__u16 r[PAIR_RANGES][2], __u32 n, __u16 port)
{
#pragma unroll
	for (int i = 0; i < PAIR_RANGES; i++)
		if (i < n && r[i][0] <= port && port <= r[i][1])
			return 1;
	return 0;
}

// Whether policy allows a packet of `proto` to destination port `dport` (host order; none for
// an echo) from identity `src` to `dst` (keyway_core::acl::Acl::allows). A pair whose policy is
// not compiled allows nothing here: its packets go to user space.
static __always_inline int pair_allows(__u32 gen, __u32 src, __u32 dst, __u8 proto, __u16 dport)
{
	struct sap_pair *p = pair_of(gen, src, dst);
	if (!p || (p->flags & PAIR_UNKNOWN))
		return 0;
	if (proto == IPPROTO_TCP && (p->flags & PAIR_MESH) && dport == HBONE_PORT)
		return (p->flags & PAIR_HBONE) != 0;
	if (p->flags & PAIR_EVERYTHING)
		return 1;
	if (proto == IPPROTO_TCP)
		return in_ranges(p->tcp, p->ntcp, dport);
	if (proto == IPPROTO_UDP)
		return in_ranges(p->udp, p->nudp, dport);
	return 0;
}

#endif
