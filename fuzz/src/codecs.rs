//! The upstream codecs: what a proxy or a client sends us, parsed without I/O.

use std::net::IpAddr;

use hickory_proto::op::Message;
use hickory_proto::rr::RData;
use tungate_upstream::dns::{Answer, FakeIp, answer, default_fake_ip_ranges};
use tungate_upstream::http::codec::parse_head;
use tungate_upstream::sniff::{MAX_SNIFF, Sniffed, sniff as sniff_name};
use tungate_upstream::socks5::codec::{self, Command, RelayDatagram};

/// SOCKS5 replies and UDP relay datagrams. An accepted reply must have needed every byte
/// it consumed (each shorter prefix is "incomplete": the client reads byte runs and parses
/// again) and must say what `request` would encode for the same address; an accepted
/// relay datagram must re-encode to its own bytes.
pub fn socks5(data: &[u8]) {
    if let Ok(Some((target, n))) = codec::parse_reply(data) {
        assert!(n <= data.len(), "consumed {n} of {} bytes", data.len());
        for k in 0..n {
            assert_eq!(codec::parse_reply(&data[..k]), Ok(None), "a {k}-byte prefix of a {n}-byte reply");
        }
        // A name longer than 255 bytes cannot come out of a one-byte length.
        let encoded = codec::request(Command::Connect, &target).expect("a parsed address re-encodes");
        assert_eq!(&encoded[3..], &data[3..n], "the reply's address re-encodes to its own bytes");
    }
    match codec::parse_udp(data) {
        Ok(RelayDatagram::Whole { from, payload }) => {
            let encoded = codec::udp_datagram(&from, payload).expect("a parsed address re-encodes");
            assert_eq!(&encoded[3..], &data[3..], "the datagram re-encodes to its own bytes");
        }
        Ok(RelayDatagram::Fragment) => assert_ne!(data[2], 0, "only FRAG != 0 is a fragment"),
        Err(_) => {}
    }
}

/// An HTTP CONNECT response head. The connector reads the head a byte at a time and asks
/// again after each, so no prefix of a complete head may be malformed or complete.
pub fn http_head(data: &[u8]) {
    let Ok(Some(head)) = parse_head(data) else { return };
    assert!(head.len <= data.len(), "a head of {} bytes in {} bytes", head.len, data.len());
    assert_eq!(parse_head(&data[..head.len]), Ok(Some(head.clone())), "the head alone parses the same");
    // Every prefix would be quadratic; 64 spread over the head, and the last, catch a
    // parser that completes or fails early.
    let step = (head.len / 64).max(1);
    for k in (0..head.len).step_by(step).chain([head.len - 1]) {
        assert_eq!(parse_head(&data[..k]), Ok(None), "a {k}-byte prefix of a {}-byte head", head.len);
    }
}

/// A DNS query answered from the fake-IP pools: a reply parses, keeps the query's id and
/// question, and its address maps back to the asked name.
pub fn dns(data: &[u8]) {
    let fake = FakeIp::new(&default_fake_ip_ranges()).expect("the default pools");
    let Answer::Reply(reply) = answer(data, &fake, 60) else { return };
    let query = Message::from_vec(data).expect("only a parsable query is answered");
    let reply = Message::from_vec(&reply).expect("the reply parses");
    assert_eq!(reply.metadata.id, query.metadata.id, "the reply keeps the query's id");
    assert_eq!(reply.queries, query.queries, "the reply repeats the question");
    let asked = query.queries[0].name().to_lowercase().to_ascii();
    let asked = asked.strip_suffix('.').unwrap_or(&asked).to_owned();
    assert!(reply.answers.len() <= 1, "one address per question");
    for record in &reply.answers {
        let ip = match record.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            ref other => panic!("an answer that is not an address: {other:?}"),
        };
        assert!(fake.contains(ip), "{ip} is in a fake-IP pool");
        assert_eq!(fake.lookup(ip).as_deref(), Some(asked.as_str()), "{ip} maps back to the asked name");
    }
}

/// TLS server names and HTTP Host headers: a name is a lower-case host name (never an
/// address, never arbitrary bytes), "need more" always asks for more than is there, and a
/// TLS record is judged by its own bytes (what follows it changes nothing).
pub fn sniff(data: &[u8]) {
    let got = sniff_name(data);
    match &got {
        Sniffed::NeedMore(n) => {
            assert!(*n > data.len(), "asked for {n} with {} bytes there", data.len());
            assert!(*n <= MAX_SNIFF, "asked for {n}, past the sniff bound");
        }
        Sniffed::Name(name, _) => {
            assert!(!name.is_empty() && name.len() <= 253, "name length {}", name.len());
            assert!(
                name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b)),
                "not a lower-case host name: {name:?}"
            );
            assert!(name.parse::<IpAddr>().is_err(), "an address passed for a name: {name}");
        }
        Sniffed::Nothing => {}
    }
    if data.first() == Some(&0x16) && data.len() >= 5 {
        let total = 5 + usize::from(u16::from_be_bytes([data[3], data[4]]));
        if data.len() > total {
            assert_eq!(sniff_name(&data[..total]), got, "bytes after the record changed the result");
        }
    }
}
