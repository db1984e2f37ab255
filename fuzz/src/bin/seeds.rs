//! Writes the hand-made seed inputs of every fuzz target into `corpus/<target>/seed-*`
//! (`cargo run -p tungate-fuzz --bin tungate-fuzz-seeds`). What the fuzzer finds from them
//! is minimised with `cargo fuzz cmin` and committed beside them (`make fuzz`).

use std::net::SocketAddr;
use std::path::Path;

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use smoltcp::wire::TcpControl;
use tungate_core::device::offload::VnetHeader;
use tungate_core::packet::{SegmentFields, build_udp};
use tungate_fuzz::engines::Op;
use tungate_fuzz::engines::seeds::{connection, encode as ops, segment as seg};
use tungate_fuzz::reader::Writer;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("literal")
}

fn udp(from: &str, to: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 80 + payload.len()];
    let n = build_udp(addr(from), addr(to), payload, &mut out).expect("a datagram");
    out.truncate(n);
    out
}

fn segment(from: &str, to: &str, control: TcpControl, seq: u32, ack: Option<u32>, payload: &[u8]) -> Vec<u8> {
    SegmentFields::new(addr(from), addr(to), control, seq, ack).payload(payload).build()
}

fn dns_query(name: &str, kind: RecordType) -> Vec<u8> {
    let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), kind));
    m.to_vec().expect("a query")
}

/// A ClientHello record naming `name` (RFC 8446 §4.1.2, RFC 6066 §3).
fn client_hello(name: &str) -> Vec<u8> {
    let n = name.len() as u16;
    let mut sni = Vec::new();
    sni.extend((n + 3).to_be_bytes());
    sni.push(0);
    sni.extend(n.to_be_bytes());
    sni.extend(name.as_bytes());
    let mut extensions = vec![0, 0];
    extensions.extend((sni.len() as u16).to_be_bytes());
    extensions.extend(sni);
    let mut body = vec![3, 3];
    body.extend([7u8; 32]);
    body.push(0);
    body.extend([0, 2, 0x13, 0x01]);
    body.extend([1, 0]);
    body.extend((extensions.len() as u16).to_be_bytes());
    body.extend(extensions);
    let mut handshake = vec![1];
    handshake.extend(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend(body);
    let mut record = vec![0x16, 3, 1];
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let write = |target: &str, name: &str, bytes: Vec<u8>| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed written");
    };
    let syn4 = segment("198.18.0.2:40000", "10.77.0.2:80", TcpControl::Syn, 1000, None, b"");
    let syn6 = segment("[fd00::2]:40000", "[fd77::2]:443", TcpControl::Syn, 1000, None, b"");
    let data4 =
        segment("198.18.0.2:40000", "10.77.0.2:80", TcpControl::Psh, 1001, Some(5000), b"GET / HTTP/1.1\r\n\r\n");
    let udp4 = udp("198.18.0.2:5353", "10.77.0.2:53", b"hello");
    let udp6 = udp("[fd00::2]:5353", "[fd77::2]:53", b"hello");

    for (name, p) in [("syn4", &syn4), ("syn6", &syn6), ("data4", &data4), ("udp4", &udp4), ("udp6", &udp6)] {
        write("classify", name, p.clone());
    }
    // A TSO super-packet as the kernel hands it with offload: virtio-net header, then one
    // 4 000-byte segment to be cut at 1 460.
    let big = segment("198.18.0.2:40000", "10.77.0.2:80", TcpControl::Psh, 1001, Some(5000), &[0x42; 4000]);
    let vnet = VnetHeader {
        flags: 1,
        gso_type: 1, /* VIRTIO_NET_HDR_GSO_TCPV4 */
        hdr_len: 40,
        gso_size: 1460,
        csum_start: 20,
        csum_offset: 16,
    };
    write("classify", "tso4", [vnet.encode().as_slice(), &big].concat());

    let mut w = Writer::default();
    w.u8(1).bytes(&syn4).u8(0xc0).u8(1).bytes(&data4).u8(1).bytes(&udp4).u8(1).bytes(&syn6).u8(0x80);
    write("admission", "open-accept-reject", w.0);

    write("socks5", "reply-v4", vec![5, 0, 0, 1, 10, 0, 0, 1, 0, 80]);
    write("socks5", "reply-v6", [&[5u8, 0, 0, 4][..], &[0xfd; 16], &[1, 187]].concat());
    write("socks5", "reply-domain", [&[5u8, 0, 0, 3, 12][..], b"example.test", &[0, 80]].concat());
    write("socks5", "udp-v4", [&[0u8, 0, 0, 1, 10, 0, 0, 1, 0, 53][..], b"payload"].concat());
    write("socks5", "udp-domain", [&[0u8, 0, 0, 3, 12][..], b"example.test", &[0, 53], b"payload"].concat());

    write("http_head", "200", b"HTTP/1.1 200 Connection established\r\nProxy-Agent: x\r\n\r\n".to_vec());
    write(
        "http_head",
        "407",
        b"HTTP/1.0 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"p\"\r\n\r\nbody".to_vec(),
    );

    write("dns", "a", dns_query("example.test.", RecordType::A));
    write("dns", "aaaa", dns_query("www.example.test.", RecordType::AAAA));
    write("dns", "mx", dns_query("example.test.", RecordType::MX));

    write("sniff", "tls", client_hello("example.test"));
    write("sniff", "http", b"GET / HTTP/1.1\r\nHost: Example.Test:8080\r\nUser-Agent: x\r\n\r\n".to_vec());

    let mut rejected = vec![seg(1, 0, false, 0, false), Op::Decide { accept: false }, seg(0, 1, true, 0, false)];
    rejected.push(Op::Datagram { client: 1, dst: 0, v6: false, len: 40 });
    rejected.push(Op::Reply { index: 0, len: 100 });
    rejected.push(Op::Datagram { client: 1, dst: 1, v6: true, len: 1200 });
    let mut aborted = connection(false);
    aborted.truncate(5);
    aborted.push(Op::Conn { index: 0, action: 3, n: 0 });
    aborted.push(seg(4, 301, true, 100, false));
    aborted.push(Op::Advance { ms: 60_000 });
    let mut mutated = connection(false);
    if let Op::Segment { mutation, .. } = &mut mutated[3] {
        *mutation = Some((33, 0x12, true));
    }
    mutated.push(Op::Raw { bytes: syn4.clone(), fix: false });
    for target in ["engine_smoltcp", "engine_lwip", "engine_ipstack", "engine_netstack_smoltcp"] {
        write(target, "connection-v4", ops(&connection(false)));
        write(target, "connection-v6", ops(&connection(true)));
        write(target, "rejected-and-udp", ops(&rejected));
        write(target, "aborted", ops(&aborted));
        write(target, "mutated", ops(&mutated));
    }
    println!("seeds written under {}", root.display());
}
