//! What to do about an error, in terms of this CLI's flags and the project's scripts. The library's messages
//! say what happened; the advice the CLI adds says which flag or script fixes it.

use cedana::checkpoint::CheckpointError;
use cedana::criu::CriuError;
use cedana::engine::EngineError;
use cedana::gpu::GpuError;
use cedana::procfs::ProcError;
use cedana::runc::RuncError;

/// How to get a CRIU that works.
pub const CRIU_INSTALL: &str =
    "run scripts/setup.sh (it installs CRIU >= 4.2), or set CEDANA_CRIU_BINARY_PATH or criu.binary_path in the config";

/// The error, followed by advice where there is some.
pub fn render(err: &anyhow::Error) -> String {
    // The chain as `{:#}` gives it, without a cause the message before it already ends with (errors that
    // print their source and also return it from `source()`).
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !text.ends_with(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    match err.downcast_ref::<EngineError>().and_then(advice) {
        Some(a) => format!("{text}\n  hint: {a}"),
        None => text,
    }
}

fn advice(e: &EngineError) -> Option<String> {
    Some(match e {
        EngineError::Checkpoint(c) | EngineError::Package { source: c } | EngineError::Unfinished { source: c, .. } => {
            checkpoint_advice(c)?
        }
        EngineError::Criu(CriuError::NotFound { .. } | CriuError::TooOld { .. }) => CRIU_INSTALL.into(),
        EngineError::NeedsTcpEstablished { .. } => {
            "dump with --tcp-established (the restore then needs the same addresses), or close them first".into()
        }
        EngineError::WrongKind { found, .. } => format!("restore it with `cedana restore {found}`"),
        EngineError::BadName { .. } => "give the folder with --dir and the name with --name".into(),
        EngineError::Process(ProcError::OtherPidNamespace { .. }) => {
            "checkpoint the container instead, e.g. `cedana dump runc ID` for a runc or Docker container".into()
        }
        EngineError::Runc(RuncError::NoBundle { .. }) => "pass --bundle with the container's bundle".into(),
        EngineError::Runc(RuncError::NotFound { .. }) => "scripts/setup.sh installs runc".into(),
        EngineError::Runc(RuncError::Unsupported { .. }) => "drop that flag for runc containers".into(),
        EngineError::NotLazy { .. } => LAZY_ADVICE.into(),
        EngineError::Hook(h) => gpu_advice(h.source.as_deref()?.downcast_ref::<GpuError>()?)?,
        EngineError::PidInUse { .. } => "the original was perhaps dumped with --leave-running: stop it first".into(),
        EngineError::MissingTarget { .. } => "use `cedana restore runc --id ID --bundle DIR`".into(),
        _ => return None,
    })
}

/// For a checkpoint that cannot be restored lazily.
const LAZY_ADVICE: &str = "restore it without --lazy, or with --lazy-fallback (lazily where the checkpoint allows it)";

fn gpu_advice(e: &GpuError) -> Option<String> {
    Some(match e {
        GpuError::HostMismatch { .. } | GpuError::NoGpu { .. } => {
            "restore on a host with matching GPUs, or pass --skip-gpu-check to try anyway".into()
        }
        GpuError::NoBackend { .. } | GpuError::DriverTooOld { .. } => "install NVIDIA driver r570 or newer with its \
            cuda-checkpoint utility, or point gpu.cuda_checkpoint / gpu.libcuda (CEDANA_GPU_*) at them"
            .into(),
        _ => return None,
    })
}

fn checkpoint_advice(e: &CheckpointError) -> Option<String> {
    Some(match e {
        CheckpointError::NoSpace { .. } => "free space there or choose another --dir".into(),
        CheckpointError::Exists { .. } => "choose another --name or remove it".into(),
        CheckpointError::NotFound { .. } => "check the --path".into(),
        CheckpointError::NotInPlace { .. } => LAZY_ADVICE.into(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_that_its_error_prints_already_is_not_repeated() {
        let err = EngineError::Io { what: "reading x".into(), source: std::io::Error::other("gone") };
        assert_eq!(render(&anyhow::Error::from(err)), "reading x: gone");
        let outer = anyhow::Error::from(std::io::Error::other("inner")).context("outer");
        assert_eq!(render(&outer), "outer: inner", "causes not printed yet still are");
    }

    #[test]
    fn advice_names_the_flag() {
        let full = EngineError::Checkpoint(CheckpointError::NoSpace { dir: "/d".into() });
        let text = render(&anyhow::Error::new(full));
        assert!(text.contains("/d is full") && text.contains("choose another --dir"), "{text}");
        let plain = render(&anyhow::anyhow!("boom"));
        assert_eq!(plain, "boom");
    }

    #[test]
    fn a_gpu_host_mismatch_names_the_override_once() {
        let gpu = GpuError::HostMismatch { reason: "the checkpoint used 2 GPU(s) but this host has 1".into() };
        let hook = cedana::engine::hooks::HookError::caused(cedana::engine::HookPoint::BeforeRestore, gpu);
        let text = render(&anyhow::Error::new(EngineError::Hook(hook)));
        assert_eq!(text.matches("this host has 1").count(), 1, "{text}");
        assert!(text.contains("before-restore hook failed") && text.contains("--skip-gpu-check"), "{text}");
    }
}
