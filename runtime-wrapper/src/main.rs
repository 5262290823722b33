//! `cedana-runc`: runc-compatible runtime (in progress).
fn main() {
    eprintln!("cedana-runc: not implemented yet");
    std::process::exit(1);
}
