//! Fuzzes gRPC message framing (`payload_gateway::grpc::frame::split`) with identity, gzip
//! and deflate bodies under a size limit. Properties: `bodies::grpc_frame`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "bodies.rs"]
mod bodies;

fuzz_target!(|data: &[u8]| {
    bodies::grpc_frame(data);
});
