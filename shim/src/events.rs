//! Task events and where they go: containerd's event service in the shim, a channel in tests.

use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim_protos::events::task::{
    TaskCheckpointed, TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused, TaskResumed,
    TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::wrappers::StringValue;
use containerd_shim_protos::protobuf::MessageDyn;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::context::Context;
use tokio::sync::mpsc;

/// One event of a task's life, as containerd's event types.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Create(TaskCreate),
    Start(TaskStart),
    Exit(TaskExit),
    Delete(TaskDelete),
    Paused(TaskPaused),
    Resumed(TaskResumed),
    Checkpointed(TaskCheckpointed),
    ExecAdded(TaskExecAdded),
    ExecStarted(TaskExecStarted),
    Oom(TaskOOM),
    /// A checkpoint-on-stop failed (see [`crate::on_stop`]): JSON with `container_id`, `destination`, `error`.
    StopCheckpointFailed(StringValue),
}

impl Event {
    /// The topic containerd files this event under.
    pub fn topic(&self) -> &'static str {
        match self {
            Event::Create(_) => topics::TASK_CREATE_EVENT_TOPIC,
            Event::Start(_) => topics::TASK_START_EVENT_TOPIC,
            Event::Exit(_) => topics::TASK_EXIT_EVENT_TOPIC,
            Event::Delete(_) => topics::TASK_DELETE_EVENT_TOPIC,
            Event::Paused(_) => topics::TASK_PAUSED_EVENT_TOPIC,
            Event::Resumed(_) => topics::TASK_RESUMED_EVENT_TOPIC,
            Event::Checkpointed(_) => topics::TASK_CHECKPOINTED_EVENT_TOPIC,
            Event::ExecAdded(_) => topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Event::ExecStarted(_) => topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Event::Oom(_) => topics::TASK_OOM_EVENT_TOPIC,
            Event::StopCheckpointFailed(_) => crate::on_stop::FAILED_TOPIC,
        }
    }

    fn into_message(self) -> Box<dyn MessageDyn> {
        match self {
            Event::Create(e) => Box::new(e),
            Event::Start(e) => Box::new(e),
            Event::Exit(e) => Box::new(e),
            Event::Delete(e) => Box::new(e),
            Event::Paused(e) => Box::new(e),
            Event::Resumed(e) => Box::new(e),
            Event::Checkpointed(e) => Box::new(e),
            Event::ExecAdded(e) => Box::new(e),
            Event::ExecStarted(e) => Box::new(e),
            Event::Oom(e) => Box::new(e),
            Event::StopCheckpointFailed(e) => Box::new(e),
        }
    }
}

/// Sends events in the order they are given, without blocking the caller.
pub trait EventSender: Send + Sync + 'static {
    fn send(&self, event: Event);
}

/// Events into a channel (tests, or any in-process consumer).
impl EventSender for mpsc::UnboundedSender<Event> {
    fn send(&self, event: Event) {
        let _ = mpsc::UnboundedSender::send(self, event);
    }
}

/// Events to containerd through the crate's publisher, in order, from one forwarding task.
pub struct RemoteEvents {
    queue: mpsc::UnboundedSender<Event>,
}

impl RemoteEvents {
    /// Forward events to `publisher` under `namespace`. Must be called within a tokio runtime.
    pub fn new(publisher: RemotePublisher, namespace: String) -> RemoteEvents {
        let (queue, mut rx) = mpsc::unbounded_channel::<Event>();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                let topic = event.topic();
                if let Err(e) = publisher.publish(Context::default(), topic, &namespace, event.into_message()).await {
                    log::error!("publishing {topic}: {e}");
                }
            }
        });
        RemoteEvents { queue }
    }
}

impl EventSender for RemoteEvents {
    fn send(&self, event: Event) {
        let _ = self.queue.send(event);
    }
}
