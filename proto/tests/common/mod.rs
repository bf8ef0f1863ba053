//! Shared test helpers: a descriptor-driven random message generator (prost-reflect) and a
//! reflective payload walk used as the oracle for the wire walker.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use bytes::Bytes;
use payload_gateway_proto::MessageType;
use prost::Message;
use prost_reflect::{
    DescriptorPool, DynamicMessage, Kind, MapKey, MessageDescriptor, ReflectMessage, Value,
};
use temporalio_protos::protos::temporal::api::common::v1::Payload;

pub const PAYLOAD: &str = "temporal.api.common.v1.Payload";
pub const ANY: &str = "google.protobuf.Any";
pub const SEARCH_ATTRIBUTES: &str = "temporal.api.common.v1.SearchAttributes";

pub fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let bytes =
            std::fs::read(payload_gateway_proto::DESCRIPTOR_SET_PATH).expect("descriptor set");
        DescriptorPool::decode(bytes.as_slice()).expect("descriptor pool")
    })
}

pub fn desc(name: &str) -> MessageDescriptor {
    pool()
        .get_message_by_name(name)
        .unwrap_or_else(|| panic!("no message {name}"))
}

/// Small deterministic RNG (splitmix64) driven by a proptest-chosen seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn bytes(&mut self, max: u64) -> Vec<u8> {
        (0..self.below(max + 1))
            .map(|_| self.next() as u8)
            .collect()
    }
    pub fn string(&mut self, max: u64) -> String {
        (0..self.below(max + 1))
            .map(|_| (b'a' + self.below(26) as u8) as char)
            .collect()
    }
}

/// Types put into generated `Any` values: payload-bearing ones, one that cannot hold
/// payloads, and (as `None`) an unknown type.
const ANY_TYPES: &[Option<&str>] = &[
    Some("temporal.api.update.v1.Request"),
    Some("temporal.api.update.v1.Response"),
    Some("temporal.api.update.v1.Acceptance"),
    Some("temporal.api.update.v1.Rejection"),
    Some("temporal.api.errordetails.v1.MultiOperationExecutionFailure"),
    Some("temporal.api.failure.v1.Failure"),
    Some("temporal.api.common.v1.WorkflowExecution"),
    None,
];

pub fn reaches(d: &MessageDescriptor) -> bool {
    MessageType::by_name(d.full_name()).is_some_and(|t| t.can_hold_payloads())
}

/// Generator settings.
#[derive(Clone, Copy)]
pub struct Gen {
    pub max_depth: usize,
    /// Insert unknown fields (numbers 9000+) into messages at random depths.
    pub unknown_fields: bool,
}

/// Generates a random message of type `d`: payload-reaching fields are filled often,
/// other fields sometimes.
pub fn gen_message(
    d: &MessageDescriptor,
    rng: &mut Rng,
    g: Gen,
    depth: usize,
    unknown: &mut Vec<Vec<u8>>,
) -> DynamicMessage {
    let mut m = DynamicMessage::new(d.clone());
    if d.full_name() == PAYLOAD {
        let mut p = Payload::default();
        for _ in 0..rng.below(3) {
            p.metadata.insert(rng.string(8), rng.bytes(8));
        }
        p.data = rng.bytes(24);
        m.transcode_from(&p).unwrap();
        return m;
    }
    if d.full_name() == ANY {
        let pick = ANY_TYPES[rng.below(ANY_TYPES.len() as u64) as usize];
        let (url, value) = match pick {
            Some(name) if depth < g.max_depth => {
                let inner = gen_message(&desc(name), rng, g, depth + 1, unknown);
                (format!("type.googleapis.com/{name}"), inner.encode_to_vec())
            }
            _ => (
                "type.googleapis.com/example.v1.NotInTheSet".to_string(),
                rng.bytes(16),
            ),
        };
        m.set_field_by_name("type_url", Value::String(url));
        m.set_field_by_name("value", Value::Bytes(Bytes::from(value)));
        return m;
    }
    let mut oneof_pick: HashMap<String, Option<u32>> = HashMap::new();
    for f in d.fields() {
        if let Some(o) = f.containing_oneof() {
            let pick = *oneof_pick.entry(o.name().to_string()).or_insert_with(|| {
                let members: Vec<u32> = o.fields().map(|x| x.number()).collect();
                rng.chance(80)
                    .then(|| members[rng.below(members.len() as u64) as usize])
            });
            if pick != Some(f.number()) {
                continue;
            }
        }
        let reach = match f.kind() {
            Kind::Message(md) => reaches(&md),
            _ => false,
        };
        let p = if reach { 85 } else { 25 };
        if !rng.chance(p) {
            continue;
        }
        if matches!(f.kind(), Kind::Message(_)) && depth >= g.max_depth {
            continue;
        }
        let v = if f.is_map() {
            let Kind::Message(entry) = f.kind() else {
                unreachable!()
            };
            let kf = entry.map_entry_key_field();
            let vf = entry.map_entry_value_field();
            let mut map = HashMap::new();
            for _ in 0..rng.below(3) {
                let key = match gen_scalar(&kf.kind(), rng) {
                    Value::Bool(b) => MapKey::Bool(b),
                    Value::I32(x) => MapKey::I32(x),
                    Value::I64(x) => MapKey::I64(x),
                    Value::U32(x) => MapKey::U32(x),
                    Value::U64(x) => MapKey::U64(x),
                    Value::String(s) => MapKey::String(s),
                    other => panic!("bad map key {other:?}"),
                };
                map.insert(key, gen_value(&vf.kind(), rng, g, depth + 1, unknown));
            }
            Value::Map(map)
        } else if f.is_list() {
            Value::List(
                (0..rng.below(4))
                    .map(|_| gen_value(&f.kind(), rng, g, depth + 1, unknown))
                    .collect(),
            )
        } else {
            gen_value(&f.kind(), rng, g, depth + 1, unknown)
        };
        m.set_field(&f, v);
    }
    if g.unknown_fields && rng.chance(20) {
        // Append an unknown field (unique content) and merge it back in.
        let mut buf = m.encode_to_vec();
        let start = buf.len();
        let number = 9000 + rng.below(1000);
        let token = rng.next().to_le_bytes();
        match rng.below(3) {
            0 => {
                prost::encoding::encode_key(
                    number as u32,
                    prost::encoding::WireType::LengthDelimited,
                    &mut buf,
                );
                prost::encoding::encode_varint(token.len() as u64, &mut buf);
                buf.extend_from_slice(&token);
            }
            1 => {
                prost::encoding::encode_key(
                    number as u32,
                    prost::encoding::WireType::SixtyFourBit,
                    &mut buf,
                );
                buf.extend_from_slice(&token);
            }
            _ => {
                prost::encoding::encode_key(
                    number as u32,
                    prost::encoding::WireType::Varint,
                    &mut buf,
                );
                prost::encoding::encode_varint(u64::from_le_bytes(token) | (1 << 63), &mut buf);
            }
        }
        unknown.push(buf[start..].to_vec());
        m = DynamicMessage::decode(d.clone(), buf.as_slice()).unwrap();
    }
    m
}

fn gen_scalar(k: &Kind, rng: &mut Rng) -> Value {
    match k {
        Kind::Double => Value::F64(rng.next() as f64),
        Kind::Float => Value::F32(rng.below(1000) as f32),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(rng.next() as i32),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(rng.next() as i64),
        Kind::Uint32 | Kind::Fixed32 => Value::U32(rng.next() as u32),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(rng.next()),
        Kind::Bool => Value::Bool(rng.chance(50)),
        Kind::String => Value::String(rng.string(12)),
        Kind::Bytes => Value::Bytes(Bytes::from(rng.bytes(16))),
        Kind::Enum(e) => {
            // Sometimes an unknown enum value.
            let vals: Vec<i32> = e.values().map(|v| v.number()).collect();
            if vals.is_empty() || rng.chance(10) {
                Value::EnumNumber(1000 + rng.below(100) as i32)
            } else {
                Value::EnumNumber(vals[rng.below(vals.len() as u64) as usize])
            }
        }
        Kind::Message(_) => unreachable!(),
    }
}

fn gen_value(k: &Kind, rng: &mut Rng, g: Gen, depth: usize, unknown: &mut Vec<Vec<u8>>) -> Value {
    match k {
        Kind::Message(md) => Value::Message(gen_message(md, rng, g, depth, unknown)),
        other => gen_scalar(other, rng),
    }
}

/// The reflective oracle: calls `f` on every payload the proxy must rewrite (skipping
/// search attributes), following `Any` values of known types (re-encoding them after).
pub fn reflect_visit(m: &mut DynamicMessage, f: &mut dyn FnMut(&mut DynamicMessage)) {
    let d = m.descriptor();
    if d.full_name() == PAYLOAD {
        f(m);
        return;
    }
    if d.full_name() == ANY {
        let url = m
            .get_field_by_name("type_url")
            .unwrap()
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = url.rsplit('/').next().unwrap_or_default();
        if let Some(inner_d) = pool().get_message_by_name(name) {
            if !reaches(&inner_d) {
                return;
            }
            let value = m
                .get_field_by_name("value")
                .unwrap()
                .as_bytes()
                .cloned()
                .unwrap_or_default();
            let mut inner = DynamicMessage::decode(inner_d, value).unwrap();
            reflect_visit(&mut inner, f);
            m.set_field_by_name("value", Value::Bytes(Bytes::from(inner.encode_to_vec())));
        }
        return;
    }
    let skip_sa = d.full_name() == SEARCH_ATTRIBUTES;
    for (fd, v) in m.fields_mut() {
        if skip_sa && fd.name() == "indexed_fields" {
            continue;
        }
        visit_value(v, f);
    }
}

fn visit_value(v: &mut Value, f: &mut dyn FnMut(&mut DynamicMessage)) {
    match v {
        Value::Message(m) => reflect_visit(m, f),
        Value::List(l) => l.iter_mut().for_each(|x| visit_value(x, f)),
        Value::Map(map) => map.values_mut().for_each(|x| visit_value(x, f)),
        _ => {}
    }
}

pub fn is_empty(p: &Payload) -> bool {
    *p == Payload::default()
}

/// An order-independent key for a payload.
pub type PayloadKey = (BTreeMap<String, Vec<u8>>, Vec<u8>);

pub fn payload_key(p: &Payload) -> PayloadKey {
    (p.metadata.clone().into_iter().collect(), p.data.clone())
}

/// The marking transform: appends `!` and the data length to the data.
///
/// An entirely empty payload is left alone: prost omits a default map value on the wire
/// (`Memo.fields["k"] = Payload{}` encodes as a key-only entry), so there is nothing to
/// rewrite, while a decoder still materialises an empty value there.
pub fn mark(p: &mut Payload) {
    if is_empty(p) {
        return;
    }
    let n = p.data.len();
    p.data.extend_from_slice(format!("!{n}").as_bytes());
}

/// Structural equality of two dynamic messages, decoding `Any` values of known types (so
/// map order inside them does not matter).
pub fn same(a: &DynamicMessage, b: &DynamicMessage) -> bool {
    if a.descriptor() != b.descriptor() {
        return false;
    }
    if a.descriptor().full_name() == ANY {
        let url = a.get_field_by_name("type_url").unwrap().into_owned();
        if url != b.get_field_by_name("type_url").unwrap().into_owned() {
            return false;
        }
        let name = url
            .as_str()
            .unwrap_or_default()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let va = a
            .get_field_by_name("value")
            .unwrap()
            .as_bytes()
            .cloned()
            .unwrap_or_default();
        let vb = b
            .get_field_by_name("value")
            .unwrap()
            .as_bytes()
            .cloned()
            .unwrap_or_default();
        return match pool().get_message_by_name(&name) {
            Some(d) => same(
                &DynamicMessage::decode(d.clone(), va).unwrap(),
                &DynamicMessage::decode(d, vb).unwrap(),
            ),
            None => va == vb,
        };
    }
    let fa: Vec<_> = a.fields().collect();
    let fb: Vec<_> = b.fields().collect();
    fa.len() == fb.len()
        && fa
            .iter()
            .zip(&fb)
            .all(|((da, va), (db, vb))| da == db && same_value(va, vb))
}

fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Message(x), Value::Message(y)) => same(x, y),
        (Value::List(x), Value::List(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_value(p, q))
        }
        (Value::Map(x), Value::Map(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_value(v, w)))
        }
        (Value::F64(x), Value::F64(y)) => x.to_bits() == y.to_bits(),
        (Value::F32(x), Value::F32(y)) => x.to_bits() == y.to_bits(),
        _ => a == b,
    }
}
