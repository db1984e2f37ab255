//! Small validated configuration types shared by every backend.

use std::fmt;
use std::str::FromStr;

/// The link MTU of the TUN device, which is also the largest IP packet a stack emits.
///
/// IPv4 requires at least 576 octets (RFC 791) and IPv6 at least 1280 (RFC 8200 §5);
/// the constructor enforces the IPv4 floor and [`Mtu::supports_ipv6`] tells the other.
/// The ceiling is the largest IP packet a TUN read can return without offload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mtu(u16);

/// Why a number is not a usable [`Mtu`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MtuError {
    #[error("MTU {0} is out of range: it must be between {min} and {max}", min = Mtu::MIN, max = Mtu::MAX)]
    OutOfRange(u64),
    #[error("MTU {0:?} is not a number")]
    NotANumber(String),
}

impl Mtu {
    pub const MIN: u16 = 576;
    pub const MAX: u16 = 65535;
    /// The MTU used when none is configured.
    pub const DEFAULT: Mtu = Mtu(1500);

    pub fn new(value: u64) -> Result<Self, MtuError> {
        if (Self::MIN as u64..=Self::MAX as u64).contains(&value) {
            Ok(Mtu(value as u16))
        } else {
            Err(MtuError::OutOfRange(value))
        }
    }

    pub fn get(self) -> usize {
        self.0 as usize
    }

    pub fn supports_ipv6(self) -> bool {
        self.0 >= 1280
    }

    /// The TCP maximum segment size for IPv4 at this MTU (20-byte IP + 20-byte TCP headers).
    pub fn ipv4_mss(self) -> usize {
        self.get() - 40
    }
}

impl Default for Mtu {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl FromStr for Mtu {
    type Err = MtuError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let value: u64 = s.trim().parse().map_err(|_| MtuError::NotANumber(s.to_owned()))?;
        Mtu::new(value)
    }
}

impl fmt::Display for Mtu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        assert_eq!("1500".parse::<Mtu>().map(Mtu::get), Ok(1500));
        assert_eq!("575".parse::<Mtu>(), Err(MtuError::OutOfRange(575)));
        assert_eq!("65536".parse::<Mtu>(), Err(MtuError::OutOfRange(65536)));
        assert!(matches!("x".parse::<Mtu>(), Err(MtuError::NotANumber(_))));
        assert!(!Mtu::new(1000).unwrap().supports_ipv6());
        assert_eq!(Mtu::new(9000).unwrap().ipv4_mss(), 8960);
    }
}
