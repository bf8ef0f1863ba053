//! Fuzzes the visibility query parser and rewrite of protected search attributes
//! (`payload_gateway::search_attributes::query`). Properties: `bodies::visibility_query`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "bodies.rs"]
mod bodies;

fuzz_target!(|data: &[u8]| {
    bodies::visibility_query(data);
});
