//! Compiles `proto/sluice/v1/*.proto` with protox (a pure-Rust protobuf compiler), so a
//! build needs no `protoc` on the machine. The encoded descriptor set is kept for gRPC
//! server reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let file = proto_root.join("sluice/v1/pipeline.proto");
    println!("cargo:rerun-if-changed={}", proto_root.display());

    let descriptors = protox::compile([&file], [&proto_root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("sluice_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
