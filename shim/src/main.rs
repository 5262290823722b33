//! `containerd-shim-cedana-v2`: not implemented yet. It refuses to start with a clear message so that a
//! RuntimeClass pointing at it fails loudly instead of hanging containerd.

fn main() {
    eprintln!(
        "containerd-shim-cedana-v2: this shim is not implemented yet; use `--runtime io.containerd.runc.v2` \
         with BinaryName set to cedana-runc for checkpoint/restore through containerd"
    );
    std::process::exit(1);
}
