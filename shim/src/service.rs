//! The ttrpc Task service: a thin adapter from containerd's requests to [`TaskManager`]. Every call the
//! shim does not support answers UNIMPLEMENTED (the generated defaults would answer NOT_FOUND).

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

use crate::error::Error;
use crate::runtime::Runtime;
use crate::task::TaskManager;

pub struct TaskService<R: Runtime> {
    pub manager: Arc<TaskManager<R>>,
}

fn unsupported<T>(call: &str) -> ttrpc::Result<T> {
    Err(Error::unimplemented(format!("{call} is not supported by the cedana shim yet")).into())
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
    async fn exec(&self, _ctx: &TtrpcContext, _req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        unsupported("Exec")
    }
    async fn resize_pty(&self, _ctx: &TtrpcContext, _req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        unsupported("ResizePty")
    }
    async fn close_io(&self, _ctx: &TtrpcContext, _req: CloseIORequest) -> ttrpc::Result<Empty> {
        unsupported("CloseIO")
    }
    async fn update(&self, _ctx: &TtrpcContext, _req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        unsupported("Update")
    }
    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        Ok(self.manager.wait(req).await?)
    }
    async fn stats(&self, _ctx: &TtrpcContext, _req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        unsupported("Stats")
    }
    async fn connect(&self, _ctx: &TtrpcContext, req: ConnectRequest) -> ttrpc::Result<ConnectResponse> {
        Ok(self.manager.connect(req).await?)
    }
    async fn shutdown(&self, _ctx: &TtrpcContext, req: ShutdownRequest) -> ttrpc::Result<Empty> {
        self.manager.shutdown(req).await?;
        Ok(Empty::new())
    }
}
