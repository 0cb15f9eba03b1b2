// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// keyway's kernel fast path for one endpoint (a pod): two tc programs, direct action.
//
// kw_ingress, on the pod's eth0: the checks an endpoint makes on an arriving GUE datagram, in
// the order keyway_core::engine::endpoint_ingress makes them. A datagram whose GUE header or inner
// packet is malformed, whose key the pod does not accept, or whose inner destination is not
// the pod is counted by reason and never carried: the user-space path drops it and counts the
// drop, as it always has. A datagram that passes them and belongs to a flow the
// user-space engine has already admitted from the same outer source (kw_ingress_flows) is
// decapsulated here and delivered into the receive path of the overlay device of its family (the
// pod's IPv4 overlay device, or its IPv6 one); everything else passes
// on unchanged (TC_ACT_OK) to the user-space path, which makes the remaining checks (source, MAC,
// policy), delivers, and tells the kernel about the flow.
//
// kw_egress, on the pod's overlay devices (kw0, and the IPv6 overlay's device where the pod has
// one): a packet of a flow the engine has already admitted on egress (kw_egress_flows, or
// kw_egress6 for IPv6: from the pod's own overlay address, with the next hop and key the
// engine chose) is encapsulated here in GUE over IPv4, 36 bytes, the same header the engine
// writes, and sent out of eth0 through the pod's routes and neighbours. Everything else goes on to
// the TUN device and the user-space path, which decides it.
//
// A TCP connection's, a UDP flow's and an echo's first packets need no user space either: on a
// miss, both programs make the engine's whole check by the node's compiled policy (policy.h, the
// maps the node's SaP judges by, shared): a SYN or an echo request policy allows, or a UDP
// datagram policy allows that replies within none of the engine's flows (kw_engine_flows), opens
// a connection the kernel records (kw_conns, keyed as the engine's flow table), and the packets
// of the other way are admitted as its replies; each is then cached as above (egress_compiled,
// ingress_compiled). The engine learns each such connection at the agent's next sync, or at once
// from the user-space path when one of its packets reaches it first. Packets that end a TCP
// connection (RST), fragments, IP options and IPv6 extension headers, ICMP other than echoes,
// an IPv6 flow's first packets, and datagrams with a MAC always take the user-space path.
// The agent re-derives every cached decision through the engine whenever its model or the key
// epoch changes, removes those the engine no longer makes, and feeds the kernel's last-seen times
// back to the engine's flow table, so that the engine's view of which flows are alive stays whole.
//
// sap/tests/bpf.rs holds kw_ingress's checks, and both programs' compiled ones, to the
// engine's over the same packets.
//
// Wire format: see sap/core/src/gue.rs (variant 0, G flag, Hlen 1, or 3 with the MAC).

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "encap.h"
#include "flow.h"
#include "policy.h"

// The verdicts, as indices of the drop counters (keep in step with sap/src/io/bpf.rs).
enum verdict {
	V_PASS = 0,             // to the user-space path
	V_MALFORMED = 1,
	V_BAD_KEY = 2,
	V_WRONG_DESTINATION = 3,
	V_MAX = 4,
};

#define F_FAST 1

// What the agent tells the programs about their pod (one array slot).
struct endpoint_config {
	__u32 overlay_v4;       // the pod's IPv4 overlay address, network order (0: none)
	__u32 infra_v4;         // the pod's IPv4 pod IP, network order (0: none): its own too
	__u32 gue_port;         // network order, low 16 bits
	__u32 nkeys;            // how many of `keys` the pod accepts now (0..3)
	__u32 keys[3];          // host order, as GUE's group identifier reads
	__u32 tun_ifindex;      // the IPv4 overlay device, where decapsulated packets are delivered
	__u32 eth_ifindex;      // the pod's eth0, where encapsulated packets leave
	__u32 flags;            // F_FAST: the flow maps are in use
	__u32 lease_lo;         // until when (bpf_ktime_get_ns) the flow maps may be used: the
	__u32 lease_hi;         // agent renews it every second; without an agent, nothing is fast
	__u32 overlay_v6[4];    // the pod's IPv6 overlay address (all zero: none)
	__u32 tun6_ifindex;     // the IPv6 overlay device, where decapsulated IPv6 is delivered
};

// Whether `a` is the pod's IPv6 overlay address (it has one).
static __always_inline int own_v6(struct endpoint_config *cfg, __u32 a[4])
{
	__u32 *o = cfg->overlay_v6;
	return (o[0] | o[1] | o[2] | o[3]) != 0 && a[0] == o[0] && a[1] == o[1] && a[2] == o[2] &&
	       a[3] == o[3];
}

static __always_inline int fast_on(struct endpoint_config *cfg)
{
	__u64 lease = ((__u64)cfg->lease_hi << 32) | cfg->lease_lo;
	return (cfg->flags & F_FAST) && bpf_ktime_get_ns() < lease;
}


struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct endpoint_config);
} kw_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, V_MAX);
	__type(key, __u32);
	__type(value, __u64);
} kw_ingress_verdicts SEC(".maps");

// A flow the engine admitted on ingress from one outer source.
struct ingress_flow_key {
	__u32 outer_src;        // network order
	struct flow4 inner;
};

struct ingress_flow_key6 {
	__u32 outer_src;        // network order
	struct flow6 inner;
};

struct ingress_flow {
	__u64 seen_ns;
};

#define FLOWS_MAX 16384

// The flows the engine admitted on egress, straight to the destination's endpoint (a flow
// through a SaP stays on the user-space path: the SaP reads each datagram), with where and how
// it sent the flow's packet.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FLOWS_MAX);
	__type(key, struct flow4);
	__type(value, struct egress_flow);
} kw_egress_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FLOWS_MAX);
	__type(key, struct ingress_flow_key);
	__type(value, struct ingress_flow);
} kw_ingress_flows SEC(".maps");

// The same two for IPv6 flows (the pod's IPv6 overlay, over the IPv4 underlay).
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FLOWS_MAX);
	__type(key, struct flow6);
	__type(value, struct egress_flow);
} kw_egress6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FLOWS_MAX);
	__type(key, struct ingress_flow_key6);
	__type(value, struct ingress_flow);
} kw_ingress6 SEC(".maps");

// The connections the kernel admitted by the compiled policy, keyed by the flow as its opener
// sent it (keyway_core::flow::FlowKey; an echo's by its identifier both ways: conn_key): what
// lets the other way's packets in as replies, as the engine's flow table does. The agent hands
// each to the engine at its next sync (and the user-space path at once, when a packet of one
// reaches it first), and removes those idle for a sync's period, so an entry here is a live flow;
// it never holds a flow the kernel did not open.
#define CONN_INBOUND 1          // the peer opened it: its first packet arrived here
#define CONN_ANSWERED 2         // a packet of the other way was admitted as its reply

struct conn {
	__u64 seen_ns;          // bpf_ktime_get_ns() of its last packet, either way
	__u32 outer_src;        // an inbound one's first datagram came from here, network order
	__u32 flags;            // CONN_*
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FLOWS_MAX);
	__type(key, struct flow4);
	__type(value, struct conn);
} kw_conns SEC(".maps");

// The engine's copy of the UDP flows it holds, keyed as kw_conns (the agent writes each before
// the packet that opened it goes on, and removes those the engine no longer holds): what tells
// the kernel a UDP datagram may be a reply only the engine knows of. It may hold more than the
// engine; it is whole, never less, while it holds the all-zero key, which the agent removes
// whenever one of the engine's flows could not be added. Not preallocated: written from user
// space alone, and most pods hold few UDP flows.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 2 * FLOWS_MAX);
	__type(key, struct flow4);
	__type(value, __u32);
} kw_engine_flows SEC(".maps");

// What the fast path carried (keep in step with sap/src/io/bpf.rs).
enum carried {
	C_EGRESS_PACKETS = 0,   // inner packets encapsulated and sent (a GSO packet as its segments)
	C_EGRESS_BYTES = 1,     // their inner bytes
	C_INGRESS_PACKETS = 2,  // inner packets decapsulated and delivered
	C_INGRESS_BYTES = 3,
	C_COMPILED = 4,         // of those, both ways, the ones the compiled policy admitted
	C_MAX = 5,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, C_MAX);
	__type(key, __u32);
	__type(value, __u64);
} kw_carried SEC(".maps");

// bpf_skb_adjust_room's flag that makes the skb's protocol IPv6 as it decapsulates (Linux 6.3;
// newer than the uapi headers the build may have).
#define ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)

#define GUE_PRIMARY_LEN 4
#define GUE_HEADER_LEN 8
#define GUE_HEADER_LEN_WITH_MAC 16

// Counts the verdict and lets the datagram go on: one that fails a check is never carried here,
// and the user-space path drops and counts it as it always has (so no drop is counted where no
// agent reads it, before an agent's restart or after it).
static __always_inline int count(enum verdict v)
{
	__u32 k = v;
	__u64 *n = bpf_map_lookup_elem(&kw_ingress_verdicts, &k);
	if (n)
		*n += 1;
	return TC_ACT_OK;
}

// The transport header's checks, as keyway_core::packet::transport: `l4len` bytes of transport
// `proto` at `l4`. Returns -1 when they are malformed, else 0.
static __always_inline int transport_ok(__u8 proto, __u8 *l4, __u32 l4len, void *end)
{
	switch (proto) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		return l4len < 4 ? -1 : 0;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		// As the engine: echo request and reply (ICMPv6's too, whatever the IP version) carry
		// an identifier, so need 6 bytes; any other ICMP type 4.
		if (l4len < 4)
			return -1;
		if (!HAVE(l4, 1, end))
			return -1;
		if (proto == IPPROTO_ICMP && (l4[0] == 8 || l4[0] == 0) && l4len < 6)
			return -1;
		if (proto == IPPROTO_ICMPV6 && (l4[0] == 128 || l4[0] == 129) && l4len < 6)
			return -1;
		return 0;
	default:
		return 0;
	}
}

// The inner IPv4 packet's checks, as keyway_core::packet::classify_v4 and transport: `len` is
// the bytes after the GUE header. Returns -1 when the packet is malformed, else 0 with the inner
// destination (network order) in *dst.
static __always_inline int classify_v4(__u8 *pkt, __u32 len, void *end, __u32 *dst)
{
	if (len < 20 || !HAVE(pkt, 20, end))
		return -1;
	__u32 ihl = (pkt[0] & 0x0f) * 4;
	if (ihl < 20 || len < ihl)
		return -1;
	__u32 total = ((__u32)pkt[2] << 8) | pkt[3];
	if (total < ihl || len < total)
		return -1;
	__u16 frag = (((__u16)pkt[6] << 8) | pkt[7]) & 0x1fff;
	*dst = *(__u32 *)(pkt + 16);
	if (frag != 0)
		return 0;
	return transport_ok(pkt[9], pkt + (ihl & 0x3c), total - ihl, end);
}

// The inner IPv6 packet's checks, as keyway_core::packet::classify_v6 and transport, for a packet
// whose transport header follows the fixed header. Returns -1 when the packet is malformed, 1
// when extension headers follow (the kernel does not walk them: the user-space path judges such
// a packet whole), else 0 with the inner destination in dst.
static __always_inline int classify_v6(__u8 *pkt, __u32 len, void *end, __u32 dst[4])
{
	if (len < IPV6_HEADER_LEN || !HAVE(pkt, IPV6_HEADER_LEN, end))
		return -1;
	__u32 payload = ((__u32)pkt[4] << 8) | pkt[5];
	if (len < IPV6_HEADER_LEN + payload)
		return -1;
	__u8 next = pkt[6];
	// Hop-by-hop, routing, fragment and destination options.
	if (next == 0 || next == 43 || next == 44 || next == 60)
		return 1;
	__builtin_memcpy(dst, pkt + 24, 16);
	return transport_ok(next, pkt + IPV6_HEADER_LEN, payload, end);
}

// The most the ingress program reads: Ethernet, outer IPv4 with options, UDP, GUE with the MAC,
// the inner IPv6 header (an inner IPv4 header is not fast with options), TCP's fixed header.
#define HEADERS_LEN (14 + 60 + 8 + 16 + IPV6_HEADER_LEN + 20)

// Counts a packet the fast path carried: a GSO packet as the `segs` segments it becomes (read
// before bpf_skb_adjust_room, which has the kernel count them again later).
static __always_inline void carried(enum carried what, __u32 segs, __u64 bytes)
{
	__u32 k = what;
	__u64 *n = bpf_map_lookup_elem(&kw_carried, &k);
	if (n)
		*n += segs > 1 ? segs : 1;
	k = what + 1;
	n = bpf_map_lookup_elem(&kw_carried, &k);
	if (n)
		*n += bytes;
}

// The node's compiled policy, when the endpoint may judge by it: leased, with a SaP, in force
// and complete (policy.h). NULL otherwise.
static __always_inline struct node_config *policy_on(void)
{
	struct node_config *node = leased(1);
	return node && node->policy_gen && (node->policy_flags & POLICY_COMPLETE) ? node : NULL;
}

// What a packet the compiled policy judges can be, as the engine's flow table sees it.
#define OPENS 1                 // a TCP SYN without ACK, an echo request: an opening, never a reply
#define REPLIES 2               // a TCP segment past the SYN, an echo reply: a reply, or nothing here
#define EITHER 3                // a UDP datagram: a reply within a flow the other way, else an opening

// The flow of an inner IPv4 packet the compiled policy judges: TCP (a SYN too, never a RST: the
// engine must see a connection end), UDP or an ICMP echo request or reply, without options, not
// a fragment. Returns -1 for anything else, else 0 with *kind. The flow is as the fast path
// caches it (fast_flow4: an echo's type stands for its destination port); conn_key gives the
// connection's.
//
// An echo reply that replies within no connection here opens nothing either: the engine admits
// one policy allows as a flow of its own (kw_engine_flows copies UDP's alone), which is rare
// enough to leave to it.
//
// Why a TCP segment past the SYN opens nothing here: the engine takes it for a reply when it
// holds the flow the other way, which the peer may have opened on the user-space path, unknown
// to the kernel. Were the kernel to record it as an opening of the pod's, it would let the
// peer's packets in as replies whatever policy says of them. A UDP datagram can be either, so the
// kernel opens a flow on one only when it knows the engine holds no flow it replies within
// (engine_may_hold_reverse).
static __always_inline int compiled_flow4(__u8 *pkt, void *end, struct flow4 *f, int *kind)
{
	if (!HAVE(pkt, 20, end) || pkt[0] != 0x45 ||
	    ((((__u16)pkt[6] << 8) | pkt[7]) & 0x3fff) != 0 ||
	    (pkt[9] != IPPROTO_TCP && pkt[9] != IPPROTO_UDP && pkt[9] != IPPROTO_ICMP))
		return -1;
	__u8 proto = pkt[9];
	__u8 *l4 = pkt + 20;
	if (fast_l4(proto, l4, end, IPPROTO_ICMP, ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY, 1, &f->sport,
		    &f->dport) < 0)
		return -1;
	if (proto == IPPROTO_UDP) {
		*kind = EITHER;
	} else if (proto == IPPROTO_ICMP) {
		// (fast_l4 took an echo request or reply alone.)
		*kind = l4[0] == ICMP_ECHO_REQUEST ? OPENS : REPLIES;
	} else {
		if (!HAVE(l4, 20, end) || (l4[13] & TCP_FLAG_RST))
			return -1;
		*kind = (l4[13] & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN ? OPENS : REPLIES;
	}
	f->src = *(__u32 *)(pkt + 12);
	f->dst = *(__u32 *)(pkt + 16);
	f->proto = proto;
	f->pad[0] = f->pad[1] = f->pad[2] = 0;
	return 0;
}

static __always_inline struct flow4 reversed(struct flow4 *f)
{
	struct flow4 r = {
		.src = f->dst,
		.dst = f->src,
		.sport = f->dport,
		.dport = f->sport,
		.proto = f->proto,
	};
	return r;
}

// The key of the connection the packet of flow `f` (as compiled_flow4 gives it) opens or belongs
// to, as the engine's flow table keys it (keyway_core::flow::FlowKey): an echo's identifier
// stands for both its ports, so that a request and its reply key one connection, each its way.
static __always_inline struct flow4 conn_key(struct flow4 *f)
{
	struct flow4 k = *f;
	if (f->proto == IPPROTO_ICMP)
		k.dport = f->sport;
	return k;
}

// The connection `f` is a reply within, opened the other way (`inbound`: by the peer), when `f`
// can be a reply at all.
static __always_inline struct conn *reply_to(struct flow4 *f, int kind, int inbound)
{
	if (kind == OPENS)
		return NULL;
	struct flow4 k = conn_key(f);
	struct flow4 r = reversed(&k);
	struct conn *c = bpf_map_lookup_elem(&kw_conns, &r);
	return c && ((c->flags & CONN_INBOUND) != 0) == inbound ? c : NULL;
}

// Whether the engine may hold a flow that the UDP datagram `f` replies within: its copy here
// holds one, or is not whole (kw_engine_flows). The engine would then admit `f` as that reply
// and track nothing of it; only it can tell.
static __always_inline int engine_may_hold_reverse(struct flow4 *f)
{
	struct flow4 whole = {};
	if (!bpf_map_lookup_elem(&kw_engine_flows, &whole))
		return 1;
	struct flow4 r = reversed(f);
	return bpf_map_lookup_elem(&kw_engine_flows, &r) != NULL;
}

// Whether a packet of `kind` that replies within no connection the kernel holds, and that policy
// allows (`allowed`) or not, opens one here.
static __always_inline int opens_here(struct flow4 *f, int kind, int allowed)
{
	return allowed && (kind == OPENS || (kind == EITHER && !engine_may_hold_reverse(f)));
}

// Records a packet the compiled policy admitted: as the reply within `reply`, or as one of its
// own connection `f` (opened now, or refreshed), from `outer_src` when it arrived (`inbound`).
static __always_inline void admitted(struct conn *reply, struct flow4 *f, __u32 outer_src,
				     int inbound, __u64 now)
{
	if (reply) {
		reply->seen_ns = now;
		reply->flags |= CONN_ANSWERED;
		return;
	}
	struct flow4 k = conn_key(f);
	struct conn *c = bpf_map_lookup_elem(&kw_conns, &k);
	if (c) {
		c->seen_ns = now;
		return;
	}
	struct conn fresh = {
		.seen_ns = now,
		.outer_src = outer_src,
		.flags = inbound ? CONN_INBOUND : 0,
	};
	bpf_map_update_elem(&kw_conns, &k, &fresh, BPF_ANY);
}

static __always_inline void count_compiled(__u32 segs)
{
	__u32 k = C_COMPILED;
	__u64 *n = bpf_map_lookup_elem(&kw_carried, &k);
	if (n)
		*n += segs > 1 ? segs : 1;
}

// The endpoint's ingress check by the compiled policy (keyway_core::engine::endpoint_ingress,
// after the key and the destination, which kw_ingress has checked) on an inner IPv4 packet at
// `pkt` from `outer_src`: the inner source's route, the outer source may speak for it, and the
// packet is an opening policy allows, or replies within a connection the pod opened here. On
// success the kernel tracks it (kw_conns) and caches the flow (kw_ingress_flows) as the
// engine's loop would, and returns 0; -1 for anything else, which the user-space path judges.
static __always_inline int ingress_compiled(__u32 outer_src, __u8 *pkt, void *end)
{
	struct node_config *node = policy_on();
	if (!node)
		return -1;
	__u32 gen = node->policy_gen;
	struct ingress_flow_key k = {.outer_src = outer_src};
	int kind;
	if (compiled_flow4(pkt, end, &k.inner, &kind) < 0)
		return -1;
	struct sap_route *src = route_of(k.inner.src, gen);
	struct sap_route *dst = route_of(k.inner.dst, gen);
	if (!src || !dst || !(dst->flags & ROUTE_FRONTED))
		return -1;
	if (!((!(src->flags & ROUTE_OUTSIDE) && src->infra_v4 == outer_src) ||
	      (src->sap_v4 && src->sap_v4 == outer_src) || node->sap_v4 == outer_src))
		return -1;
	// The reply test first, as the engine's: a reply is never a connection of its own.
	struct conn *reply = reply_to(&k.inner, kind, 0);
	if (!reply && !opens_here(&k.inner, kind,
				  pair_allows(gen, src->identity, dst->identity, k.inner.proto,
					      bpf_ntohs(k.inner.dport))))
		return -1;
	__u64 now = bpf_ktime_get_ns();
	admitted(reply, &k.inner, outer_src, 1, now);
	struct ingress_flow seen = {.seen_ns = now};
	bpf_map_update_elem(&kw_ingress_flows, &k, &seen, BPF_ANY);
	return 0;
}

// aya names a tc classifier's section "classifier" (libbpf accepts it too).
SEC("classifier")
int kw_ingress(struct __sk_buff *skb)
{
	// Every header the program reads must be in the linear part: a large datagram (a GSO one
	// above all) may keep its payload in pages.
	__u32 want = HEADERS_LEN;
	if (want > skb->len)
		want = skb->len;
	if ((long)skb->data_end - (long)skb->data < want)
		bpf_skb_pull_data(skb, want);
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u32 zero = 0;
	struct endpoint_config *cfg = bpf_map_lookup_elem(&kw_config, &zero);
	if (!cfg)
		return TC_ACT_OK;

	// The outer headers: what is not IPv4/UDP to the pod's GUE port, whole, is not ours to judge.
	struct ethhdr *eth = data;
	if (!HAVE(eth, sizeof(*eth), end) || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	struct iphdr *ip = (void *)(eth + 1);
	if (!HAVE(ip, sizeof(*ip), end) || ip->ihl < 5 || ip->protocol != IPPROTO_UDP)
		return TC_ACT_OK;
	if (ip->frag_off & bpf_htons(0x3fff))
		return TC_ACT_OK;
	struct udphdr *udp = (void *)ip + ip->ihl * 4;
	if (!HAVE(udp, sizeof(*udp), end) || udp->dest != (__u16)cfg->gue_port)
		return TC_ACT_OK;
	__u32 ulen = bpf_ntohs(udp->len);
	if (ulen < sizeof(*udp) || ulen > skb->len - ((long)udp - (long)data))
		return TC_ACT_OK;
	__u8 *gue = (void *)(udp + 1);
	__u32 glen = ulen - sizeof(*udp);

	// GUE, as keyway_core::gue::decode.
	if (glen < GUE_PRIMARY_LEN || !HAVE(gue, GUE_PRIMARY_LEN, end))
		return count(V_MALFORMED);
	if ((gue[0] >> 6) != 0 || (gue[0] & 0x20))
		return count(V_MALFORMED);
	__u8 hlen = gue[0] & 0x1f;
	__u16 flags = ((__u16)gue[2] << 8) | gue[3];
	if (flags != GUE_FLAG_GROUP_ID)
		return count(V_MALFORMED);
	__u32 header_len;
	if (hlen == 1)
		header_len = GUE_HEADER_LEN;
	else if (hlen == 3)
		header_len = GUE_HEADER_LEN_WITH_MAC;
	else
		return count(V_MALFORMED);
	if (glen < header_len)
		return count(V_MALFORMED);
	// (Implied by the UDP length check above; the verifier wants it said.)
	if (!HAVE(gue, GUE_HEADER_LEN, end))
		return count(V_MALFORMED);
	__u8 proto = gue[1];
	if (proto != PROTO_IPV4 && proto != PROTO_IPV6)
		return count(V_MALFORMED);
	if (glen <= header_len)
		return count(V_MALFORMED);
	__u8 *inner = gue + (header_len & 0x18);
	if (!HAVE(inner, 1, end))
		return count(V_MALFORMED);
	__u8 version = inner[0] >> 4;
	if (version != (proto == PROTO_IPV4 ? 4 : 6))
		return count(V_MALFORMED);
	__u32 key = ((__u32)gue[4] << 24) | ((__u32)gue[5] << 16) | ((__u32)gue[6] << 8) | gue[7];
	__u32 inner_len = glen - header_len;

	// The inner packet, and whether its destination is the pod's own: its IPv4 overlay address
	// or its pod IP, or its IPv6 overlay address.
	__u32 dst4 = 0;
	__u32 dst6[4] = {};
	int parsed = version == 4 ? classify_v4(inner, inner_len, end, &dst4)
				  : classify_v6(inner, inner_len, end, dst6);
	if (parsed < 0)
		return count(V_MALFORMED);
	if (parsed > 0)
		return count(V_PASS);

	// The key: one the pod accepts now (the agent keeps the set current across epochs).
	__u32 n = cfg->nkeys;
	int ok = (n > 0 && cfg->keys[0] == key) || (n > 1 && cfg->keys[1] == key) ||
		 (n > 2 && cfg->keys[2] == key);
	if (!ok)
		return count(V_BAD_KEY);
	int own = version == 4 ? dst4 != 0 && (dst4 == cfg->overlay_v4 || dst4 == cfg->infra_v4)
			       : own_v6(cfg, dst6);
	if (!own)
		return count(V_WRONG_DESTINATION);
	count(V_PASS);

	// The fast path: a flow the engine admitted from this outer source, in a datagram without
	// a MAC, whose outer header is exactly ENCAP_LEN long, and which is one datagram holding one
	// inner packet, exactly. (A UDP GSO packet from a user-space sender holds many datagrams
	// behind one header: the socket takes those apart, the user-space path has them.)
	if (!fast_on(cfg) || header_len != GUE_HEADER_LEN || ip->ihl != 5)
		return TC_ACT_OK;
	if (ulen != skb->len - ((long)udp - (long)data))
		return TC_ACT_OK;
	struct ingress_flow *flow;
	__u32 tun;
	__u64 decap = BPF_F_ADJ_ROOM_FIXED_GSO;
	int compiled = 0;
	if (version == 4) {
		tun = cfg->tun_ifindex;
		if (!HAVE(inner, 4, end) || (((__u32)inner[2] << 8) | inner[3]) != inner_len ||
		    tun == 0)
			return TC_ACT_OK;
		struct ingress_flow_key k = {.outer_src = ip->saddr};
		flow = NULL;
		if (fast_flow4(inner, end, &k.inner) == 0)
			flow = bpf_map_lookup_elem(&kw_ingress_flows, &k);
		if (!flow) {
			if (ingress_compiled(ip->saddr, inner, end) < 0)
				return TC_ACT_OK;
			compiled = 1;
		}
	} else {
		struct ingress_flow_key6 k = {.outer_src = ip->saddr};
		if (fast_flow6(inner, end, &k.inner) < 0)
			return TC_ACT_OK;
		if (!HAVE(inner, 6, end) ||
		    (((__u32)inner[4] << 8) | inner[5]) + IPV6_HEADER_LEN != inner_len)
			return TC_ACT_OK;
		flow = bpf_map_lookup_elem(&kw_ingress6, &k);
		if (!flow)
			return TC_ACT_OK;
		tun = cfg->tun6_ifindex;
		// The skb's protocol becomes the inner packet's, which the overlay device's receive
		// path dispatches on.
		decap |= ADJ_ROOM_DECAP_L3_IPV6;
	}
	// (An IPv4 packet is here with its flow, or admitted by the compiled policy; an IPv6 one
	// with its flow.)
	if (tun == 0)
		return TC_ACT_OK;
	__u32 segs = skb->gso_segs;
	// FIXED_GSO: a GSO packet's inner segments keep their size; only the headers go.
	if (bpf_skb_adjust_room(skb, -ENCAP_LEN, BPF_ADJ_ROOM_MAC, decap))
		return TC_ACT_OK;
	if (compiled)
		count_compiled(segs);
	else if (flow)
		flow->seen_ns = bpf_ktime_get_ns();
	carried(C_INGRESS_PACKETS, segs, inner_len);
	return bpf_redirect(tun, BPF_F_INGRESS);
}

// The endpoint's egress check by the compiled policy (keyway_core::engine::endpoint_egress) on
// an IPv4 packet the pod sends, then its encapsulation: the source is the pod's own, the routes
// of both ends, the packet is an opening policy allows or replies within a connection the peer
// opened here; the destination's key and next hop as the engine chooses them (straight to a
// direct pair's peer or one with no SaP; to the SaP that fronts it, whose check is made here
// when it is this node's, as the engine makes it in process). On success the kernel tracks it
// (kw_conns), caches the flow (kw_egress_flows) as the engine's loop would, and sends it;
// anything else goes on to the TUN device and the user-space path, which judges it.
static __always_inline int egress_compiled(struct __sk_buff *skb, struct endpoint_config *cfg,
					   void *data, void *end)
{
	struct node_config *node = policy_on();
	if (!node)
		return TC_ACT_OK;
	__u32 gen = node->policy_gen;
	struct flow4 f;
	int kind;
	if (compiled_flow4(data, end, &f, &kind) < 0)
		return TC_ACT_OK;
	if (f.src != cfg->overlay_v4 && f.src != cfg->infra_v4)
		return TC_ACT_OK;
	struct sap_route *src = route_of(f.src, gen);
	struct sap_route *dst = route_of(f.dst, gen);
	if (!src || !dst || !(src->flags & ROUTE_FRONTED) || (dst->flags & ROUTE_OUTSIDE) ||
	    !dst->send_key)
		return TC_ACT_OK;
	struct sap_pair *pair = pair_of(gen, src->identity, dst->identity);
	if (pair && (pair->flags & PAIR_UNKNOWN))
		return TC_ACT_OK;
	__u16 sport = bpf_ntohs(f.sport);
	__u16 dport = bpf_ntohs(f.dport);
	struct conn *reply = reply_to(&f, kind, 1);
	int allowed = pair_allows(gen, src->identity, dst->identity, f.proto, dport);
	if (!reply && !opens_here(&f, kind, allowed))
		return TC_ACT_OK;
	__u32 to = dst->infra_v4;
	__u32 to_port = dst->infra_port;
	if (dst->sap_v4 && !(pair && (pair->flags & PAIR_DIRECT))) {
		if (dst->sap_v4 == node->sap_v4 && (__u16)dst->sap_port == (__u16)node->gue_port) {
			// This node's SaP: its check, here (engine::sap_checks from the pod's address).
			if ((src->flags & ROUTE_OUTSIDE) || src->infra_v4 != cfg->infra_v4 ||
			    (dst->flags & ROUTE_TO_SAP))
				return TC_ACT_OK;
			if (!allowed && (!reply || !pair_allows(gen, dst->identity, src->identity,
								f.proto, sport)))
				return TC_ACT_OK;
		} else {
			to = dst->sap_v4;
			to_port = dst->sap_port;
		}
	}
	if (!encap_fits(f.proto, skb->gso_segs, skb->len))
		return TC_ACT_OK;
	__u64 inner_len = skb->len;
	__u32 segs = skb->gso_segs;
	__u32 key = dst->send_key;
	int e = encap4(skb, PROTO_IPV4, cfg->infra_v4, (__u16)cfg->gue_port, to, (__u16)to_port,
		       key);
	if (e == -1)
		return TC_ACT_OK;
	if (e)
		return TC_ACT_SHOT;
	__u64 now = bpf_ktime_get_ns();
	admitted(reply, &f, 0, 0, now);
	struct egress_flow cached = {
		.to_v4 = to,
		.to_port = to_port,
		.key = key,
		.seen_ns = now,
	};
	bpf_map_update_elem(&kw_egress_flows, &f, &cached, BPF_ANY);
	count_compiled(segs);
	carried(C_EGRESS_PACKETS, segs, inner_len);
	return bpf_redirect_neigh(cfg->eth_ifindex, NULL, 0, 0);
}

// On the overlay device's egress: the packet as the pod's stack sends it, starting at its IPv4
// header (a TUN device has no link-layer header).
SEC("classifier")
int kw_egress(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct endpoint_config *cfg = bpf_map_lookup_elem(&kw_config, &zero);
	if (!cfg || !fast_on(cfg) || cfg->eth_ifindex == 0 || cfg->infra_v4 == 0)
		return TC_ACT_OK;
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct egress_flow *flow;
	__u8 proto;
	__u8 inner;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct flow4 f;
		flow = NULL;
		if (fast_flow4(data, end, &f) == 0)
			flow = bpf_map_lookup_elem(&kw_egress_flows, &f);
		// Only the pod's own addresses (its overlay address, or its pod IP for traffic to pod
		// IPs and cluster IPs): a forged source meets the engine's anti-spoofing check.
		if (!flow || (f.src != cfg->overlay_v4 && f.src != cfg->infra_v4))
			return egress_compiled(skb, cfg, data, end);
		proto = f.proto;
		inner = PROTO_IPV4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct flow6 f;
		if (fast_flow6(data, end, &f) < 0 || !own_v6(cfg, f.src))
			return TC_ACT_OK;
		flow = bpf_map_lookup_elem(&kw_egress6, &f);
		proto = f.proto;
		inner = PROTO_IPV6;
	} else {
		return TC_ACT_OK;
	}
	if (!flow || !encap_fits(proto, skb->gso_segs, skb->len))
		return TC_ACT_OK;
	__u64 inner_len = skb->len;
	__u32 segs = skb->gso_segs;
	// bpf_redirect_neigh fills in the link-layer header encap4 leaves blank.
	int e = encap4(skb, inner, cfg->infra_v4, (__u16)cfg->gue_port, flow->to_v4,
		       (__u16)flow->to_port, flow->key);
	if (e == -1)
		return TC_ACT_OK;
	if (e)
		return TC_ACT_SHOT;
	flow->seen_ns = bpf_ktime_get_ns();
	carried(C_EGRESS_PACKETS, segs, inner_len);
	return bpf_redirect_neigh(cfg->eth_ifindex, NULL, 0, 0);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
