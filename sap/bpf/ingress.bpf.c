// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// keyway's fast path, first part: the checks an endpoint makes on a GUE datagram arriving on the
// pod's eth0, in the kernel (tc, direct action), before any user-space work.
//
// It decides only what it can decide exactly as the user-space engine does
// (keyway_core::engine::endpoint_ingress, whose order of checks it keeps): a datagram whose GUE
// header or inner IPv4 packet is malformed, whose key the pod does not accept, or whose inner
// destination is not the pod is dropped and counted by reason. Everything else passes on
// unchanged (TC_ACT_OK) to the user-space path, which makes the remaining checks (source, MAC,
// policy) and delivers: an inner IPv6 packet, a datagram that is not GUE to the pod's port, an
// outer fragment. sap/tests/bpf.rs runs both implementations over the same datagrams and
// requires every drop here to be the engine's, with the same reason.
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

// The verdicts, as indices of the drop counters (keep in step with sap/src/io/bpf.rs).
enum verdict {
	V_PASS = 0,             // to the user-space path
	V_MALFORMED = 1,
	V_BAD_KEY = 2,
	V_WRONG_DESTINATION = 3,
	V_MAX = 4,
};

// What the agent tells the program about its pod (one array slot).
struct ingress_config {
	__u32 overlay_v4;       // the pod's IPv4 overlay address, network order (0: none)
	__u32 infra_v4;         // the pod's IPv4 pod IP, network order (0: none): its own too
	__u32 gue_port;         // network order, low 16 bits
	__u32 nkeys;            // how many of `keys` the pod accepts now (0..3)
	__u32 keys[3];          // host order, as GUE's group identifier reads
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ingress_config);
} kw_ingress_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, V_MAX);
	__type(key, __u32);
	__type(value, __u64);
} kw_ingress_verdicts SEC(".maps");

#define GUE_PRIMARY_LEN 4
#define GUE_HEADER_LEN 8
#define GUE_HEADER_LEN_WITH_MAC 16
#define GUE_FLAG_GROUP_ID 0x8000
#define PROTO_IPV4 4
#define PROTO_IPV6 41

static __always_inline int count(enum verdict v)
{
	__u32 k = v;
	__u64 *n = bpf_map_lookup_elem(&kw_ingress_verdicts, &k);
	if (n)
		*n += 1;
	return v == V_PASS ? TC_ACT_OK : TC_ACT_SHOT;
}

// Whether [p, p + n) lies inside the packet.
#define HAVE(p, n, end) ((void *)(p) + (n) <= (end))

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
	__u8 proto = pkt[9];
	*dst = *(__u32 *)(pkt + 16);
	if (frag != 0)
		return 0;
	__u32 l4len = total - ihl;
	__u8 *l4 = pkt + (ihl & 0x3c);
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

// aya names a tc classifier's section "classifier" (libbpf accepts it too).
SEC("classifier")
int kw_ingress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u32 zero = 0;
	struct ingress_config *cfg = bpf_map_lookup_elem(&kw_ingress_config, &zero);
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
	if (ulen < sizeof(*udp) || !HAVE(udp, ulen, end))
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

	// The inner packet: IPv4 here; IPv6 is left to the user-space path for now.
	if (version != 4)
		return count(V_PASS);
	__u32 dst = 0;
	if (classify_v4(inner, glen - header_len, end, &dst) < 0)
		return count(V_MALFORMED);

	// The key: one the pod accepts now (the agent keeps the set current across epochs).
	__u32 n = cfg->nkeys;
	int ok = (n > 0 && cfg->keys[0] == key) || (n > 1 && cfg->keys[1] == key) ||
		 (n > 2 && cfg->keys[2] == key);
	if (!ok)
		return count(V_BAD_KEY);
	// The destination: one of the pod's own addresses (its overlay address or its pod IP).
	if (dst == 0 || (dst != cfg->overlay_v4 && dst != cfg->infra_v4))
		return count(V_WRONG_DESTINATION);
	return count(V_PASS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
