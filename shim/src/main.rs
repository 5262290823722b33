//! `containerd-shim-cedana-v2`: see the library's documentation.

use containerd_shim_cedana_v2::shim::{config, CedanaShim, RUNTIME_NAME};

#[tokio::main]
async fn main() {
    containerd_shim::asynchronous::run::<CedanaShim>(RUNTIME_NAME, Some(config())).await;
}
