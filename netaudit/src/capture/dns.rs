//! DNS answers captured in the kernel, parsed into address → names.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use hickory_proto::{
    op::{Message, MessageType},
    rr::RData,
};

/// Names each address was resolved from, as seen in the audited workload's DNS answers.
#[derive(Default, Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DnsNames {
    names: BTreeMap<IpAddr, BTreeSet<String>>,
    /// Messages that did not parse (truncated TCP answers, non-DNS traffic on port 53).
    pub unparsed: u64,
}

impl DnsNames {
    /// Adds the A/AAAA answers of one DNS message. Each address gets the name the client asked
    /// for and, through CNAME chains, the record's own name.
    pub fn add_message(&mut self, bytes: &[u8]) {
        let Ok(msg) = Message::from_vec(bytes) else {
            self.unparsed += 1;
            return;
        };
        if msg.metadata.message_type != MessageType::Response {
            return;
        }
        let asked: Vec<String> = msg.queries.iter().map(|q| fqdn(&q.name().to_ascii())).collect();
        for record in &msg.answers {
            let ip = match &record.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                _ => continue,
            };
            let set = self.names.entry(ip).or_default();
            set.extend(asked.iter().cloned());
            set.insert(fqdn(&record.name.to_ascii()));
        }
    }

    /// How many (address, name) pairs are known.
    pub fn len(&self) -> usize {
        self.names.values().map(BTreeSet::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn names_of(&self, ip: &IpAddr) -> Vec<String> {
        self.names.get(ip).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }
}

fn fqdn(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}
