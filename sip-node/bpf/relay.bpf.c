// SPDX-License-Identifier: GPL-2.0
//
// Kernel forwarding of relayed RTP (the media engine's fast path; see sip-node/src/media/kernel.rs).
//
// A tc classifier on the ingress of the node's media interface. For every IPv4/UDP packet it
// looks up the node socket it is addressed to in `forwards`; an entry exists only for a
// direction of an anchored call that user space has found steady (latched peer, same codec on
// both legs, one input stream). A packet that matches the entry exactly (latched source, RTP
// version 2, the leg's audio payload type, the stream's SSRC, a sequence number inside the
// current segment) is rewritten the way user space would (payload type, sequence number,
// timestamp and SSRC of the outgoing stream; addresses and ports of the other leg; G.711
// μ-law <-> A-law when the legs' codecs differ) and
// redirected out (through the loopback device for a peer on this host, else out of the
// interface the other leg's peer sends in by, the kernel filling in the next hop), without ever
// reaching a socket.
// Everything else (DTMF events, RTCP, strangers, a new SSRC, garbage) goes on to the node's
// sockets unchanged: user space keeps the whole of the relay's logic and installs or removes
// entries as the call changes.
//
// Every rewrite is checksum-neutral: the IP and UDP checksum fields are updated for the
// addresses, ports, RTP header fields and (when transcoding) the payload, so a receiver that
// verifies in software accepts the packet (tested with frames that carry no offload).
//
// Built by sip-node/build.rs with clang when clang is installed; without it the node relays in
// user space only.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int(*name)[val]
#define __type(name, val) typeof(val) *name

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static __u64 (*bpf_ktime_get_ns)(void) = (void *)BPF_FUNC_ktime_get_ns;
static long (*bpf_skb_store_bytes)(struct __sk_buff *skb, __u32 offset, const void *from, __u32 len,
                                   __u64 flags) = (void *)BPF_FUNC_skb_store_bytes;
static long (*bpf_l3_csum_replace)(struct __sk_buff *skb, __u32 offset, __u64 from, __u64 to,
                                   __u64 size) = (void *)BPF_FUNC_l3_csum_replace;
static long (*bpf_l4_csum_replace)(struct __sk_buff *skb, __u32 offset, __u64 from, __u64 to,
                                   __u64 flags) = (void *)BPF_FUNC_l4_csum_replace;
static long (*bpf_redirect)(__u32 ifindex, __u64 flags) = (void *)BPF_FUNC_redirect;
static long (*bpf_redirect_neigh)(__u32 ifindex, void *params, int plen,
                                  __u64 flags) = (void *)BPF_FUNC_redirect_neigh;

#define bswap16(x) __builtin_bswap16(x)
#define bswap32(x) __builtin_bswap32(x)

// Mirrors `ForwardKey` in kernel.rs: the node socket a packet is addressed to (network order;
// addr 0 for a socket bound to 0.0.0.0).
struct forward_key {
    __u32 addr;
    __u16 port;
    __u16 pad;
};

// Mirrors `ForwardEntry` in kernel.rs. Addresses, ports and the SSRCs in network order, the
// offsets and sequence state in host order.
struct forward_entry {
    __u32 peer_addr;      // the latched source of this leg
    __u16 peer_port;
    __u8 in_pt;           // this leg's audio payload type
    __u8 out_pt;          // the other leg's
    __u32 in_ssrc;        // the input stream of the current segment
    __u32 out_ssrc;       // the stream the other leg receives
    __u32 ts_offset;
    __u16 seq_offset;
    __u16 highest_seq;    // highest input sequence number seen (kept up to date here)
    __u32 from_addr;      // the other leg's node socket (0: bound to 0.0.0.0)
    __u32 to_addr;        // the other leg's peer
    __u16 from_port;
    __u16 to_port;
    __u32 last_out_ts;    // output timestamp of the highest packet
    __u32 flags;          // FORWARD_*
    __u32 in_ifindex;     // the interface this leg's peer's packets come in by (kept here)
    __u64 last_ns;        // CLOCK_MONOTONIC of the last packet forwarded
    __u64 packets;
    __u64 bytes;
    __u64 lost;           // sequence gaps
    __u64 late;           // late or duplicate packets (forwarded all the same)
};

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 65536);
    __type(key, struct forward_key);
    __type(value, struct forward_entry);
} forwards SEC(".maps");

// As in media/rtp/stream.rs (StreamRewriter): a jump of this many or more starts a new segment.
#define MAX_DROPOUT 3000
#define MAX_MISORDER 100

#define IP_OFF ETH_HLEN
#define UDP_OFF (ETH_HLEN + sizeof(struct iphdr))
#define RTP_OFF (UDP_OFF + sizeof(struct udphdr))
#define IP_CSUM_OFF (IP_OFF + __builtin_offsetof(struct iphdr, check))
#define UDP_CSUM_OFF (UDP_OFF + __builtin_offsetof(struct udphdr, check))
#define LOOPBACK_IFINDEX 1
// flags
#define FORWARD_LOCAL 1        // the other leg's peer is on this host
#define FORWARD_ULAW_TO_ALAW 2 // transcode the payload
#define FORWARD_ALAW_TO_ULAW 4
// Longest G.711 payload transcoded here (40 ms); longer ones go to user space.
#define MAX_TRANSCODED 320

// G.711 transcoding tables, the same as sip-node/src/media/g711.rs (a unit test in kernel.rs
// compares them).
static const __u8 ulaw_to_alaw[256] = {
    42, 43, 40, 41, 46, 47, 44, 45, 34, 35, 32, 33, 38, 39, 36, 37,
    58, 59, 56, 57, 62, 63, 60, 61, 50, 51, 48, 49, 54, 55, 52, 53,
    11, 8, 9, 14, 15, 12, 13, 2, 3, 0, 1, 6, 7, 4, 5, 26,
    27, 24, 25, 30, 31, 28, 29, 18, 19, 16, 17, 22, 23, 20, 21, 107,
    104, 105, 110, 111, 108, 109, 98, 99, 96, 97, 102, 103, 100, 101, 123, 121,
    126, 127, 124, 125, 114, 115, 112, 113, 118, 119, 116, 117, 75, 73, 79, 77,
    66, 67, 64, 65, 70, 71, 68, 69, 90, 91, 88, 89, 94, 95, 92, 93,
    82, 83, 83, 80, 80, 81, 81, 86, 86, 87, 87, 84, 84, 85, 85, 213,
    170, 171, 168, 169, 174, 175, 172, 173, 162, 163, 160, 161, 166, 167, 164, 165,
    186, 187, 184, 185, 190, 191, 188, 189, 178, 179, 176, 177, 182, 183, 180, 181,
    139, 136, 137, 142, 143, 140, 141, 130, 131, 128, 129, 134, 135, 132, 133, 154,
    155, 152, 153, 158, 159, 156, 157, 146, 147, 144, 145, 150, 151, 148, 149, 235,
    232, 233, 238, 239, 236, 237, 226, 227, 224, 225, 230, 231, 228, 229, 251, 249,
    254, 255, 252, 253, 242, 243, 240, 241, 246, 247, 244, 245, 203, 201, 207, 205,
    194, 195, 192, 193, 198, 199, 196, 197, 218, 219, 216, 217, 222, 223, 220, 221,
    210, 211, 211, 208, 208, 209, 209, 214, 214, 215, 215, 212, 212, 213, 213, 213,
};
static const __u8 alaw_to_ulaw[256] = {
    41, 42, 39, 40, 45, 46, 43, 44, 33, 34, 32, 32, 37, 38, 35, 36,
    57, 58, 55, 56, 61, 62, 59, 60, 49, 50, 47, 48, 53, 54, 51, 52,
    10, 11, 8, 9, 14, 15, 12, 13, 2, 3, 0, 1, 6, 7, 4, 5,
    26, 27, 24, 25, 30, 31, 28, 29, 18, 19, 16, 17, 22, 23, 20, 21,
    98, 99, 96, 97, 102, 103, 100, 101, 93, 93, 92, 92, 95, 95, 94, 94,
    116, 118, 112, 114, 124, 126, 120, 122, 106, 107, 104, 105, 110, 111, 108, 109,
    72, 73, 70, 71, 76, 77, 74, 75, 64, 65, 63, 63, 68, 69, 66, 67,
    86, 87, 84, 85, 90, 91, 88, 89, 79, 79, 78, 78, 82, 83, 80, 81,
    169, 170, 167, 168, 173, 174, 171, 172, 161, 162, 160, 160, 165, 166, 163, 164,
    185, 186, 183, 184, 189, 190, 187, 188, 177, 178, 175, 176, 181, 182, 179, 180,
    138, 139, 136, 137, 142, 143, 140, 141, 130, 131, 128, 129, 134, 135, 132, 133,
    154, 155, 152, 153, 158, 159, 156, 157, 146, 147, 144, 145, 150, 151, 148, 149,
    226, 227, 224, 225, 230, 231, 228, 229, 221, 221, 220, 220, 223, 223, 222, 222,
    244, 246, 240, 242, 252, 254, 248, 250, 234, 235, 232, 233, 238, 239, 236, 237,
    200, 201, 198, 199, 204, 205, 202, 203, 192, 193, 191, 191, 196, 197, 194, 195,
    214, 215, 212, 213, 218, 219, 216, 217, 207, 207, 206, 206, 210, 211, 208, 209,
};

// TC_ACT_UNSPEC: not ours; the next program (tcx) or the stack gets the packet unchanged.
#define PASS TC_ACT_UNSPEC

// The entry of the node socket addr:port, or of a socket bound to 0.0.0.0 on that port.
static __always_inline struct forward_entry *find(__u32 addr, __u16 port) {
    struct forward_key key = {.addr = addr, .port = port, .pad = 0};
    struct forward_entry *e = bpf_map_lookup_elem(&forwards, &key);
    if (!e) {
        key.addr = 0;
        e = bpf_map_lookup_elem(&forwards, &key);
    }
    return e;
}

SEC("classifier")
int relay(struct __sk_buff *skb) {
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != bswap16(ETH_P_IP))
        return PASS;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
        return PASS;
    if (ip->frag_off & bswap16(0x3fff))
        return PASS;
    if (skb->gso_segs > 1)
        return PASS;
    struct udphdr *udp = (void *)(ip + 1);
    __u8 *rtp = (void *)(udp + 1);
    if ((void *)(rtp + 12) > end)
        return PASS;

    struct forward_entry *e = find(ip->daddr, udp->dest);
    if (!e)
        return PASS;
    if (ip->saddr != e->peer_addr || udp->source != e->peer_port)
        return PASS;
    if ((rtp[0] & 0xc0) != 0x80 || (rtp[1] & 0x7f) != e->in_pt)
        return PASS;
    __u32 ssrc;
    __builtin_memcpy(&ssrc, rtp + 8, 4);
    if (ssrc != e->in_ssrc)
        return PASS;
    __u16 seq_be;
    __u32 ts_be;
    __builtin_memcpy(&seq_be, rtp + 2, 2);
    __builtin_memcpy(&ts_be, rtp + 4, 4);
    __u16 seq = bswap16(seq_be);
    __u16 ahead = seq - e->highest_seq;
    if (ahead >= MAX_DROPOUT && ahead <= 0xffff - MAX_MISORDER)
        return PASS; // a jump: user space starts a new segment
    __u16 word0_old = (__u16)rtp[0] | ((__u16)rtp[1] << 8);
    __u16 word0_new = (__u16)rtp[0] | ((__u16)((rtp[1] & 0x80) | e->out_pt) << 8);
    __u32 saddr = ip->saddr, daddr = ip->daddr;
    __u16 sport = udp->source, dport = udp->dest;
    __u32 len = skb->len;

    // A wildcard-bound node socket (from_addr 0) answers from the address the packet came to.
    __u32 from_addr = e->from_addr ? e->from_addr : daddr, to_addr = e->to_addr;
    __u16 from_port = e->from_port, to_port = e->to_port;
    __u32 local = e->flags & FORWARD_LOCAL;
    // Learn where this leg's peer comes in, for the other direction's egress.
    if (e->in_ifindex != skb->ifindex)
        e->in_ifindex = skb->ifindex;
    // Out by the interface the other leg's peer sends in by (symmetric RTP), which that leg's
    // own entry has learnt; until it has, user space sends.
    __u32 out_ifindex = LOOPBACK_IFINDEX;
    if (!local) {
        struct forward_entry *other = find(from_addr, from_port);
        if (!other || !other->in_ifindex)
            return PASS;
        out_ifindex = other->in_ifindex;
    }

    // Transcoding: a plain RTP header (no CSRC, extension or padding) and an even payload of at
    // most MAX_TRANSCODED bytes in the linear part of the packet; anything else is user space's.
    __u32 transcode = e->flags & (FORWARD_ULAW_TO_ALAW | FORWARD_ALAW_TO_ULAW);
    __u32 payload_diff = 0;
    if (transcode) {
        __u32 plen = len - RTP_OFF - 12;
        if (rtp[0] != 0x80 || plen > MAX_TRANSCODED || (plen & 1) || (void *)(rtp + 12 + plen) > end)
            return PASS;
        const __u8 *table = transcode == FORWARD_ULAW_TO_ALAW ? ulaw_to_alaw : alaw_to_ulaw;
        for (__u32 i = 0; i < MAX_TRANSCODED; i += 2) {
            if (i >= plen)
                break;
            __u8 *p = rtp + 12 + i;
            if ((void *)(p + 2) > end)
                break;
            __u16 old_word = (__u16)p[0] | ((__u16)p[1] << 8);
            p[0] = table[p[0]];
            p[1] = table[p[1]];
            __u16 new_word = (__u16)p[0] | ((__u16)p[1] << 8);
            // Ones' complement difference, folded into the UDP checksum below.
            payload_diff += (__u16)~old_word;
            payload_diff += new_word;
        }
    }

    if (ahead != 0 && ahead < MAX_DROPOUT) {
        if (ahead > 1)
            __sync_fetch_and_add(&e->lost, ahead - 1);
        e->highest_seq = seq;
        e->last_out_ts = bswap32(ts_be) + e->ts_offset;
    } else {
        __sync_fetch_and_add(&e->late, 1);
    }
    __u16 out_seq = bswap16((__u16)(seq + e->seq_offset));
    __u32 out_ts = bswap32(bswap32(ts_be) + e->ts_offset);
    __u32 out_ssrc = e->out_ssrc;
    e->last_ns = bpf_ktime_get_ns();
    __sync_fetch_and_add(&e->packets, 1);
    __sync_fetch_and_add(&e->bytes, len - RTP_OFF);

    // Checksums first (they read the old values from the caller), then the new bytes.
    __u64 pseudo = BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0;
    bpf_l3_csum_replace(skb, IP_CSUM_OFF, saddr, from_addr, 4);
    bpf_l3_csum_replace(skb, IP_CSUM_OFF, daddr, to_addr, 4);
    bpf_l4_csum_replace(skb, UDP_CSUM_OFF, saddr, from_addr, pseudo | 4);
    bpf_l4_csum_replace(skb, UDP_CSUM_OFF, daddr, to_addr, pseudo | 4);
    bpf_l4_csum_replace(skb, UDP_CSUM_OFF, sport, from_port, BPF_F_MARK_MANGLED_0 | 2);
    bpf_l4_csum_replace(skb, UDP_CSUM_OFF, dport, to_port, BPF_F_MARK_MANGLED_0 | 2);
    bpf_l4_csum_replace(skb, UDP_CSUM_OFF, word0_old, word0_new, BPF_F_MARK_MANGLED_0 | 2);
    bpf_l4_csum_replace(skb, UDP_CSUM_OFF, seq_be, out_seq, BPF_F_MARK_MANGLED_0 | 2);
    bpf_l4_csum_replace(skb, UDP_CSUM_OFF, ts_be, out_ts, BPF_F_MARK_MANGLED_0 | 4);
    bpf_l4_csum_replace(skb, UDP_CSUM_OFF, ssrc, out_ssrc, BPF_F_MARK_MANGLED_0 | 4);
    if (transcode)
        bpf_l4_csum_replace(skb, UDP_CSUM_OFF, 0, payload_diff, BPF_F_MARK_MANGLED_0);

    bpf_skb_store_bytes(skb, IP_OFF + __builtin_offsetof(struct iphdr, saddr), &from_addr, 4, 0);
    bpf_skb_store_bytes(skb, IP_OFF + __builtin_offsetof(struct iphdr, daddr), &to_addr, 4, 0);
    bpf_skb_store_bytes(skb, UDP_OFF, &from_port, 2, 0);
    bpf_skb_store_bytes(skb, UDP_OFF + 2, &to_port, 2, 0);
    bpf_skb_store_bytes(skb, RTP_OFF, &word0_new, 2, 0);
    bpf_skb_store_bytes(skb, RTP_OFF + 2, &out_seq, 2, 0);
    bpf_skb_store_bytes(skb, RTP_OFF + 4, &out_ts, 4, 0);
    bpf_skb_store_bytes(skb, RTP_OFF + 8, &out_ssrc, 4, 0);
    // A new packet as far as the receiver's timestamps go.
    skb->tstamp = 0;
    if (local) {
        // A peer on this host: through the loopback device, whose Ethernet addresses are 0.
        __u8 zero[2 * ETH_ALEN] = {};
        bpf_skb_store_bytes(skb, 0, zero, sizeof(zero), BPF_F_RECOMPUTE_CSUM);
        return bpf_redirect(LOOPBACK_IFINDEX, 0);
    }
    // The kernel routes the new destination and fills in the Ethernet header from its
    // neighbour table (no FIB lookup here, so IP forwarding need not be enabled).
    return bpf_redirect_neigh(out_ifindex, 0, 0, 0);
}

char LICENSE[] SEC("license") = "GPL";
