//! The ttrpc Task service: a thin adapter from containerd's requests to [`TaskManager`], which implements
//! every call of the task API v2.

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim_protos::api::{
    CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse, DeleteRequest,
    DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest,
    ResumeRequest, ShutdownRequest, StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse,
    UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::{self, r#async::TtrpcContext};

use crate::runtime::Runtime;
use crate::task::TaskManager;

/// containerd's Task service over a [`TaskManager`].
pub struct TaskService<R: Runtime> {
    pub manager: Arc<TaskManager<R>>,
}

#[async_trait]
impl<R: Runtime> Task for TaskService<R> {
    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        Ok(self.manager.state(req).await?)
    }
    async fn create(&self, _ctx: &TtrpcContext, req: CreateTaskRequest) -> ttrpc::Result<CreateTaskResponse> {
        Ok(self.manager.create(req).await?)
    }
    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        Ok(self.manager.start(req).await?)
    }
    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> ttrpc::Result<DeleteResponse> {
        Ok(self.manager.delete(req).await?)
    }
    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        Ok(self.manager.pids(req).await?)
    }
    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> ttrpc::Result<Empty> {
        self.manager.pause(req).await?;
        Ok(Empty::new())
    }
    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> ttrpc::Result<Empty> {
        self.manager.resume(req).await?;
        Ok(Empty::new())
    }
    async fn checkpoint(&self, _ctx: &TtrpcContext, req: CheckpointTaskRequest) -> ttrpc::Result<Empty> {
        self.manager.checkpoint(req).await?;
        Ok(Empty::new())
    }
    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        self.manager.kill(req).await?;
        Ok(Empty::new())
    }
    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        self.manager.exec(req).await?;
        Ok(Empty::new())
    }
    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        self.manager.resize_pty(req).await?;
        Ok(Empty::new())
    }
    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        self.manager.close_io(req).await?;
        Ok(Empty::new())
    }
    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        self.manager.update(req).await?;
        Ok(Empty::new())
    }
    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        Ok(self.manager.wait(req).await?)
    }
    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        Ok(self.manager.stats(req).await?)
    }
    async fn connect(&self, _ctx: &TtrpcContext, req: ConnectRequest) -> ttrpc::Result<ConnectResponse> {
        Ok(self.manager.connect(req).await?)
    }
    async fn shutdown(&self, _ctx: &TtrpcContext, req: ShutdownRequest) -> ttrpc::Result<Empty> {
        self.manager.shutdown(req).await?;
        Ok(Empty::new())
    }
}
