//! Fuzzes failure-site recognition and the failure edits (seal / restore) of the payload
//! walker: byte 0 picks a payload-bearing message type, the rest is the message. See
//! `payload_gateway_proto::fuzzing::fuzz_failures` for the properties checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    payload_gateway_proto::fuzzing::fuzz_failures(data);
});
