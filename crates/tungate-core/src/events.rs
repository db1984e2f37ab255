//! The two JSON lines a running gateway writes on standard output, one type for the
//! binary that writes them and the harnesses (and supervisors) that read them:
//!
//! ```text
//! {"event":"ready","backend":"smoltcp","pid":4242,"tun":"tun0","offload":true,"mtu":1500}
//! {"event":"exit","stats":{"rx_packets":…,"tx_packets":…,…}}
//! ```

use serde::{Deserialize, Serialize};

use crate::stats::Stats;

/// One line of a gateway's standard output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The gateway serves traffic from now on.
    Ready(Ready),
    /// The gateway shut down cleanly; every counter at exit, in declaration order.
    Exit { stats: serde_json::Map<String, serde_json::Value> },
}

/// What a ready gateway announces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// The backend's name (`Backend::NAME`, or `redirect`).
    pub backend: String,
    pub pid: u32,
    /// The TUN's name, its offload and MTU (every variant but redirect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tun: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<usize>,
    /// The addresses the redirect variant listens on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<Vec<String>>,
}

impl Event {
    /// The exit event with every counter of `stats`.
    pub fn exit(stats: &Stats) -> Self {
        let stats = stats.snapshot().fields().map(|(name, value)| (name.to_owned(), value.into())).collect();
        Event::Exit { stats }
    }

    /// The line to write (no newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("an event serializes")
    }

    /// Every event among `output`'s lines (other lines, such as logs, are skipped).
    pub fn parse_all(output: &str) -> Vec<Event> {
        output.lines().filter(|l| l.starts_with('{')).filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// The counters of an exit event, as numbers.
    pub fn exit_counters(&self) -> Option<std::collections::HashMap<String, u64>> {
        match self {
            Event::Exit { stats } => stats.iter().map(|(k, v)| Some((k.clone(), v.as_u64()?))).collect(),
            Event::Ready(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_keep_the_documented_shape() {
        let ready = Event::Ready(Ready {
            backend: "smoltcp".into(),
            pid: 7,
            tun: Some("tun0".into()),
            offload: Some(false),
            mtu: Some(1500),
            listen: None,
        });
        let line = ready.to_line();
        assert_eq!(line, r#"{"event":"ready","backend":"smoltcp","pid":7,"tun":"tun0","offload":false,"mtu":1500}"#);
        let stats = Stats::default();
        Stats::inc(&stats.tx_packets);
        let exit = Event::exit(&stats);
        let text = format!("log line\n{line}\n{}\n{{not json", exit.to_line());
        let events = Event::parse_all(&text);
        assert_eq!(events, vec![ready, exit.clone()]);
        let counters = exit.exit_counters().expect("counters");
        assert_eq!((counters["tx_packets"], counters["rx_packets"]), (1, 0));
        assert!(exit.to_line().starts_with(r#"{"event":"exit","stats":{"rx_packets":0,"tx_packets":1,"#));
    }
}
