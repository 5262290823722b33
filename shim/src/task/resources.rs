//! A task's resources: Update (the OCI `LinuxResources` JSON containerd sends, handed to the runtime's
//! `update`) and Stats (the runtime's statistics as containerd's cgroup v1 metrics). Both act on the
//! container, so they need one: a stopped task, or one whose restore is still pending, is refused.

use containerd_shim_protos::api::{StatsRequest, StatsResponse, Status, UpdateTaskRequest};
use containerd_shim_protos::protobuf::MessageField;

use super::{not_found, status_name, TaskManager};
use crate::error::{Error, Result};
use crate::runtime::Runtime;

impl<R: Runtime> TaskManager<R> {
    /// Change the container's resources (`ctr task update --memory-limit ...`).
    pub async fn update(&self, req: UpdateTaskRequest) -> Result<()> {
        let resources = req.resources.as_ref().map(|a| a.value.clone()).unwrap_or_default();
        let parsed: serde_json::Value = serde_json::from_slice(&resources)
            .map_err(|e| Error::invalid(format!("update of task {}: resources are not OCI LinuxResources JSON: {e}", req.id)))?;
        if !parsed.is_object() {
            return Err(Error::invalid(format!("update of task {}: resources are not a JSON object", req.id)));
        }
        {
            let tasks = self.tasks.lock().await;
            let task = tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?;
            if task.status == Status::STOPPED || task.restore.is_some() {
                return Err(Error::precondition(format!(
                    "task {} cannot be updated: it is {}{}",
                    req.id,
                    status_name(task.status),
                    if task.restore.is_some() { " (restore pending)" } else { "" }
                )));
            }
        }
        self.runtime.update(&req.id, &resources).await
    }

    /// The container's cgroup statistics (`ctr task metrics`).
    pub async fn stats(&self, req: StatsRequest) -> Result<StatsResponse> {
        {
            let tasks = self.tasks.lock().await;
            let task = tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?;
            if task.restore.is_some() {
                return Err(Error::not_found(format!("task {}: cgroup does not exist (restore pending)", req.id)));
            }
        }
        let metrics = self.runtime.stats(&req.id).await?;
        Ok(StatsResponse { stats: MessageField::some(crate::stats::metrics_any(&metrics)?), ..Default::default() })
    }
}
