// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// keyway's kernel fast path at the node: two tc programs, direct action.
//
// kw_bridge_egress: GUE the node routes to one of its pods, handed straight to the pod's veth
// instead of through the primary CNI's bridge. (GUE for one of its pods that comes in from the
// underlay does not get this far: kw_sap hands it into the pod at the node's device.)
//
// Why: a pod's fast path sends a TCP GSO packet whole, encapsulated (skb->encapsulation). A Linux
// bridge advertises no offloads for encapsulated packets (its hw_enc_features are empty), so the
// bridge in front of the receiving node's pods (Flannel's cni0, the bridge plugin's) segments
// every such packet in software into MTU-sized datagrams, and the receiving pod's fast path then
// handles each one by one: the throughput of the user-space path, at more CPU. The node's own
// routing has already decided the packet (netfilter's forward and postrouting hooks have run, the
// TTL is decremented, the neighbour's address is in the Ethernet header): this program, on the
// bridge's egress, only picks the port, as the bridge's forwarding table would, and sends the
// packet to it whole (a veth takes encapsulated GSO packets).
//
// It touches only IPv4 UDP to keyway's GUE port whose destination is a pod the agent listed
// (kw_node_pods: pod IP -> the ifindex of its veth's node side), while the agent's lease holds.
// Everything else goes through the bridge as before.
//
// kw_sap: the node's SaP, in the kernel. On the ingress of the device that holds the SaP's
// address, a GUE datagram to the SaP is forwarded as the user-space SaP forwards it when either
// its (outer source, key, inner five-tuple) is in kw_sap_flows (kw_sap_flows6 for an inner IPv6
// packet), a flow the user-space SaP has already forwarded, or it passes the SaP's whole check
// against the policy the agent compiled into kw_sap_routes (kw_sap_routes6) and kw_sap_pairs (an
// inner IPv4 or IPv6 TCP, UDP or echo packet to one of the pods this SaP fronts; see sap_judge):
// from the SaP's address and port to the destination endpoint the engine chose, the datagram
// itself unchanged (a SaP never rewrites the key): straight into the destination pod, as its
// eth0 receives (hand_on), when it is one of the node's pods behind a bridge, else (another
// node's pod, an external entity) out of the device and to the neighbour the node's routing
// gives. The agent put the flow there after engine::sap_forward admitted one of its datagrams,
// and re-derives it through the same function at every change and every second;
// the key is part of the flow, so a datagram with any other key (a rotation, a forgery) misses
// and goes to the user-space SaP, which checks it. The SaP keeps no per-flow state, so its check
// compiles whole into lookups: the kernel repeats the engine's decision for every datagram of a
// pair, a flow's first ones included, from maps the agent rewrites at every compile
// (sap/tests/bpf.rs holds it to engine::sap_forward). The kernel drops nothing: what it does not
// forward goes to the user-space SaP, which drops and counts what it must. On the same device,
// GUE from the underlay to one of the node's pods behind a bridge (a direct datagram from a pod
// on another node) goes straight into the pod too (to_local_pod).
//
// kw_gateway: the node's gateway, in the kernel, for the flows the user-space gateway has
// already carried. On the egress of the gateway device (kwgw0, where the node routes what
// reaches a protected pod from off the overlay), a packet whose inner five-tuple is in
// kw_gw_flows is put into GUE as the user-space gateway puts it (engine::gateway_ingress): with
// the key and to the endpoint the engine chose, from the SaP's address and port, and handed
// on whole as kw_sap hands on its datagrams (straight to the pod's veth behind a bridge, else
// as the node's routes say). The agent put the flow there after the engine admitted one of its
// packets, and re-derives it through the same function at every change and every second (a
// key rotation rewrites the flow's key). Anything else goes on into the device,
// to the user-space gateway, which decides it; with no agent reading the device (it persists
// across restarts), what the kernel does not carry is dropped there: closed.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "encap.h"
#include "flow.h"
#include "policy.h"

// One of the node's pods behind a bridge (keep in step with sap/src/io/bpf.rs).
struct node_pod {
	__u32 ifindex;          // the node side of the pod's veth
	__u8 pod_mac[6];        // the pod's eth0, and the bridge's address: the Ethernet header
	__u8 bridge_mac[6];     // the node's routing would have given a datagram for the pod
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u32);     // the pod IP, network order
	__type(value, struct node_pod);
} kw_node_pods SEC(".maps");

// Packets and bytes handed to a pod's veth, for `bpftool map dump name kw_node_carried` (the
// agent does not add them to its counters: the pod's own programs count the same packets).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} kw_node_carried SEC(".maps");

// Adds a packet to per-CPU counters `counters` (packets, bytes): a GSO packet as the `segs`
// segments it becomes.
static __always_inline void count_carried(void *counters, __u32 segs, __u64 bytes)
{
	__u32 k = 0;
	__u64 *n = bpf_map_lookup_elem(counters, &k);
	if (n)
		*n += segs > 1 ? segs : 1;
	k = 1;
	n = bpf_map_lookup_elem(counters, &k);
	if (n)
		*n += bytes;
}

// Where a datagram from the SaP's address `src` to `dst` (network order, as the ports) goes
// next, and the Ethernet header it goes with: one of the node's pods behind a bridge, straight
// to its veth; anything else (a pod on another node, an external entity this node is the
// gateway of, a pod on a routed veth) as the node's routing and neighbours say for a packet it
// forwards from device `from` (which may also be the way out: the underlay a datagram came in
// by leads to the other nodes too). Returns HOP_POD (the hop is a pod's veth) or HOP_ROUTED
// with *out and macs (destination, then source) set; -1 when the node has no route or no
// neighbour yet (the user-space path sends that datagram, and its send resolves the neighbour
// for the next).
#define HOP_ROUTED 0
#define HOP_POD 1

// Whether `dst` is one of the node's pods behind a bridge; if so, with *out and macs set as
// next_hop sets them for HOP_POD.
static __always_inline int local_pod(__u32 dst, __u32 *out, __u8 macs[12])
{
	struct node_pod *pod = bpf_map_lookup_elem(&kw_node_pods, &dst);
	if (!pod)
		return 0;
	*out = pod->ifindex;
	__builtin_memcpy(macs, pod->pod_mac, 6);
	__builtin_memcpy(macs + 6, pod->bridge_mac, 6);
	return 1;
}

static __always_inline int next_hop(struct __sk_buff *skb, __u32 from, __u32 src, __u32 dst,
				    __u16 sport, __u16 dport, __u32 *out, __u8 macs[12])
{
	if (local_pod(dst, out, macs))
		return HOP_POD;
	// No length given: the kernel checks the packet against the MTU of the device it would
	// leave by (a GSO packet is cut to it there).
	struct bpf_fib_lookup fib = {
		.family = 2, // AF_INET
		.l4_protocol = IPPROTO_UDP,
		.sport = sport,
		.dport = dport,
		.ifindex = from,
		.ipv4_src = src,
		.ipv4_dst = dst,
	};
	if (bpf_fib_lookup(skb, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return -1;
	*out = fib.ifindex;
	__builtin_memcpy(macs, fib.dmac, 6);
	__builtin_memcpy(macs + 6, fib.smac, 6);
	return HOP_ROUTED;
}

// Sends a datagram that came in on a device's ingress (kw_sap's) on to the hop next_hop gave:
// into a pod's netns at once, as the pod's eth0 receives (bpf_redirect_peer), or out of the
// node's device. Through the pod's veth instead, each datagram would be transmitted on the
// node side (its GSO headers checked again: bpf_skb_adjust_room marked them for it at the
// sender), queued to the CPU's backlog, and received on the pod side later in the softirq;
// the peer redirect skips all three and keeps what the pod's side does: its tc ingress
// (kw_ingress), its netfilter, its stack. Unlike the veth, it keeps the packet's mark across
// the namespaces; the node's marks mean nothing in the pod, so none goes in.
static __always_inline int hand_on(struct __sk_buff *skb, int hop, __u32 out)
{
	if (hop != HOP_POD)
		return bpf_redirect(out, 0);
	skb->mark = 0;
	return bpf_redirect_peer(out, 0);
}

SEC("classifier")
int kw_bridge_egress(struct __sk_buff *skb)
{
	struct node_config *cfg = leased(0);
	if (!cfg)
		return TC_ACT_OK;
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if (!HAVE(eth, sizeof(*eth), end) || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	struct iphdr *ip = (void *)(eth + 1);
	if (!HAVE(ip, sizeof(*ip), end) || ip->ihl < 5 || ip->protocol != IPPROTO_UDP ||
	    (ip->frag_off & bpf_htons(0x3fff)))
		return TC_ACT_OK;
	struct udphdr *udp = (void *)ip + ip->ihl * 4;
	if (!HAVE(udp, sizeof(*udp), end) || udp->dest != (__u16)cfg->gue_port)
		return TC_ACT_OK;
	__u32 daddr = ip->daddr;
	struct node_pod *pod = bpf_map_lookup_elem(&kw_node_pods, &daddr);
	if (!pod)
		return TC_ACT_OK;
	count_carried(&kw_node_carried, skb->gso_segs, skb->len);
	return bpf_redirect(pod->ifindex, 0);
}

// A flow the user-space SaP forwarded: from which outer source, with which key.
struct sap_flow_key {
	__u32 outer_src;        // network order
	__u32 key;              // host order, as GUE's group identifier reads
	struct flow4 inner;
};

struct sap_flow_key6 {
	__u32 outer_src;        // network order
	__u32 key;              // host order
	struct flow6 inner;
};

struct sap_flow {
	__u32 to_v4;            // the destination endpoint, network order
	__u32 to_port;          // network order, low 16 bits
	__u64 seen_ns;          // bpf_ktime_get_ns() of the last datagram the kernel forwarded
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sap_flow_key);
	__type(value, struct sap_flow);
} kw_sap_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sap_flow_key6);
	__type(value, struct sap_flow);
} kw_sap_flows6 SEC(".maps");

// Datagrams forwarded (a GSO packet as its segments) and their bytes as the user-space SaP
// counts them (GUE header and inner packet), added by the agent to its SaP counters; then the
// datagrams of those that the compiled policy (not a flow in kw_sap_flows) let through.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 3);
	__type(key, __u32);
	__type(value, __u64);
} kw_sap_carried SEC(".maps");

// kw_sap_routes6: the engine's FIB, every IPv6 prefix of it (longest prefix wins, as there), as
// kw_sap_routes holds its IPv4 ones (policy.h): for an inner IPv6 packet's addresses. The pods'
// programs judge no IPv6 packet by the compiled policy, so it is the SaP's alone.
struct sap_route_key6 {
	__u32 prefixlen;
	__u8 addr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct sap_route_key6);
	__type(value, struct sap_route);
} kw_sap_routes6 SEC(".maps");

// route_of for an IPv6 address (its 16 bytes at `addr`, which the caller has checked are there).
static __always_inline struct sap_route *route6_of(const __u8 *addr, __u32 gen)
{
	struct sap_route_key6 k = {.prefixlen = 128};
	__builtin_memcpy(k.addr, addr, 16);
	struct sap_route *r = bpf_map_lookup_elem(&kw_sap_routes6, &k);
	return r && r->gen == gen && !(r->flags & ROUTE_UNUSABLE) ? r : NULL;
}

// The SaP's check (keyway_core::engine::sap_forward), by the compiled policy (policy.h), on a
// datagram from `outer_src` with `key` whose inner packet's routes are `src` and `dst` and whose
// transport header, of `proto`, is at `l4` (`icmp`, `request`, `reply`: the IP version's ICMP
// and its echo types): the inner source's route, the inner destination's (one this SaP fronts),
// the outer source may speak for the inner source, the destination accepts the key, policy
// allows the packet (or its reply the other way, when it does not open a flow), no loop. Returns
// 0 with the destination endpoint in *to, *to_port; -1 for anything else, which the user-space
// SaP judges (and drops, where it must).
static __always_inline int sap_judge(struct node_config *cfg, __u32 outer_src, __u32 key,
				     struct sap_route *src, struct sap_route *dst, __u8 proto,
				     __u8 *l4, void *end, __u8 icmp, __u8 request, __u8 reply,
				     __u32 *to, __u32 *to_port)
{
	__u32 gen = cfg->policy_gen;
	__u16 sport, dport;
	if (fast_l4(proto, l4, end, icmp, request, reply, 1, &sport, &dport) < 0)
		return -1;
	// Whether it opens a flow, and so can be no reply (a TCP SYN without ACK, an echo request).
	int opens = proto == IPPROTO_TCP ? (l4[13] & (TCP_FLAG_SYN | 0x10)) == TCP_FLAG_SYN
					 : proto == icmp && l4[0] == request;
	// Ports in host order (an echo has none policy reads).
	sport = bpf_ntohs(sport);
	dport = bpf_ntohs(dport);
	if (!src || !dst || (dst->flags & (ROUTE_OUTSIDE | ROUTE_TO_SAP)) ||
	    !(dst->flags & ROUTE_FRONTED))
		return -1;
	if (!((!(src->flags & ROUTE_OUTSIDE) && src->infra_v4 == outer_src) ||
	      (src->sap_v4 && src->sap_v4 == outer_src)))
		return -1;
	if (!((dst->nkeys > 0 && dst->keys[0] == key) || (dst->nkeys > 1 && dst->keys[1] == key) ||
	      (dst->nkeys > 2 && dst->keys[2] == key)))
		return -1;
	if (!pair_allows(gen, src->identity, dst->identity, proto, dport) &&
	    (opens || !pair_allows(gen, dst->identity, src->identity, proto, sport)))
		return -1;
	*to = dst->infra_v4;
	*to_port = dst->infra_port;
	return 0;
}

// sap_judge on an inner IPv4 packet at `pkt` that fills the datagram: no options, not a
// fragment.
static __always_inline int sap_compiled(struct node_config *cfg, __u32 outer_src, __u32 key,
					__u8 *pkt, void *end, __u32 *to, __u32 *to_port)
{
	__u32 gen = cfg->policy_gen;
	if (!gen || !HAVE(pkt, 20, end) || pkt[0] != 0x45 ||
	    ((((__u16)pkt[6] << 8) | pkt[7]) & 0x3fff) != 0)
		return -1;
	return sap_judge(cfg, outer_src, key, route_of(*(__u32 *)(pkt + 12), gen),
			 route_of(*(__u32 *)(pkt + 16), gen), pkt[9], pkt + 20, end, IPPROTO_ICMP,
			 ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY, to, to_port);
}

// sap_judge on an inner IPv6 packet at `pkt` that fills the datagram, its transport header
// straight after the fixed one (with extension headers, fast_l4 takes none of it: the
// user-space SaP walks them).
static __always_inline int sap_compiled6(struct node_config *cfg, __u32 outer_src, __u32 key,
					 __u8 *pkt, void *end, __u32 *to, __u32 *to_port)
{
	__u32 gen = cfg->policy_gen;
	if (!gen || !HAVE(pkt, IPV6_HEADER_LEN, end) || (pkt[0] >> 4) != 6)
		return -1;
	return sap_judge(cfg, outer_src, key, route6_of(pkt + 8, gen), route6_of(pkt + 24, gen),
			 pkt[6], pkt + IPV6_HEADER_LEN, end, IPPROTO_ICMPV6, ICMPV6_ECHO_REQUEST,
			 ICMPV6_ECHO_REPLY, to, to_port);
}

// A GUE datagram that came in from the underlay for one of the node's pods behind a bridge
// (direct, from a pod on another node): handed into the pod at once (hand_on), with the Ethernet
// header the node would give it, as kw_sap hands on a datagram for the SaP. Through the node's
// routing it would cross IP forwarding, netfilter's forward and postrouting hooks and the bridge
// before kw_bridge_egress took it to the same veth: work per packet that the direct path paid
// and the path through a SaP did not. Nothing is checked here that the pod does not check: the
// pod's kw_ingress (or its agent) holds the datagram to its key, outer source and policy, and
// the pod's own table still sees it. One check of the node's is kept, as a strict reverse-path
// filter makes it: the outer source must be one the node would route out of the device the
// datagram came in by, so never the node's own address (which a pod admits for any inner
// source: its SaP's) nor a pod of its own, which no datagram from the underlay can come from.
// Anything else goes on to the node as before, and the node decides it.
static __always_inline int to_local_pod(struct __sk_buff *skb, __u32 saddr, __u32 daddr)
{
	__u32 veth;
	__u8 macs[12];
	if (!local_pod(daddr, &veth, macs))
		return TC_ACT_OK;
	struct bpf_fib_lookup back = {
		.family = 2, // AF_INET
		.l4_protocol = IPPROTO_UDP,
		.ifindex = skb->ingress_ifindex,
		.ipv4_src = daddr,
		.ipv4_dst = saddr,
	};
	if (bpf_fib_lookup(skb, &back, sizeof(back), BPF_FIB_LOOKUP_SKIP_NEIGH) !=
		    BPF_FIB_LKUP_RET_SUCCESS ||
	    back.ifindex != skb->ingress_ifindex)
		return TC_ACT_OK;
	// The headers were pulled writable: this cannot fail, and a frame half rewritten must not
	// go on if it did.
	if (bpf_skb_store_bytes(skb, 0, macs, 12, 0))
		return TC_ACT_SHOT;
	count_carried(&kw_node_carried, skb->gso_segs, skb->len);
	return hand_on(skb, HOP_POD, veth);
}

// Ethernet, outer IPv4 without options, UDP, GUE without a MAC, an inner IPv6 header (an IPv4
// one without options is shorter), TCP.
#define SAP_HEADERS_LEN (14 + 20 + 8 + 8 + 40 + 20)
#define ETH_LEN 14
#define IP_CSUM_OFF (ETH_LEN + 10)
#define IP_SRC_OFF (ETH_LEN + 12)
#define IP_DST_OFF (ETH_LEN + 16)
#define UDP_OFF (ETH_LEN + 20)
#define UDP_CSUM_OFF (UDP_OFF + 6)
// keyway's GUE header without a MAC: version 0, Hlen 1, IPv4 (or IPv6) inside, the group-id
// flag.
#define GUE_PLAIN_IPV4 0x01048000
#define GUE_PLAIN_IPV6 0x01298000

SEC("classifier")
int kw_sap(struct __sk_buff *skb)
{
	struct node_config *cfg = leased(1);
	if (!cfg)
		return TC_ACT_OK;
	if (skb->len < SAP_HEADERS_LEN - 32)
		return TC_ACT_OK;
	// The headers read and rewritten, in the linear part and writable (not shared with a
	// clone): after this, the rewrites below cannot fail.
	if (bpf_skb_pull_data(skb, skb->len < SAP_HEADERS_LEN ? skb->len : SAP_HEADERS_LEN))
		return TC_ACT_OK;
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if (!HAVE(eth, sizeof(*eth), end) || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	struct iphdr *ip = (void *)(eth + 1);
	if (!HAVE(ip, sizeof(*ip), end) || ip->version != 4 || ip->ihl != 5 ||
	    ip->protocol != IPPROTO_UDP || (ip->frag_off & bpf_htons(0x3fff)))
		return TC_ACT_OK;
	struct udphdr *udp = (void *)(ip + 1);
	if (!HAVE(udp, sizeof(*udp), end) || udp->dest != (__u16)cfg->gue_port)
		return TC_ACT_OK;
	if (ip->daddr != cfg->sap_v4)
		return to_local_pod(skb, ip->saddr, ip->daddr);
	// Exactly one GUE datagram holding exactly one inner packet (a GSO one, kept whole by a
	// sender's fast path, counts as one): a user-space sender's UDP GSO batch, many datagrams
	// behind one header whose UDP length is a segment's, is left to the user-space SaP, which
	// checks each of them.
	__u32 ulen = bpf_ntohs(udp->len);
	if (ulen != skb->len - ETH_LEN - 20)
		return TC_ACT_OK;
	__u8 *gue = (void *)(udp + 1);
	if (!HAVE(gue, 8, end))
		return TC_ACT_OK;
	__u32 header = bpf_ntohl(*(__u32 *)gue);
	__u32 key = bpf_ntohl(*(__u32 *)(gue + 4));
	__u8 *pkt = gue + 8;
	// The flow, and the inner packet's IP and transport headers (each datagram the user-space
	// SaP would send carries them: they count in its bytes).
	struct sap_flow *flow = NULL;
	__u32 ip_len;
	__u8 proto;
	__u32 to;
	__u32 to_port;
	int compiled = 0;
	if (header == GUE_PLAIN_IPV4) {
		if (!HAVE(pkt, 20, end) || (((__u32)pkt[2] << 8) | pkt[3]) != ulen - 16)
			return TC_ACT_OK;
		struct sap_flow_key k = {.outer_src = ip->saddr, .key = key};
		if (fast_flow4(pkt, end, &k.inner) == 0)
			flow = bpf_map_lookup_elem(&kw_sap_flows, &k);
		if (!flow) {
			if (sap_compiled(cfg, ip->saddr, key, pkt, end, &to, &to_port) < 0)
				return TC_ACT_OK;
			compiled = 1;
		}
		ip_len = 20;
		proto = pkt[9];
	} else if (header == GUE_PLAIN_IPV6) {
		if (!HAVE(pkt, IPV6_HEADER_LEN, end) ||
		    (((__u32)pkt[4] << 8) | pkt[5]) + IPV6_HEADER_LEN != ulen - 16)
			return TC_ACT_OK;
		struct sap_flow_key6 k = {.outer_src = ip->saddr, .key = key};
		if (fast_flow6(pkt, end, &k.inner) == 0)
			flow = bpf_map_lookup_elem(&kw_sap_flows6, &k);
		if (!flow) {
			if (sap_compiled6(cfg, ip->saddr, key, pkt, end, &to, &to_port) < 0)
				return TC_ACT_OK;
			compiled = 1;
		}
		ip_len = IPV6_HEADER_LEN;
		proto = pkt[6];
	} else {
		return TC_ACT_OK;
	}
	if (flow) {
		to = flow->to_v4;
		to_port = flow->to_port;
	} else if (!compiled) {
		return TC_ACT_OK;
	}
	__u32 inner_headers = ip_len + 8;
	if (proto == IPPROTO_TCP) {
		__u8 *tcp = pkt + (ip_len & 0x3c);
		if (!HAVE(tcp, 20, end))
			return TC_ACT_OK;
		inner_headers = ip_len + (tcp[12] >> 4) * 4;
	}
	__u16 gue_port = (__u16)cfg->gue_port;
	// Where it goes, found before anything is rewritten.
	__u32 out;
	__u8 macs[12];
	int hop = next_hop(skb, skb->ingress_ifindex, cfg->sap_v4, to, gue_port, (__u16)to_port,
			   &out, macs);
	if (hop < 0)
		return TC_ACT_OK;
	if (flow)
		flow->seen_ns = bpf_ktime_get_ns();

	__u32 from = ip->saddr;
	__u16 sport = udp->source;
	__u16 dport = udp->dest;
	__u32 segs = skb->gso_segs > 1 ? skb->gso_segs : 1;
	// As the user-space SaP counts: each datagram's GUE header and inner packet.
	__u64 bytes = skb->len - ETH_LEN - 20 - 8 + (__u64)(segs - 1) * (8 + inner_headers);

	// From (source S, the SaP) to (the SaP, destination T): the header checksum and UDP's
	// pseudo-header lose S and gain T. A zero UDP checksum (none, over IPv4) stays zero;
	// BPF_F_PSEUDO_HDR keeps a checksum the offload is to finish (CHECKSUM_PARTIAL) right.
	__u32 sap = cfg->sap_v4;
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, from, to, 4) ||
	    bpf_l4_csum_replace(skb, UDP_CSUM_OFF, from, to,
				BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | 4))
		return TC_ACT_OK;
	// (The rewrites below cannot fail on the pulled, writable headers; were one to, a half
	// rewritten datagram must not go on.)
	if (sport != gue_port &&
	    bpf_l4_csum_replace(skb, UDP_CSUM_OFF, sport, gue_port, BPF_F_MARK_MANGLED_0 | 2))
		return TC_ACT_SHOT;
	__u16 to_port16 = (__u16)to_port;
	if (dport != to_port16 &&
	    bpf_l4_csum_replace(skb, UDP_CSUM_OFF, dport, to_port16, BPF_F_MARK_MANGLED_0 | 2))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, IP_SRC_OFF, &sap, 4, 0) ||
	    bpf_skb_store_bytes(skb, IP_DST_OFF, &to, 4, 0) ||
	    bpf_skb_store_bytes(skb, UDP_OFF, &gue_port, 2, 0) ||
	    bpf_skb_store_bytes(skb, UDP_OFF + 2, &to_port16, 2, 0) ||
	    bpf_skb_store_bytes(skb, 0, macs, 12, 0))
		return TC_ACT_SHOT;

	count_carried(&kw_sap_carried, segs, bytes);
	if (compiled) {
		__u32 k = 2;
		__u64 *n = bpf_map_lookup_elem(&kw_sap_carried, &k);
		if (n)
			*n += segs;
	}
	return hand_on(skb, hop, out);
}

// The flows the user-space gateway carried, by inner five-tuple after the node's DNAT (a
// NodePort's destination is the pod IP kube-proxy chose): where and with which key it sent them.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow4);
	__type(value, struct egress_flow);
} kw_gw_flows SEC(".maps");

// Packets carried (a GSO packet as its segments) and their bytes as the user-space gateway
// counts them (the packet, before encapsulation), added by the agent to its gateway counters.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} kw_gw_carried SEC(".maps");

// On the gateway device's egress: the packet as the node forwards it, starting at its IPv4
// header (the device is a TUN device: no link-layer header).
SEC("classifier")
int kw_gateway(struct __sk_buff *skb)
{
	struct node_config *cfg = leased(1);
	if (!cfg)
		return TC_ACT_OK;
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	// The headers fast_flow4 reads, in the linear part (a forwarded GRO packet has them there;
	// anything else is pulled, or left to user space).
	__u32 want = skb->len < 40 ? skb->len : 40;
	if ((long)skb->data_end - (long)skb->data < want && bpf_skb_pull_data(skb, want))
		return TC_ACT_OK;
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct flow4 f;
	if (fast_flow4(data, end, &f) < 0)
		return TC_ACT_OK;
	struct egress_flow *flow = bpf_map_lookup_elem(&kw_gw_flows, &f);
	if (!flow)
		return TC_ACT_OK;
	__u32 to = flow->to_v4;
	__u16 to_port = (__u16)flow->to_port;
	__u16 gue_port = (__u16)cfg->gue_port;
	if (!encap_fits(f.proto, skb->gso_segs, skb->len))
		return TC_ACT_OK;
	__u32 out;
	__u8 macs[12];
	// (Never back into the gateway device: the node's unmarked routes lead elsewhere.)
	if (next_hop(skb, skb->ifindex, cfg->sap_v4, to, gue_port, to_port, &out, macs) < 0 ||
	    out == skb->ifindex)
		return TC_ACT_OK;
	__u64 inner_len = skb->len;
	__u32 segs = skb->gso_segs;
	int e = encap4(skb, PROTO_IPV4, cfg->sap_v4, gue_port, to, to_port, flow->key);
	if (e == -1)
		return TC_ACT_OK;
	if (e || bpf_skb_store_bytes(skb, 0, macs, 12, 0))
		return TC_ACT_SHOT;
	flow->seen_ns = bpf_ktime_get_ns();
	count_carried(&kw_gw_carried, segs, inner_len);
	return bpf_redirect(out, 0);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
