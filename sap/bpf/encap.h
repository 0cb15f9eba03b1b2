// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// Putting an IPv4 or IPv6 packet into keyway's GUE in the kernel, as both places that do it need it: a
// pod's overlay device (kw_egress, from the pod's address) and the node's gateway device
// (kw_gateway, from the SaP's). One function, so that the two cannot write different bytes from
// the engine's (sap/core/src/gue.rs: variant 0, Hlen 1, the group-id flag, the key).

#ifndef KEYWAY_ENCAP_H
#define KEYWAY_ENCAP_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "flow.h"

#define GUE_LEN 8
#define GUE_FLAG_GROUP_ID 0x8000
#define PROTO_IPV4 4
#define PROTO_IPV6 41
// Outer IPv4 (no options), UDP and GUE: what the fast path adds and removes.
#define ENCAP_LEN (20 + 8 + GUE_LEN)
#define IPV4_MAX 65535

static __always_inline __u16 ipv4_checksum(__u16 *h)
{
	__u32 sum = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += h[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

// Whether the fast path may encapsulate a packet of `len` bytes that is a GSO packet of `segs`
// segments of transport `proto`: a GSO packet stays whole where the receiver takes it whole
// (TCP), and only when the outer header's lengths can hold it.
static __always_inline int encap_fits(__u8 proto, __u32 segs, __u32 len)
{
	return segs <= 1 || (proto == IPPROTO_TCP && len <= IPV4_MAX - ENCAP_LEN);
}

// Puts the IP packet at the start of `skb` (no link-layer header: a TUN device's, or an L3
// device's; `inner` PROTO_IPV4 or PROTO_IPV6, as GUE's protocol field says) into GUE with `key`
// (host order), from `saddr`:`sport` to `daddr`:`dport` (network order), over IPv4, and gives it
// a blank Ethernet header of type IPv4 in front. Returns 0, or -1 when the room for the headers
// could not be made (the packet is unchanged then); -2 when it went wrong after that (the packet
// must not go on).
static __always_inline int encap4(struct __sk_buff *skb, __u8 inner, __u32 saddr, __u16 sport,
				  __u32 daddr, __u16 dport, __u32 key)
{
	// FIXED_GSO: a GSO packet's segments were cut for a device whose MTU leaves room for GUE
	// (a pod's kw0, the node's kwgw0), so they only grow by it. The kernel keeps the inner
	// packet's protocol for the segmentation and makes the skb's the outer one (IPv4).
	if (bpf_skb_adjust_room(skb, ENCAP_LEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
					BPF_F_ADJ_ROOM_ENCAP_L4_UDP))
		return -1;
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	if (!HAVE(data, ENCAP_LEN, end))
		return -2;
	struct iphdr *ip = data;
	__u32 total = skb->len;
	ip->version = 4;
	ip->ihl = 5;
	ip->tos = 0;
	ip->tot_len = bpf_htons(total > 0xffff ? 0xffff : total);
	ip->id = 0;
	ip->frag_off = bpf_htons(0x4000); // DF, as the agent's sockets send
	ip->ttl = 64;
	ip->protocol = IPPROTO_UDP;
	ip->check = 0;
	ip->saddr = saddr;
	ip->daddr = daddr;
	ip->check = ipv4_checksum((__u16 *)ip);
	struct udphdr *udp = (void *)(ip + 1);
	udp->source = sport;
	udp->dest = dport;
	udp->len = bpf_htons(total - 20 > 0xffff ? 0xffff : total - 20);
	udp->check = 0; // allowed over IPv4; a GSO packet's segments get their lengths on the way
	__u8 *gue = (void *)(udp + 1);
	gue[0] = 1;             // version 0, C 0, Hlen 1 (the group identifier)
	gue[1] = inner;
	gue[2] = GUE_FLAG_GROUP_ID >> 8;
	gue[3] = 0;
	gue[4] = key >> 24;
	gue[5] = key >> 16;
	gue[6] = key >> 8;
	gue[7] = key;
	if (bpf_skb_change_head(skb, sizeof(struct ethhdr), 0))
		return -2;
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if (!HAVE(eth, sizeof(*eth), end))
		return -2;
	eth->h_proto = bpf_htons(ETH_P_IP);
	return 0;
}

#endif
