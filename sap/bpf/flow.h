// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// What keyway's programs share about the flows the fast path carries: the engine's five-tuple,
// IPv4 and IPv6 (keep in step with Flow4 and Flow6 in sap/src/io/bpf.rs, whose byte layouts the
// maps of both objects are keyed by) and the one test of which inner packets the kernel may
// carry.

#ifndef KEYWAY_FLOW_H
#define KEYWAY_FLOW_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <bpf/bpf_helpers.h>

// Whether [p, p + n) lies inside the packet.
#define HAVE(p, n, end) ((void *)(p) + (n) <= (end))

#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

// An IPv4 flow as the engine classifies it: addresses and ports in network order.
struct flow4 {
	__u32 src;
	__u32 dst;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

// Where and with which key the kernel puts a flow's packets into GUE, as the engine did with the
// flow's first: kw_egress's flows (the pod's own) and kw_gateway's (from off the overlay). Keep
// in step with EgressFlow in sap/src/io/bpf.rs, which reads both maps.
struct egress_flow {
	__u32 to_v4;            // the next hop (the destination's pod IP, or a SaP), network order
	__u32 to_port;          // network order, low 16 bits
	__u32 key;              // the destination's key the engine used, host order
	__u32 pad;
	__u64 seen_ns;          // bpf_ktime_get_ns() of the last packet the kernel carried
};

// An IPv6 flow, likewise: addresses as their 16 bytes, ports in network order.
struct flow6 {
	__u32 src[4];
	__u32 dst[4];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

#define ICMP_ECHO_REPLY 0
#define ICMP_ECHO_REQUEST 8
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY 129
#define IPV6_HEADER_LEN 40

// Whether the transport header at `l4`, of protocol `proto`, is one the kernel parses whole
// (TCP, UDP, or an echo request or reply of `icmp`, the IP version's ICMP, whose echo types are
// `request` and `reply`) — and, unless `openings`, belongs to a flow the fast path may carry (TCP
// that neither opens nor resets a connection: a flow map never holds those; the SaP's compiled
// check judges them) — and its ports, network order: for an echo, its identifier in place of the
// source port and its type and code in place of the destination port. Returns -1 for anything
// else.
static __always_inline int fast_l4(__u8 proto, __u8 *l4, void *end, __u8 icmp, __u8 request,
				   __u8 reply, int openings, __u16 *sport, __u16 *dport)
{
	if (proto == IPPROTO_TCP) {
		if (!HAVE(l4, 20, end) || (!openings && (l4[13] & (TCP_FLAG_SYN | TCP_FLAG_RST))))
			return -1;
	} else if (proto == IPPROTO_UDP) {
		if (!HAVE(l4, 8, end))
			return -1;
	} else if (proto == icmp) {
		if (!HAVE(l4, 8, end) || (l4[0] != request && l4[0] != reply))
			return -1;
	} else {
		return -1;
	}
	if (proto == icmp) {
		*sport = *(__u16 *)(l4 + 4);
		*dport = *(__u16 *)l4;
	} else {
		*sport = *(__u16 *)l4;
		*dport = *(__u16 *)(l4 + 2);
	}
	return 0;
}

// The flow of an inner IPv4 packet at `pkt` that the fast path may carry: no options, not a
// fragment, and a transport fast_l4 takes. Returns -1 for anything else (the user-space path
// takes it).
//
// An echo's flow is its identifier and its type: a request and the reply to it are two flows,
// so that a flow admitted as the reply to the pod's own echo never carries a request, which
// policy must judge.
static __always_inline int fast_flow4(__u8 *pkt, void *end, struct flow4 *f)
{
	if (!HAVE(pkt, 20, end) || pkt[0] != 0x45)
		return -1;
	if (((((__u16)pkt[6] << 8) | pkt[7]) & 0x3fff) != 0)
		return -1;
	if (fast_l4(pkt[9], pkt + 20, end, IPPROTO_ICMP, ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY, 0,
		    &f->sport, &f->dport) < 0)
		return -1;
	f->src = *(__u32 *)(pkt + 12);
	f->dst = *(__u32 *)(pkt + 16);
	f->proto = pkt[9];
	f->pad[0] = f->pad[1] = f->pad[2] = 0;
	return 0;
}

// The same for an inner IPv6 packet: the transport header straight after the fixed header (a
// packet with extension headers, a fragment among them, is the user-space path's).
static __always_inline int fast_flow6(__u8 *pkt, void *end, struct flow6 *f)
{
	if (!HAVE(pkt, IPV6_HEADER_LEN, end) || (pkt[0] >> 4) != 6)
		return -1;
	if (fast_l4(pkt[6], pkt + IPV6_HEADER_LEN, end, IPPROTO_ICMPV6, ICMPV6_ECHO_REQUEST,
		    ICMPV6_ECHO_REPLY, 0, &f->sport, &f->dport) < 0)
		return -1;
	__builtin_memcpy(f->src, pkt + 8, 16);
	__builtin_memcpy(f->dst, pkt + 24, 16);
	f->proto = pkt[6];
	f->pad[0] = f->pad[1] = f->pad[2] = 0;
	return 0;
}

#endif
