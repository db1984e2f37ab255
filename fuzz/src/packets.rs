//! Packet input before any stack: classification, the offload header and splitter, and
//! admission (the flow table every backend shares).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket};
use tungate_core::admission::{Decided, FlowTable, Inbound, Seen};
use tungate_core::device::offload::{Splitter, VNET_HDR_LEN, VnetHeader};
use tungate_core::packet::{self, Classified, Layout};
use tungate_core::{Dispatch, Mtu, PacketBuf, TcpHandler, TcpRequest, UdpHandler, UdpSession};
use tungate_testkit::mutation::assert_counted_once;

use crate::reader::Reader;

/// The classifier, cross-checked against `Layout` (the header walk the NAT and the stream
/// quirks use on the hot path: both must see the same addresses, ports and flags), then
/// the offload path: a virtio-net header in front of the packet, its metadata and the
/// splitter that cuts super-packets (never panics, never writes past a segment).
pub fn classify(data: &[u8]) {
    if let Ok(Classified::Tcp(seg)) = packet::classify(data) {
        let layout = Layout::tcp(data).expect("a classified TCP segment has a TCP layout");
        let (at, len) = layout.addresses();
        let ip = |bytes: &[u8]| match *bytes {
            [a, b, c, d] => IpAddr::from([a, b, c, d]),
            _ => IpAddr::from(<[u8; 16]>::try_from(bytes).expect("16 bytes")),
        };
        assert_eq!(ip(&data[at..at + len]), seg.src.ip(), "source address");
        assert_eq!(ip(&data[at + len..at + 2 * len]), seg.dst.ip(), "destination address");
        let port = |i: usize| u16::from_be_bytes([data[layout.l4 + i], data[layout.l4 + i + 1]]);
        assert_eq!((port(0), port(2)), (seg.src.port(), seg.dst.port()), "ports");
        let flags = layout.tcp_flags(data).expect("flags");
        let bit = |b: u8| flags & b != 0;
        assert_eq!((bit(0x01), bit(0x02), bit(0x04), bit(0x10)), (seg.fin, seg.syn, seg.rst, seg.ack), "flags");
        let header = layout.tcp_header_len(data).expect("a header length within the packet");
        assert!(seg.payload_len() + header + layout.l4 <= data.len(), "payload within the packet");
    }
    let Some((header, packet)) = data.split_first_chunk::<VNET_HDR_LEN>() else { return };
    let vnet = VnetHeader::decode(header);
    let Some(meta) = vnet.to_meta() else { return };
    assert_eq!(VnetHeader::from_meta(&meta).to_meta(), Some(meta), "the metadata round-trips");
    if meta.gso.is_some() {
        let mut packet = packet.to_vec();
        let capacity = 1500;
        if let Ok(n) = Splitter::default().split(&mut packet, &meta, capacity) {
            assert!(n >= 1, "a split makes at least one segment");
        }
    }
}

/// Collects TCP requests for the test to decide; ignores UDP sessions.
#[derive(Default)]
struct Requests(Mutex<Vec<TcpRequest>>);

impl TcpHandler for Requests {
    fn handle_tcp(&self, request: TcpRequest) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(request);
    }
}

impl UdpHandler for Requests {
    fn handle_udp(&self, session: UdpSession) {
        drop(session);
    }
}

/// Input: operations, each an op byte (bit 7: decide held requests, bit 6 of it:
/// accept; otherwise a packet follows, as `Reader::bytes`, bit 0: make its checksums
/// right). A sequence of packets (checksums optionally made right, so the fuzzer reaches past
/// them) through the flow table, with the handler accepting or rejecting held requests
/// between packets. Each packet is counted once under the heading a look at it predicts;
/// an accepted flow is admitted and later segments of its 4-tuple reach it.
pub fn admission(data: &[u8]) {
    let mut r = Reader::new(data);
    let requests = Arc::new(Requests::default());
    let dispatch = Dispatch::new(requests.clone(), requests.clone());
    let stats = dispatch.stats.clone();
    let mut table: FlowTable<()> = FlowTable::new(&dispatch, Mtu::DEFAULT, 4096);
    let now = Instant::now();
    while !r.is_empty() {
        let op = r.u8();
        if op & 0x80 != 0 {
            // The handler decides every held request: accept or reject, by the op's bit.
            let decided: Vec<TcpRequest> = std::mem::take(&mut *requests.0.lock().unwrap_or_else(|p| p.into_inner()));
            for request in decided {
                if op & 0x40 != 0 {
                    drop(tungate_core::api::tcp::now_or_never(request.accept()));
                } else {
                    request.reject();
                }
            }
            let mut ids = Vec::new();
            table.wake_queue().drain_into(&mut ids);
            for id in ids {
                if let Decided::Accepted(_) = table.decide(id) {
                    table.admit(id, ());
                }
            }
            while table.poll_transmit().is_some() {}
            continue;
        }
        let mut bytes = r.bytes().to_vec();
        if op & 1 != 0 {
            fix_checksums(&mut bytes);
        }
        let packet = PacketBuf::from_slice(&bytes);
        let before = stats.snapshot();
        let inbound = table.inbound(now, &packet);
        assert_counted_once(&before, &stats.snapshot(), &bytes);
        if let Inbound::Tcp(seg, Seen::Admitted(id)) = inbound {
            assert_eq!(table.key(id), Some((seg.src, seg.dst)), "a segment reaches its own flow");
        }
    }
}

/// Makes the IPv4 header checksum and the TCP or UDP checksum right, where the headers
/// parse, so mutated packets get past the checks into the logic behind them.
pub fn fix_checksums(packet: &mut [u8]) {
    let (src, dst, protocol, l4) = match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let Ok(mut ip) = Ipv4Packet::new_checked(&mut *packet) else { return };
            ip.fill_checksum();
            let range = ip.header_len() as usize..ip.total_len() as usize;
            (IpAddress::Ipv4(ip.src_addr()), IpAddress::Ipv4(ip.dst_addr()), ip.next_header(), range)
        }
        Some(6) => {
            let Ok(ip) = Ipv6Packet::new_checked(&*packet) else { return };
            let range = 40..40 + ip.payload_len() as usize;
            (IpAddress::Ipv6(ip.src_addr()), IpAddress::Ipv6(ip.dst_addr()), ip.next_header(), range)
        }
        _ => return,
    };
    let Some(l4) = packet.get_mut(l4) else { return };
    match protocol {
        IpProtocol::Tcp => {
            if let Ok(mut tcp) = TcpPacket::new_checked(l4) {
                tcp.fill_checksum(&src, &dst);
            }
        }
        IpProtocol::Udp => {
            if let Ok(mut udp) = UdpPacket::new_checked(l4) {
                udp.fill_checksum(&src, &dst);
            }
        }
        _ => {}
    }
}
