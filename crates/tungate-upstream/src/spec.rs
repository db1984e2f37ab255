//! `--proxy`: which upstream, parsed from a URL, and the connector built from it.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

use percent_encoding::percent_decode_str;
use tungate_api::Stats;

use crate::connector::{Connector, Dialer};
use crate::socks5::codec::Auth;
use crate::{Direct, HttpConnect, Socks5};

/// An upstream as the user named it: `direct`, `socks5://[user:pass@]host[:port]` (port
/// 1080 by default; `socks5h://` is the same) or `http://[user:pass@]host[:port]` (port
/// 80 by default).
#[derive(Clone, PartialEq, Eq)]
pub enum ProxySpec {
    Direct,
    Socks5 { host: String, port: u16, credentials: Option<(String, String)> },
    Http { host: String, port: u16, credentials: Option<(String, String)> },
}

impl ProxySpec {
    /// The kind of upstream: `direct`, `socks5` or `http` (a metrics label).
    pub fn kind(&self) -> &'static str {
        match self {
            ProxySpec::Direct => "direct",
            ProxySpec::Socks5 { .. } => "socks5",
            ProxySpec::Http { .. } => "http",
        }
    }
}

impl fmt::Debug for ProxySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The password never reaches a log line.
        match self {
            ProxySpec::Direct => f.write_str("direct"),
            ProxySpec::Socks5 { host, port, credentials } => {
                write!(f, "socks5://{}{host}:{port}", user_part(credentials))
            }
            ProxySpec::Http { host, port, credentials } => write!(f, "http://{}{host}:{port}", user_part(credentials)),
        }
    }
}

fn user_part(credentials: &Option<(String, String)>) -> String {
    credentials.as_ref().map(|(u, _)| format!("{u}:***@")).unwrap_or_default()
}

impl FromStr for ProxySpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "direct" {
            return Ok(ProxySpec::Direct);
        }
        let url = url::Url::parse(s).map_err(|e| {
            format!("{s:?} is not a URL ({e}); expected direct, socks5://HOST:PORT or http://HOST:PORT")
        })?;
        if !matches!(url.scheme(), "socks5" | "socks5h" | "http") {
            return Err(format!(
                "{s:?}: unknown proxy scheme {:?} (expected direct, socks5:// or http://)",
                url.scheme()
            ));
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_owned(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => a.to_string(),
            None => return Err(format!("{s:?} names no proxy host")),
        };
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err(format!("{s:?}: a proxy URL has no path, query or fragment"));
        }
        let decode = |part: &str, what: &str| {
            percent_decode_str(part)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| format!("{s:?}: the {what} is not UTF-8"))
        };
        let credentials = match (url.username(), url.password()) {
            ("", None) => None,
            (user, pass) => Some((decode(user, "user name")?, decode(pass.unwrap_or(""), "password")?)),
        };
        match url.scheme() {
            "socks5" | "socks5h" => {
                if let Some((user, pass)) = &credentials {
                    if user.len() > 255 || pass.len() > 255 {
                        return Err(format!("{s:?}: SOCKS5 user name and password are at most 255 bytes each"));
                    }
                }
                Ok(ProxySpec::Socks5 { host, port: url.port().unwrap_or(1080), credentials })
            }
            "http" => Ok(ProxySpec::Http { host, port: url.port_or_known_default().unwrap_or(80), credentials }),
            _ => unreachable!("schemes checked above"),
        }
    }
}

/// Why the upstream could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("--proxy {spec:?}: cannot resolve {host}: {reason}")]
pub struct ResolveError {
    spec: ProxySpec,
    host: String,
    reason: String,
}

impl ProxySpec {
    /// Builds the connector; a proxy named by host is resolved now, once.
    pub async fn connector(&self, dialer: Dialer, stats: Arc<Stats>) -> Result<Arc<dyn Connector>, ResolveError> {
        Ok(match self {
            ProxySpec::Direct => Arc::new(Direct::new(dialer)),
            ProxySpec::Socks5 { host, port, credentials } => {
                let auth = match credentials {
                    Some((user, pass)) => Auth::UserPass { user: user.clone(), pass: pass.clone() },
                    None => Auth::None,
                };
                Arc::new(Socks5::new(self.resolve(host, *port).await?, auth, dialer, stats))
            }
            ProxySpec::Http { host, port, credentials } => {
                Arc::new(HttpConnect::new(self.resolve(host, *port).await?, credentials.clone(), dialer))
            }
        })
    }

    /// The same proxy at `ip`: for a caller that resolved its name already.
    pub fn at(&self, ip: std::net::IpAddr) -> ProxySpec {
        let mut spec = self.clone();
        if let ProxySpec::Socks5 { host, .. } | ProxySpec::Http { host, .. } = &mut spec {
            *host = ip.to_string();
        }
        spec
    }

    async fn resolve(&self, host: &str, port: u16) -> Result<SocketAddr, ResolveError> {
        let failed = |reason: String| ResolveError { spec: self.clone(), host: host.to_owned(), reason };
        let mut addrs = tokio::net::lookup_host((host, port)).await.map_err(|e| failed(e.to_string()))?;
        addrs.next().ok_or_else(|| failed("no address".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_defaults_and_decoded_credentials() {
        assert_eq!("direct".parse(), Ok(ProxySpec::Direct));
        assert_eq!(
            "socks5://10.0.0.1".parse(),
            Ok(ProxySpec::Socks5 { host: "10.0.0.1".into(), port: 1080, credentials: None })
        );
        assert_eq!(
            "socks5h://al:p%40ss@proxy.test:9050".parse(),
            Ok(ProxySpec::Socks5 {
                host: "proxy.test".into(),
                port: 9050,
                credentials: Some(("al".into(), "p@ss".into()))
            })
        );
        assert_eq!(
            "http://[fd00::1]:3128/".parse(),
            Ok(ProxySpec::Http { host: "fd00::1".into(), port: 3128, credentials: None })
        );
        assert_eq!("http://h".parse::<ProxySpec>().map(|p| matches!(p, ProxySpec::Http { port: 80, .. })), Ok(true));
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (bad, says) in [
            ("socks4://h:1", "unknown proxy scheme"),
            ("h:1080", "unknown proxy scheme"),
            ("nonsense", "not a URL"),
            ("http://h:1/path", "no path"),
            ("socks5://:1080", "not a URL"),
        ] {
            let err = bad.parse::<ProxySpec>().unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        let long = format!("socks5://{}:x@h:1", "u".repeat(256));
        assert!(long.parse::<ProxySpec>().unwrap_err().contains("255"));
    }

    #[test]
    fn debug_hides_the_password() {
        let spec: ProxySpec = "socks5://al:secret@h:1".parse().unwrap();
        assert_eq!(format!("{spec:?}"), "socks5://al:***@h:1");
    }
}
