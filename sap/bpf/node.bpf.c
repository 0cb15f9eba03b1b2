// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// keyway's kernel fast path at the node: GUE the node routes to one of its pods, handed straight
// to the pod's veth instead of through the primary CNI's bridge.
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

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

struct node_config {
	__u32 gue_port;         // network order, low 16 bits
	__u32 lease_lo;         // until when (bpf_ktime_get_ns) the map may be used
	__u32 lease_hi;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct node_config);
} kw_node_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u32);     // the pod IP, network order
	__type(value, __u32);   // the ifindex of the node side of the pod's veth
} kw_node_pods SEC(".maps");

// Packets and bytes handed to a pod's veth, for `bpftool map dump name kw_node_carried` (the
// agent does not add them to its counters: the pod's own programs count the same packets).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} kw_node_carried SEC(".maps");

#define HAVE(p, n, end) ((void *)(p) + (n) <= (end))

SEC("classifier")
int kw_bridge_egress(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct node_config *cfg = bpf_map_lookup_elem(&kw_node_config, &zero);
	if (!cfg)
		return TC_ACT_OK;
	__u64 lease = ((__u64)cfg->lease_hi << 32) | cfg->lease_lo;
	if (bpf_ktime_get_ns() >= lease)
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
	__u32 *ifindex = bpf_map_lookup_elem(&kw_node_pods, &daddr);
	if (!ifindex)
		return TC_ACT_OK;
	__u32 k = 0;
	__u64 *n = bpf_map_lookup_elem(&kw_node_carried, &k);
	if (n)
		*n += skb->gso_segs > 1 ? skb->gso_segs : 1;
	k = 1;
	n = bpf_map_lookup_elem(&kw_node_carried, &k);
	if (n)
		*n += skb->len;
	return bpf_redirect(*ifindex, 0);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
