//! Checkpoint-on-stop: a container whose spec carries the annotation `io.cedana.checkpoint-on-stop=<folder or
//! URL>` is checkpointed by the shim when it is first asked to stop (a Kill of its init with a stopping
//! signal: what precedes a pod's deletion, a node drain, a spot-interruption handler's `kill`), before the
//! signal is delivered, within a budget (`io.cedana.checkpoint-on-stop.budget-ms`, default
//! [`DEFAULT_BUDGET`]). The container keeps running through the checkpoint and then gets the signal as
//! usual. A checkpoint that fails or runs out of time is abandoned (the runtime rolls it back: nothing
//! incomplete is left), the stop goes on, and the failure is logged and published as an event.
//!
//! The checkpoint goes to `<destination>/<name>`, an image path holding `cedana-checkpoint.tar.zst`, which
//! the restore annotation accepts as it is (`io.cedana.restore=<destination>/<name>`). `<name>` is stable
//! for a pod's container, `<pod namespace>_<pod name>_<container name>` from the CRI's annotations, so that
//! the pod's next incarnation finds it; the container id otherwise.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The annotation naming where a stopping container is checkpointed.
pub const ANNOTATION: &str = "io.cedana.checkpoint-on-stop";
/// The annotation bounding that checkpoint, in milliseconds.
pub const BUDGET_ANNOTATION: &str = "io.cedana.checkpoint-on-stop.budget-ms";
/// The budget when the spec names none.
pub const DEFAULT_BUDGET: Duration = Duration::from_secs(30);
/// The topic of the event published when a checkpoint-on-stop fails.
pub const FAILED_TOPIC: &str = "/cedana/checkpoint-on-stop/failed";

/// A container's checkpoint-on-stop request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnStop {
    /// A folder, or an object-store URL (`s3://BUCKET/PREFIX`).
    pub destination: String,
    /// The checkpoint's name under the destination.
    pub name: String,
    pub budget: Duration,
}

impl OnStop {
    /// The request in the bundle's spec of container `id`, if it makes one. A budget that is not a number
    /// is logged and the default used.
    pub fn from_bundle(bundle: &Path, id: &str) -> Option<OnStop> {
        let spec: serde_json::Value = serde_json::from_slice(&std::fs::read(bundle.join("config.json")).ok()?).ok()?;
        let annotations = &spec["annotations"];
        // A pod's annotations reach its sandbox (pause) container too, which holds nothing worth keeping.
        if annotations["io.kubernetes.cri.container-type"].as_str() == Some("sandbox") {
            return None;
        }
        let destination = annotations[ANNOTATION].as_str().map(str::trim).filter(|d| !d.is_empty())?.to_string();
        let budget = match annotations[BUDGET_ANNOTATION].as_str() {
            None => DEFAULT_BUDGET,
            Some(ms) => ms.trim().parse().map(Duration::from_millis).unwrap_or_else(|_| {
                log::warn!("{BUDGET_ANNOTATION}={ms:?} of {id} is not a number of milliseconds: using {DEFAULT_BUDGET:?}");
                DEFAULT_BUDGET
            }),
        };
        let cri = |key: &str| annotations[key].as_str().filter(|v| !v.is_empty() && !v.contains('/'));
        let name = match (
            cri("io.kubernetes.cri.sandbox-namespace"),
            cri("io.kubernetes.cri.sandbox-name"),
            cri("io.kubernetes.cri.container-name"),
        ) {
            (Some(ns), Some(pod), Some(container)) => format!("{ns}_{pod}_{container}"),
            _ => id.to_string(),
        };
        Some(OnStop { destination, name, budget })
    }

    /// Where the checkpoint goes: the image path handed to the runtime.
    pub fn image_path(&self) -> PathBuf {
        let base = self.destination.trim_end_matches('/');
        PathBuf::from(format!("{base}/{}", self.name))
    }
}

/// Whether a signal sent to a container's init asks it to stop.
pub fn is_stop_signal(signal: u32) -> bool {
    [libc::SIGTERM, libc::SIGKILL, libc::SIGINT, libc::SIGQUIT, libc::SIGHUP].iter().any(|s| *s as u32 == signal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(annotations: serde_json::Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), serde_json::json!({ "annotations": annotations }).to_string()).unwrap();
        dir
    }

    #[test]
    fn the_request_is_read_from_the_annotations() {
        let b = bundle(serde_json::json!({ ANNOTATION: "/var/lib/cedana/stops/", BUDGET_ANNOTATION: "1500" }));
        let on = OnStop::from_bundle(b.path(), "c1").unwrap();
        assert_eq!((on.budget, on.name.as_str()), (Duration::from_millis(1500), "c1"));
        assert_eq!(on.image_path(), PathBuf::from("/var/lib/cedana/stops/c1"));

        let pod = bundle(serde_json::json!({
            ANNOTATION: "s3://bucket/stops",
            "io.kubernetes.cri.sandbox-namespace": "default",
            "io.kubernetes.cri.sandbox-name": "web-0",
            "io.kubernetes.cri.container-name": "app",
        }));
        let on = OnStop::from_bundle(pod.path(), "0123abcd").unwrap();
        assert_eq!((on.budget, on.image_path()), (DEFAULT_BUDGET, PathBuf::from("s3://bucket/stops/default_web-0_app")));

        assert!(OnStop::from_bundle(bundle(serde_json::json!({ ANNOTATION: " " })).path(), "c").is_none());
        let sandbox = bundle(serde_json::json!({ ANNOTATION: "/d", "io.kubernetes.cri.container-type": "sandbox" }));
        assert!(OnStop::from_bundle(sandbox.path(), "pause").is_none(), "a pod's sandbox is not checkpointed");
        assert!(OnStop::from_bundle(bundle(serde_json::json!({})).path(), "c").is_none());
        let bad = bundle(serde_json::json!({ ANNOTATION: "/d", BUDGET_ANNOTATION: "soon" }));
        assert_eq!(OnStop::from_bundle(bad.path(), "c").unwrap().budget, DEFAULT_BUDGET);
    }

    #[test]
    fn stopping_signals() {
        assert!(is_stop_signal(libc::SIGTERM as u32) && is_stop_signal(libc::SIGKILL as u32));
        assert!(!is_stop_signal(libc::SIGUSR1 as u32) && !is_stop_signal(libc::SIGWINCH as u32));
    }
}
