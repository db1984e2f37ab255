//! The HTTP/1.1 CONNECT request and the proxy's response head, I/O-free. The response is
//! parsed with `httparse`; the request is four lines of text.

use base64::Engine;
use tungate_api::Target;

/// The largest response head accepted from a proxy.
pub const MAX_HEAD: usize = 8192;

/// `CONNECT target HTTP/1.1`, with Basic credentials when given.
pub fn connect_request(target: &Target, credentials: Option<(&str, &str)>) -> Vec<u8> {
    // A SocketAddr's Display brackets IPv6 ("[fd77::2]:80"), as an authority needs.
    let mut out = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some((user, pass)) = credentials {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        out.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// A complete response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub reason: String,
    /// Bytes of the head, including the blank line.
    pub len: usize,
}

/// Why the proxy's response could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("malformed HTTP response from the proxy: {0}")]
    Malformed(String),
    #[error("the proxy's response head is longer than {MAX_HEAD} bytes")]
    TooLong,
}

/// Parses the response head in `buf`: `Ok(None)` while it is incomplete.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, HeadError> {
    // Proxies add headers of their own; 128 is far above what any sends on a CONNECT.
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            Ok(Some(Head { status: response.code.unwrap_or(0), reason: response.reason.unwrap_or("").to_owned(), len }))
        }
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => Err(HeadError::TooLong),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(HeadError::Malformed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_the_authority_and_credentials() {
        let v6 = Target::Addr("[fd77::2]:443".parse().unwrap());
        assert_eq!(connect_request(&v6, None), b"CONNECT [fd77::2]:443 HTTP/1.1\r\nHost: [fd77::2]:443\r\n\r\n");
        let name = Target::Domain { name: "example.test".into(), port: 80 };
        let req = String::from_utf8(connect_request(&name, Some(("Aladdin", "open sesame")))).unwrap();
        assert!(req.starts_with("CONNECT example.test:80 HTTP/1.1\r\n"), "{req}");
        // RFC 7617's example credentials.
        assert!(req.contains("\r\nProxy-Authorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==\r\n\r\n"), "{req}");
    }

    #[test]
    fn heads_parse_incrementally_and_leave_what_follows() {
        let wire = b"HTTP/1.1 200 Connection established\r\nProxy-Agent: x\r\n\r\nSSH-2.0-banner";
        let head_len = wire.len() - "SSH-2.0-banner".len();
        for cut in 0..head_len {
            assert_eq!(parse_head(&wire[..cut]), Ok(None), "cut at {cut}");
        }
        let head = parse_head(wire).unwrap().unwrap();
        assert_eq!((head.status, head.reason.as_str(), head.len), (200, "Connection established", head_len));
        let denied = parse_head(b"HTTP/1.0 407 Proxy Authentication Required\r\n\r\n").unwrap().unwrap();
        assert_eq!(denied.status, 407);
    }

    #[test]
    fn garbage_and_endless_heads_are_errors() {
        assert!(matches!(parse_head(b"SSH-2.0-OpenSSH\r\n\r\n"), Err(HeadError::Malformed(_))));
        let endless = [b"HTTP/1.1 200 OK\r\n".as_slice(), &b"X: y\r\n".repeat(2000)].concat();
        assert!(parse_head(&endless).is_err());
    }
}
