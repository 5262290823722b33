//! Compiles proto/ into Rust with protox (a pure-Rust protobuf compiler, so no protoc is needed) and
//! tonic-prost-build. The file descriptor set is also written to OUT_DIR for gRPC server reflection.

use std::path::PathBuf;

use protox::prost::Message as _;

const PROTO_ROOT: &str = "proto";
const PROTOS: &[&str] = &["proto/cedana/daemon/v1/daemon.proto"];
/// The subset of containerd's API that cedana calls (client code only).
const CONTAINERD_PROTOS: &[&str] = &[
    "proto/containerd/containers.proto",
    "proto/containerd/tasks.proto",
    "proto/containerd/snapshots.proto",
    "proto/containerd/images.proto",
    "proto/containerd/content.proto",
    "proto/containerd/leases.proto",
    "proto/containerd/runc_options.proto",
];
/// A wire-compatible subset of the Kubernetes CRI (`runtime.v1`), to drive containerd's CRI plugin in tests
/// (client code only).
const CRI_PROTOS: &[&str] = &["proto/k8s/cri/v1/api.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    for proto in PROTOS.iter().chain(CONTAINERD_PROTOS).chain(CRI_PROTOS) {
        println!("cargo:rerun-if-changed={proto}");
    }

    let fds = protox::compile(PROTOS, [PROTO_ROOT])?;
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);

    // tonic-prost-build only writes `file_descriptor_set_path` when it runs protoc itself, so the
    // descriptors protox produced are written here (read by `tonic::include_file_descriptor_set!`).
    std::fs::write(out_dir.join("cedana_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure().compile_fds(fds)?;

    let containerd = protox::compile(CONTAINERD_PROTOS, [PROTO_ROOT])?;
    tonic_prost_build::configure().build_server(false).compile_fds(containerd)?;

    let cri = protox::compile(CRI_PROTOS, [PROTO_ROOT])?;
    tonic_prost_build::configure().build_server(false).compile_fds(cri)?;
    Ok(())
}
