//! Fuzzes the strict recognition of storage references on the encode path
//! (`payload_gateway::storage::reference::strict_reference`). Properties:
//! `bodies::storage_reference`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "bodies.rs"]
mod bodies;

fuzz_target!(|data: &[u8]| {
    bodies::storage_reference(data);
});
