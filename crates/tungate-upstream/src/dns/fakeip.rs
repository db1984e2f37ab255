//! The fake-IP pools: every name asked for gets an address of its own from a pool, and a
//! flow to that address is a flow to the name. I/O-free.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use ipnet::IpNet;
use lru::LruCache;

/// The most names one pool holds, however large its prefix (an IPv6 /64 would otherwise
/// be unbounded); beyond it the least recently used name gives its address up.
pub const MAX_NAMES: u32 = 1 << 18;

/// One IPv4 and one IPv6 pool, shared by the DNS answerer and the router.
#[derive(Debug)]
pub struct FakeIp {
    pools: Mutex<[Option<Pool>; 2]>,
    ranges: Vec<IpNet>,
}

impl FakeIp {
    /// Pools over `ranges`: at most one IPv4 and one IPv6 prefix, each with room for at
    /// least two names.
    pub fn new(ranges: &[IpNet]) -> Result<FakeIp, String> {
        let mut pools: [Option<Pool>; 2] = [None, None];
        for range in ranges {
            let slot = usize::from(matches!(range, IpNet::V6(_)));
            if pools[slot].is_some() {
                return Err(format!("--fake-ip-range {range}: one IPv4 and one IPv6 range at most"));
            }
            pools[slot] = Some(Pool::new(range.trunc())?);
        }
        Ok(FakeIp { pools: Mutex::new(pools), ranges: ranges.iter().map(IpNet::trunc).collect() })
    }

    /// The prefixes the pools hand out.
    pub fn ranges(&self) -> &[IpNet] {
        &self.ranges
    }

    /// Whether `ip` is one of ours (mapped now or not).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|r| r.contains(&ip))
    }

    /// The address for `name` from the pool of `ip`'s family (`v6`), assigned now if it
    /// has none; `None` when there is no pool of that family.
    pub fn assign(&self, name: &str, v6: bool) -> Option<IpAddr> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools[usize::from(v6)].as_mut().map(|pool| pool.assign(name))
    }

    /// The name `ip` stands for, if it is mapped (and marks it used).
    pub fn lookup(&self, ip: IpAddr) -> Option<Arc<str>> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools[usize::from(ip.is_ipv6())].as_mut().and_then(|pool| pool.lookup(ip))
    }
}

/// Addresses `first + index` for index in `0..capacity`, mapped to names both ways.
#[derive(Debug)]
struct Pool {
    net: IpNet,
    capacity: u32,
    /// Indices below this have been handed out at least once.
    next: u32,
    by_name: HashMap<Arc<str>, u32>,
    /// Index → name, least recently used first out.
    by_index: LruCache<u32, Arc<str>>,
}

impl Pool {
    fn new(net: IpNet) -> Result<Pool, String> {
        let host_bits = u32::from(net.max_prefix_len() - net.prefix_len());
        // Neither the network address nor (IPv4) the broadcast address is handed out.
        let usable = if host_bits >= 32 { u64::MAX } else { (1u64 << host_bits).saturating_sub(2) };
        if usable < 2 {
            return Err(format!("--fake-ip-range {net}: too small (at least 2 addresses)"));
        }
        let capacity = usable.min(u64::from(MAX_NAMES)) as u32;
        let lru_cap = NonZeroUsize::new(capacity as usize).ok_or("empty pool")?;
        Ok(Pool { net, capacity, next: 0, by_name: HashMap::new(), by_index: LruCache::new(lru_cap) })
    }

    fn addr(&self, index: u32) -> IpAddr {
        match self.net {
            IpNet::V4(n) => IpAddr::V4((u32::from(n.network()) + 1 + index).into()),
            IpNet::V6(n) => IpAddr::V6((u128::from(n.network()) + 1 + u128::from(index)).into()),
        }
    }

    fn index(&self, ip: IpAddr) -> Option<u32> {
        if !self.net.contains(&ip) {
            return None;
        }
        let offset = match (self.net, ip) {
            (IpNet::V4(n), IpAddr::V4(a)) => u128::from(u32::from(a) - u32::from(n.network())),
            (IpNet::V6(n), IpAddr::V6(a)) => u128::from(a) - u128::from(n.network()),
            _ => return None,
        };
        let index = u32::try_from(offset.checked_sub(1)?).ok()?;
        (index < self.capacity).then_some(index)
    }

    fn assign(&mut self, name: &str) -> IpAddr {
        if let Some(&index) = self.by_name.get(name) {
            self.by_index.promote(&index);
            return self.addr(index);
        }
        let index = if self.next < self.capacity {
            self.next += 1;
            self.next - 1
        } else {
            let (index, old) = self.by_index.pop_lru().expect("a full pool has a least recently used name");
            self.by_name.remove(&old);
            index
        };
        let name: Arc<str> = name.into();
        self.by_name.insert(name.clone(), index);
        self.by_index.put(index, name);
        self.addr(index)
    }

    fn lookup(&mut self, ip: IpAddr) -> Option<Arc<str>> {
        let index = self.index(ip)?;
        self.by_index.get(&index).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools(ranges: &[&str]) -> FakeIp {
        FakeIp::new(&ranges.iter().map(|r| r.parse().unwrap()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn names_get_stable_addresses_both_ways_per_family() {
        let f = pools(&["198.19.0.0/16", "fd19::/64"]);
        let a = f.assign("a.test", false).unwrap();
        assert_eq!(a, "198.19.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(f.assign("a.test", false), Some(a), "same name, same address");
        let b = f.assign("b.test", false).unwrap();
        assert_ne!(a, b);
        let a6 = f.assign("a.test", true).unwrap();
        assert_eq!(a6, "fd19::1".parse::<IpAddr>().unwrap());
        assert_eq!(f.lookup(a).as_deref(), Some("a.test"));
        assert_eq!(f.lookup(a6).as_deref(), Some("a.test"));
        assert_eq!(f.lookup("198.19.7.7".parse().unwrap()), None, "in the pool, never handed out");
        assert!(f.contains("198.19.7.7".parse().unwrap()));
        assert!(!f.contains("10.0.0.1".parse().unwrap()));
        assert_eq!(f.lookup("10.0.0.1".parse().unwrap()), None);
        assert_eq!(pools(&["198.19.0.0/16"]).assign("x.test", true), None, "no IPv6 pool");
    }

    #[test]
    fn a_full_pool_evicts_the_least_recently_used_name() {
        // A /29 has 8 addresses: 6 usable.
        let f = pools(&["198.19.0.0/29"]);
        let addrs: Vec<IpAddr> = (0..6).map(|i| f.assign(&format!("n{i}.test"), false).unwrap()).collect();
        assert_eq!(addrs.last(), Some(&"198.19.0.6".parse().unwrap()));
        // Use n0 (by a flow) and n1 (by a query): n2 is now the least recently used.
        assert_eq!(f.lookup(addrs[0]).as_deref(), Some("n0.test"));
        f.assign("n1.test", false);
        let new = f.assign("new.test", false).unwrap();
        assert_eq!(new, addrs[2], "n2's address went to the new name");
        assert_eq!(f.lookup(addrs[2]).as_deref(), Some("new.test"));
        let again = f.assign("n2.test", false).unwrap();
        assert_eq!(again, addrs[3], "n2 asked again gets the next least recently used");
        assert_eq!(f.lookup(addrs[3]).as_deref(), Some("n2.test"));
        assert_eq!(f.lookup(addrs[0]).as_deref(), Some("n0.test"), "recently used names stay");
    }

    #[test]
    fn bad_ranges_are_refused() {
        assert!(FakeIp::new(&["198.19.0.0/31".parse().unwrap()]).is_err());
        let two_v4 = ["198.19.0.0/16".parse().unwrap(), "198.20.0.0/16".parse().unwrap()];
        assert!(FakeIp::new(&two_v4).unwrap_err().contains("one IPv4"));
    }
}
