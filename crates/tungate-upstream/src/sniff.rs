//! Names from a connection's first bytes, I/O-free: the server name of a TLS
//! ClientHello (parsed with `tls-parser`) and the `Host` of an HTTP/1 request (parsed
//! with `httparse`).
//!
//! [`sniff`] takes the bytes peeked so far and says whether they name a host, name
//! nothing, or how many bytes it needs to tell: a TLS record announces its length, so
//! the caller can wait for exactly that; an HTTP head does not, so it asks for one more.

use tls_parser::{SNIType, TlsExtension, TlsMessage, TlsMessageHandshake};
use tungate_api::NameSource;

/// The most a sniffer reads: one whole TLS record (header and 16 KiB), which also bounds
/// an HTTP request head.
pub const MAX_SNIFF: usize = 5 + (1 << 14);

/// What the first bytes say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// A host name (lower case, no port) and where it came from.
    Name(String, NameSource),
    /// Not enough yet: wait for at least this many bytes in all.
    NeedMore(usize),
    /// Not TLS or HTTP, or they name no host (an IP literal, a ClientHello without SNI).
    Nothing,
}

/// Reads a host name from the start of a client's stream; see the module docs.
pub fn sniff(buf: &[u8]) -> Sniffed {
    match buf.first() {
        None => Sniffed::NeedMore(1),
        // TLS record type "handshake".
        Some(0x16) => tls(buf),
        // HTTP methods are upper-case tokens.
        Some(b) if b.is_ascii_uppercase() => http(buf),
        Some(_) => Sniffed::Nothing,
    }
}

fn tls(buf: &[u8]) -> Sniffed {
    let Some(header) = buf.get(..5) else { return Sniffed::NeedMore(5) };
    let total = 5 + usize::from(u16::from_be_bytes([header[3], header[4]]));
    if total > MAX_SNIFF {
        return Sniffed::Nothing;
    }
    if buf.len() < total {
        return Sniffed::NeedMore(total);
    }
    // A ClientHello split over several records is not reassembled (nor is it in practice
    // sent so: it fits one 16 KiB record).
    let Ok((_, record)) = tls_parser::parse_tls_plaintext(&buf[..total]) else { return Sniffed::Nothing };
    for message in &record.msg {
        let TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)) = message else { continue };
        let Some(Ok((_, extensions))) = hello.ext.map(tls_parser::parse_tls_client_hello_extensions) else {
            return Sniffed::Nothing;
        };
        for extension in extensions {
            let TlsExtension::SNI(names) = extension else { continue };
            for (kind, name) in names {
                if kind == SNIType::HostName {
                    if let Some(name) = std::str::from_utf8(name).ok().and_then(host_name) {
                        return Sniffed::Name(name, NameSource::TlsSni);
                    }
                }
            }
        }
    }
    Sniffed::Nothing
}

fn http(buf: &[u8]) -> Sniffed {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() < MAX_SNIFF => Sniffed::NeedMore(buf.len() + 1),
        Ok(httparse::Status::Complete(_)) => {
            let host = request.headers.iter().find(|h| h.name.eq_ignore_ascii_case("host"));
            match host.and_then(|h| std::str::from_utf8(h.value).ok()).and_then(strip_port).and_then(host_name) {
                Some(name) => Sniffed::Name(name, NameSource::HttpHost),
                None => Sniffed::Nothing,
            }
        }
        _ => Sniffed::Nothing,
    }
}

/// `host[:port]` without the port; `None` for a bracketed IPv6 literal.
fn strip_port(authority: &str) -> Option<&str> {
    let authority = authority.trim();
    if authority.starts_with('[') {
        return None;
    }
    Some(authority.rsplit_once(':').map_or(authority, |(host, _)| host))
}

/// A DNS host name in lower case, or `None` for an IP literal or anything that is not a
/// host name (so a client cannot steer the proxy with arbitrary bytes).
fn host_name(s: &str) -> Option<String> {
    let s = s.strip_suffix('.').unwrap_or(s);
    let valid = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    (valid && s.parse::<std::net::IpAddr>().is_err()).then(|| s.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TLS 1.2-style ClientHello record carrying `name` as its server name (built by
    /// hand, field by field, as RFC 8446 §4.1.2 and RFC 6066 §3 lay it out).
    fn client_hello(name: &str) -> Vec<u8> {
        let n = name.len() as u16;
        let mut sni = Vec::new();
        sni.extend((n + 3).to_be_bytes()); // server_name_list length
        sni.push(0); // host_name
        sni.extend(n.to_be_bytes());
        sni.extend(name.as_bytes());
        let mut extensions = vec![0, 0]; // extension type server_name
        extensions.extend((sni.len() as u16).to_be_bytes());
        extensions.extend(sni);
        let mut body = vec![3, 3];
        body.extend([7u8; 32]); // random
        body.push(0); // no session id
        body.extend([0, 2, 0x13, 0x01]); // one cipher suite
        body.extend([1, 0]); // null compression
        body.extend((extensions.len() as u16).to_be_bytes());
        body.extend(extensions);
        let mut handshake = vec![1]; // client_hello
        handshake.extend(&(body.len() as u32).to_be_bytes()[1..]);
        handshake.extend(body);
        let mut record = vec![0x16, 3, 1];
        record.extend((handshake.len() as u16).to_be_bytes());
        record.extend(handshake);
        record
    }

    #[test]
    fn a_client_hello_names_its_server_once_whole() {
        let record = client_hello("Video.Example.TEST");
        assert_eq!(sniff(&record[..3]), Sniffed::NeedMore(5));
        assert_eq!(
            sniff(&record[..5]),
            Sniffed::NeedMore(record.len()),
            "the record's length is known from its header"
        );
        assert_eq!(sniff(&record[..record.len() - 1]), Sniffed::NeedMore(record.len()));
        assert_eq!(sniff(&record), Sniffed::Name("video.example.test".into(), NameSource::TlsSni));
        let mut with_data = record.clone();
        with_data.extend(b"\x17\x03\x03 more records");
        assert_eq!(sniff(&with_data), Sniffed::Name("video.example.test".into(), NameSource::TlsSni));
    }

    #[test]
    fn http_heads_give_their_host_without_port() {
        let head = b"GET /x HTTP/1.1\r\nUser-Agent: t\r\nHost: web.test:8080\r\n\r\nbody";
        let end = head.len() - 4;
        assert!(matches!(sniff(&head[..end - 1]), Sniffed::NeedMore(n) if n == end));
        assert_eq!(sniff(head), Sniffed::Name("web.test".into(), NameSource::HttpHost));
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n"), Sniffed::Nothing, "an IP is not a name");
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: [fd00::1]:80\r\n\r\n"), Sniffed::Nothing);
        assert_eq!(sniff(b"GET / HTTP/1.0\r\n\r\n"), Sniffed::Nothing, "no Host");
    }

    #[test]
    fn other_protocols_and_garbage_name_nothing() {
        assert_eq!(sniff(b"SSH-2.0-OpenSSH_9.2\r\n"), Sniffed::Nothing);
        assert_eq!(sniff(b"\x00\x01binary"), Sniffed::Nothing);
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"), Sniffed::Nothing);
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: evil\x01.test\r\n\r\n"), Sniffed::Nothing);
        let mut bad = client_hello("x.test");
        bad[7] ^= 0xff; // corrupt the handshake length
        assert_eq!(sniff(&bad), Sniffed::Nothing);
        // Every prefix and every single-byte corruption of a ClientHello: no panic.
        let record = client_hello("x.test");
        for i in 0..record.len() {
            let _ = sniff(&record[..i]);
            let mut c = record.clone();
            c[i] ^= 0x5a;
            let _ = sniff(&c);
        }
    }
}
