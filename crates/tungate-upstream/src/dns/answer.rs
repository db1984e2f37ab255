//! Answers A and AAAA queries from the fake-IP pools; everything else is forwarded.
//! DNS messages are parsed and built with `hickory-proto`.

use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};

use super::FakeIp;

/// What to do with one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Send this response back to the client.
    Reply(Vec<u8>),
    /// Not ours to answer (another type, several questions, not a query, unparsable):
    /// forward it to a resolver as it is.
    Forward,
}

/// Answers `query` if it is one A or AAAA question (class IN): the name's fake address,
/// valid for `ttl` seconds. A family without a pool gets an empty answer (NOERROR, no
/// records), so the client uses the other.
pub fn answer(query: &[u8], fake: &FakeIp, ttl: u32) -> Answer {
    let Ok(message) = Message::from_vec(query) else { return Answer::Forward };
    let meta = &message.metadata;
    if meta.message_type != MessageType::Query || meta.op_code != OpCode::Query || message.queries.len() != 1 {
        return Answer::Forward;
    }
    let question = &message.queries[0];
    let v6 = match question.query_type() {
        RecordType::A => false,
        RecordType::AAAA => true,
        _ => return Answer::Forward,
    };
    if question.query_class() != DNSClass::IN {
        return Answer::Forward;
    }
    let name = question.name().to_lowercase().to_ascii();
    let name = name.strip_suffix('.').unwrap_or(&name);
    if name.is_empty() {
        return Answer::Forward;
    }
    let mut reply = Message::new(meta.id, MessageType::Response, OpCode::Query);
    reply.metadata.recursion_desired = meta.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.response_code = ResponseCode::NoError;
    reply.add_query(question.clone());
    let rdata = match fake.assign(name, v6) {
        Some(IpAddr::V4(a)) => Some(RData::A(A(a))),
        Some(IpAddr::V6(a)) => Some(RData::AAAA(AAAA(a))),
        None => None,
    };
    if let Some(rdata) = rdata {
        reply.add_answer(Record::from_rdata(question.name().clone(), ttl, rdata));
    }
    match reply.to_vec() {
        Ok(bytes) => Answer::Reply(bytes),
        Err(_) => Answer::Forward,
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    use super::*;

    fn query(name: &str, kind: RecordType) -> Vec<u8> {
        let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
        m.to_vec().unwrap()
    }

    fn pools() -> FakeIp {
        FakeIp::new(&["198.19.0.0/16".parse().unwrap(), "fd19::/64".parse().unwrap()]).unwrap()
    }

    #[test]
    fn a_and_aaaa_come_from_the_pools_and_map_back() {
        let fake = pools();
        for (kind, want) in [(RecordType::A, "198.19.0.1"), (RecordType::AAAA, "fd19::1")] {
            let Answer::Reply(bytes) = answer(&query("Web.Test.", kind), &fake, 1) else { panic!("{kind} answered") };
            let reply = Message::from_vec(&bytes).unwrap();
            assert_eq!(reply.metadata.id, 0x4242);
            assert_eq!(reply.metadata.message_type, MessageType::Response);
            assert!(reply.metadata.recursion_desired && reply.metadata.recursion_available);
            assert_eq!(reply.queries.len(), 1, "the question is echoed");
            assert_eq!(reply.answers.len(), 1);
            assert_eq!(reply.answers[0].ttl, 1);
            let ip: IpAddr = match &reply.answers[0].data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                other => panic!("{other:?}"),
            };
            assert_eq!(ip, want.parse::<IpAddr>().unwrap());
            assert_eq!(fake.lookup(ip).as_deref(), Some("web.test"), "lower case, no root dot");
        }
    }

    #[test]
    fn other_queries_are_forwarded() {
        let fake = pools();
        assert_eq!(answer(&query("web.test.", RecordType::TXT), &fake, 1), Answer::Forward);
        assert_eq!(answer(&query("web.test.", RecordType::MX), &fake, 1), Answer::Forward);
        assert_eq!(answer(b"\x00\x01garbage", &fake, 1), Answer::Forward);
        let mut response = Message::from_vec(&query("web.test.", RecordType::A)).unwrap();
        response.metadata.message_type = MessageType::Response;
        assert_eq!(answer(&response.to_vec().unwrap(), &fake, 1), Answer::Forward);
    }

    #[test]
    fn a_family_without_a_pool_gets_an_empty_answer() {
        let v4_only = FakeIp::new(&["198.19.0.0/16".parse().unwrap()]).unwrap();
        let Answer::Reply(bytes) = answer(&query("web.test.", RecordType::AAAA), &v4_only, 1) else { panic!() };
        let reply = Message::from_vec(&bytes).unwrap();
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert!(reply.answers.is_empty());
    }

    #[test]
    fn no_prefix_of_a_query_panics() {
        let fake = pools();
        let q = query("web.test.", RecordType::A);
        for i in 0..q.len() {
            let _ = answer(&q[..i], &fake, 1);
            let mut c = q.clone();
            c[i] ^= 0xa5;
            let _ = answer(&c, &fake, 1);
        }
    }
}
