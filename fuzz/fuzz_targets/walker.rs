//! Fuzzes the payload walker: byte 0 picks a payload-bearing message type, the rest is the
//! message. See `payload_gateway_proto::fuzzing::fuzz_one` for the properties checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    payload_gateway_proto::fuzzing::fuzz_one(data);
});
