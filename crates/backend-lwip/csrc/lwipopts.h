/*
 * tungate's lwIP configuration. lwIP reads this instead of any options file shipped
 * with the sources (the `lwip` crate's own lwipopts.h is never on the include path).
 *
 * lwIP here is a packet engine with no OS: NO_SYS, no timers of its own (the Rust engine
 * calls tcp_tmr() on its own clock and only while PCBs exist), no sockets/netconn,
 * memory from malloc. Only TCP runs inside lwIP; UDP is parsed and built by tungate-core
 * before lwIP sees a packet. Every value below says why it is what it is.
 */
#ifndef TUNGATE_LWIPOPTS_H
#define TUNGATE_LWIPOPTS_H

/* The `lwip` crate's patch set: every packet is accepted regardless of destination, and
 * every SYN goes to the first listening PCB, whose accepted PCBs keep the SYN's
 * destination as their local address and port (the original destination). */
#define TUN2SOCKS 1

/* ---- System ----------------------------------------------------------------------- */
/* One thread (the engine's) owns every PCB; no OS abstraction, no locks. */
#define NO_SYS 1
#define SYS_LIGHTWEIGHT_PROT 0
/* No sys_timeout machinery: the engine calls tcp_tmr() every TCP_TMR_INTERVAL while any
 * PCB exists and sleeps otherwise (lwIP's cyclic timers would wake every 250 ms forever). */
#define LWIP_TIMERS 0
#define LWIP_NETCONN 0
#define LWIP_SOCKET 0
#define LWIP_NETIF_API 0
#define LWIP_STATS 0
#define LWIP_NOASSERT_ON_ERROR 0

/* ---- Memory ----------------------------------------------------------------------- */
/* malloc/free for the heap and for every pool: no fixed arena to size, no pool limit on
 * PCBs, segments or pbufs (the 2000-connection test and MiB windows would need
 * hundreds of MiB of static pools otherwise). Per-flow memory is bounded by the windows. */
#define MEM_LIBC_MALLOC 1
#define MEMP_MEM_MALLOC 1
#define MEM_ALIGNMENT 8
/* Only sizes the PBUF_POOL buffers, which this build never allocates (input pbufs are
 * PBUF_RAM), so kept at its minimum legal value. */
#define PBUF_POOL_SIZE 16

/* ---- Protocols -------------------------------------------------------------------- */
#define LWIP_IPV4 1
#define LWIP_IPV6 1
#define LWIP_TCP 1
#define LWIP_UDP 0          /* UDP never reaches lwIP (tungate-core handles it) */
#define LWIP_RAW 0
#define LWIP_ICMP 0         /* ICMP is counted and dropped before lwIP, like other backends */
#define LWIP_ICMP6 1        /* required by lwIP's IPv6 code; never fed (see above) */
#define LWIP_ARP 0          /* a TUN carries bare IP packets */
#define LWIP_ETHERNET 0
#define LWIP_DHCP 0
#define LWIP_AUTOIP 0
#define LWIP_IGMP 0
#define LWIP_DNS 0
#define LWIP_IPV6_MLD 0
#define LWIP_IPV6_AUTOCONFIG 0
#define LWIP_IPV6_SEND_ROUTER_SOLICIT 0
#define LWIP_IPV6_DUP_DETECT_ATTEMPTS 0
#define LWIP_ND6_QUEUEING 0
#define IP_FORWARD 0
#define IP_REASSEMBLY 0      /* fragments are dropped before lwIP */
#define IP_FRAG 0            /* lwIP never builds a packet larger than the MTU */
#define LWIP_IPV6_REASS 0
#define LWIP_IPV6_FRAG 0
#define IP_DEFAULT_TTL 64
#define LWIP_HAVE_LOOPIF 0
#define LWIP_NETIF_LOOPBACK 0

/* ---- Checksums -------------------------------------------------------------------- */
/* Outgoing packets get real checksums (the kernel verifies what a TUN delivers). Incoming
 * ones are not verified again: they were built in memory by the local kernel, and
 * tungate's engine verifies every SYN and every segment for an unknown flow before they
 * create state (same policy as backend-smoltcp's default). */
#define CHECKSUM_GEN_IP 1
#define CHECKSUM_GEN_TCP 1
#define CHECKSUM_CHECK_IP 0
#define CHECKSUM_CHECK_TCP 0
/* tcp_write(COPY) computes the checksum while copying: one pass over the bytes, not two. */
#define LWIP_CHECKSUM_ON_COPY 1
/* lwIP's fastest portable checksum loop (32-bit accumulation). */
#define LWIP_CHKSUM_ALGORITHM 3

/* ---- TCP -------------------------------------------------------------------------- */
#define LWIP_CALLBACK_API 1
#define LWIP_EVENT_API 0
/* The largest MSS this build can use. The MSS actually advertised and sent is derived at
 * run time from the netif MTU (TCP_CALCULATE_EFF_SEND_MSS): MTU - 40 for IPv4, MTU - 60
 * for IPv6. 15960 = MTU 16000 - 40 covers jumbo frames; it is also the largest value for
 * which lwIP's u16 sanity bound on TCP_SNDLOWAT (0xFFFF - 4 * TCP_MSS) leaves room. */
#define TCP_MSS 15960
#define TCP_CALCULATE_EFF_SEND_MSS 1
/* Window scaling: the receive window is 1 MiB (the kernel sender on a local path needs a
 * window far above 64 KiB; 1 MiB covers tens of Gbit/s at sub-100 us RTT). A 1 MiB
 * window needs scale 5 (0xFFFF << 4 is 16 bytes short of it). */
#define LWIP_WND_SCALE 1
#define TCP_RCV_SCALE 5
#define TCP_WND (1024 * 1024)
/* Send buffer: bytes queued towards the client (in flight plus not yet sent). */
#define TCP_SND_BUF (1024 * 1024)
/* Segments (pbufs) a PCB may queue: enough for TCP_SND_BUF at the smallest MSS (536) with
 * a split pbuf per segment; lwIP's check wants >= 2 * TCP_SND_BUF / TCP_MSS. */
#define TCP_SND_QUEUELEN 8192
/* Only used by netconn's writable event, which this build does not have; set explicitly
 * because lwIP's derived default breaks its own sanity check with MiB send buffers. */
#define TCP_SNDLOWAT 1024
#define TCP_SNDQUEUELOWAT (TCP_SND_QUEUELEN / 2)
/* Out-of-order segments are kept (bounded by the window), and SACK tells the kernel
 * sender which ones arrived, so one lost packet costs one retransmission. */
#define TCP_QUEUE_OOSEQ 1
#define LWIP_TCP_SACK_OUT 1
#define LWIP_TCP_MAX_SACK_NUM 4
/* Coalesce small tcp_write() calls into MSS-sized segments. */
#define TCP_OVERSIZE TCP_MSS
#define TCP_LISTEN_BACKLOG 0  /* the engine admits flows before lwIP sees the SYN */
#define LWIP_TCP_TIMESTAMPS 0
/* 2 * TCP_MSL bounds two states. LAST-ACK: lwIP drops a PCB that has waited that long
 * for the ACK of its FIN, silently. At 1 s it was dropped before its first retransmission
 * (RTO 3 s): a lost FIN, or a reply lost after the client's FIN, was never sent again and
 * the client waited for ever (conformance `lost_reply_after_the_clients_fin`). 30 s gives
 * retransmissions at about 3, 9 and 21 s. TIME-WAIT: lwIP's would last as long, holding
 * a PCB per closed connection (clients cycle ports under load); the engine ends TIME-WAIT
 * itself after 2 s (`Stack::end_time_wait`): a TUN has no stale duplicates in flight. */
#define TCP_MSL 15000UL
/* Keep-alive on every accepted PCB (set by the engine): a client that vanished without
 * FIN or RST is dropped after KEEPIDLE + KEEPCNT * KEEPINTVL = 60 + 6 * 10 s = 120 s,
 * the same bound as backend-smoltcp's timeout. */
#define LWIP_TCP_KEEPALIVE 1
#define TCP_KEEPIDLE_DEFAULT 60000UL
#define TCP_KEEPINTVL_DEFAULT 10000UL
#define TCP_KEEPCNT_DEFAULT 6U
#define TCP_TTL 64

/* ---- Debugging -------------------------------------------------------------------- */
#define LWIP_DEBUG 0

#endif /* TUNGATE_LWIPOPTS_H */
