//! Generates the gRPC client of the external key service (`kms::grpc`) from
//! `proto/payload_gateway/kms/v1/kms.proto`, compiled with `protox` so no `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTO: &str = "proto/payload_gateway/kms/v1/kms.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    let descriptors = protox::compile([PROTO], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
