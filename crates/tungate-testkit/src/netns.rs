//! The real-TUN level of the conformance suite.

pub fn netns_http_get(_bin: &str) { todo!() }
pub fn netns_256mib_each_way(_bin: &str) { todo!() }
pub fn netns_udp_echo(_bin: &str) { todo!() }
pub fn netns_closed_port_refused(_bin: &str) { todo!() }
pub fn netns_iperf3_short(_bin: &str) { todo!() }
