//! Fuzzes the codec endpoint's wire format (`payload_gateway::codec_server::json`): proto3
//! JSON of `Payloads` parsing and the JSON/protobuf round trips. Properties:
//! `bodies::codec_json`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "bodies.rs"]
mod bodies;

fuzz_target!(|data: &[u8]| {
    bodies::codec_json(data);
});
