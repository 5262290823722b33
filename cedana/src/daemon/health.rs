//! The daemon's health check (`check`): CRIU, the job store, checkpoint storage and GPUs.

use cedana_protos::v1 as pb;

use super::service::Service;

impl Service {
    pub(super) fn check(&self) -> pb::CheckResponse {
        let mut components = Vec::new();
        let criu = self.engine.criu().criu().binary().display().to_string();
        components.push(pb::HealthComponent {
            name: "criu".into(),
            ok: true,
            detail: format!("{} at {criu} ({:?} driver)", self.engine.criu_version(), self.engine.config().criu_driver()),
        });
        let db = self.store.list().map(|jobs| format!("{} jobs", jobs.len()));
        components.push(pb::HealthComponent {
            name: "database".into(),
            ok: db.is_ok(),
            detail: db.unwrap_or_else(|e| e.to_string()),
        });
        let dir = self.engine.config().checkpoint_dir();
        let storage = std::fs::create_dir_all(&dir).and_then(|()| tempfile::tempfile_in(&dir).map(drop));
        components.push(pb::HealthComponent {
            name: "storage".into(),
            ok: storage.is_ok(),
            detail: match storage {
                Ok(()) => format!("{} is writable", dir.display()),
                Err(e) => format!("{}: {e}", dir.display()),
            },
        });
        let gpus = std::fs::read_dir("/dev")
            .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("nvidia")).count());
        components.push(pb::HealthComponent {
            name: "gpu".into(),
            ok: true,
            detail: match gpus {
                Ok(0) | Err(_) => "no NVIDIA GPU on this machine".into(),
                Ok(n) => format!("{n} NVIDIA device nodes"),
            },
        });
        pb::CheckResponse { components }
    }
}
