//! Any command line (NUL-separated arguments) through cedana-runc's parser: global flags, then the
//! command's own flags for every command the wrapper handles.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../runtime-wrapper/src/args.rs"]
mod args;

fuzz_target!(|data: &[u8]| {
    let argv: Vec<String> = data.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let Some(inv) = args::parse(&argv) else { return };
    for spec in [&args::CHECKPOINT, &args::RESTORE, &args::CREATE, &args::RUN, &args::START] {
        if let Some(parsed) = spec.parse(&inv.args) {
            let _ = parsed.value("image-path");
            let _ = parsed.on("detach");
            let _ = parsed.tokens_without(&["image-path"]);
        }
    }
});
