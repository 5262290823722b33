//! The client/server recipe the daemon and CLI use, end to end over a Unix socket: a tonic server with the
//! `Daemon` service (a stub), the standard gRPC health service and server reflection, and a client made by
//! `cedana_protos::connect_uds`.

use std::path::Path;

use cedana_protos::v1::daemon_client::DaemonClient;
use cedana_protos::v1::daemon_server::{Daemon, DaemonServer};
use cedana_protos::v1::{
    AttachInput, AttachOutput, CheckRequest, CheckResponse, CheckpointList, DumpRequest, DumpResponse, HealthComponent, Job,
    JobList, JobRef, KillRequest, ListRequest, ManageRequest, RestoreRequest, RestoreResponse, RunRequest,
};
use tokio::net::UnixListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

/// Answers Check with one component; everything else is unimplemented.
struct Stub;

fn unimplemented<T>(method: &str) -> Result<Response<T>, Status> {
    Err(Status::unimplemented(format!("{method} is not implemented by the stub")))
}

#[tonic::async_trait]
impl Daemon for Stub {
    async fn run(&self, _: Request<RunRequest>) -> Result<Response<Job>, Status> {
        unimplemented("Run")
    }
    async fn manage(&self, _: Request<ManageRequest>) -> Result<Response<Job>, Status> {
        unimplemented("Manage")
    }
    async fn list(&self, _: Request<ListRequest>) -> Result<Response<JobList>, Status> {
        unimplemented("List")
    }
    async fn inspect(&self, _: Request<JobRef>) -> Result<Response<Job>, Status> {
        unimplemented("Inspect")
    }
    async fn kill(&self, _: Request<KillRequest>) -> Result<Response<Job>, Status> {
        unimplemented("Kill")
    }
    async fn delete(&self, _: Request<JobRef>) -> Result<Response<Job>, Status> {
        unimplemented("Delete")
    }
    async fn checkpoints(&self, _: Request<JobRef>) -> Result<Response<CheckpointList>, Status> {
        unimplemented("Checkpoints")
    }
    async fn dump(&self, _: Request<DumpRequest>) -> Result<Response<DumpResponse>, Status> {
        unimplemented("Dump")
    }
    async fn restore(&self, _: Request<RestoreRequest>) -> Result<Response<RestoreResponse>, Status> {
        unimplemented("Restore")
    }

    type AttachStream = tokio_stream::Empty<Result<AttachOutput, Status>>;

    async fn attach(&self, _: Request<Streaming<AttachInput>>) -> Result<Response<Self::AttachStream>, Status> {
        unimplemented("Attach")
    }

    async fn check(&self, _: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(CheckResponse {
            components: vec![HealthComponent { name: "stub".into(), ok: true, detail: "all good".into() }],
        }))
    }
}

/// Serves the stub, health and reflection on `path` until `shutdown` fires.
async fn start_server(path: &Path) -> (oneshot::Sender<()>, JoinHandle<Result<(), tonic::transport::Error>>) {
    let listener = UnixListener::bind(path).expect("bind the socket");
    let incoming = UnixListenerStream::new(listener);

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<DaemonServer<Stub>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(cedana_protos::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("build the reflection service");

    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(
        Server::builder()
            .add_service(health_service)
            .add_service(reflection)
            .add_service(DaemonServer::new(Stub))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = shutdown_rx.await;
            }),
    );
    (shutdown_tx, server)
}

#[tokio::test]
async fn daemon_health_and_reflection_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cedana.sock");
    let (shutdown, server) = start_server(&socket).await;

    let channel = cedana_protos::connect_uds(&socket).await.expect("connect to the socket");

    // The daemon's own service: Check answers, the rest is unimplemented.
    let mut daemon = DaemonClient::new(channel.clone());
    let check = daemon.check(CheckRequest {}).await.expect("Check").into_inner();
    assert_eq!(check.components, vec![HealthComponent { name: "stub".into(), ok: true, detail: "all good".into() }]);
    let err = daemon.list(ListRequest {}).await.expect_err("List is not implemented");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    let err = daemon.inspect(JobRef { jid: "nope".into() }).await.expect_err("Inspect is not implemented");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");

    // Standard health service, for the server as a whole and for the Daemon service by name.
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "cedana.daemon.v1.Daemon"] {
        let status = health
            .check(HealthCheckRequest { service: service.into() })
            .await
            .unwrap_or_else(|e| panic!("health check of {service:?}: {e:?}"))
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "health of {service:?}");
    }

    // Reflection lists the Daemon service from FILE_DESCRIPTOR_SET.
    let mut reflection = ServerReflectionClient::new(channel);
    let request =
        ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut replies = reflection.server_reflection_info(tokio_stream::iter([request])).await.expect("reflection").into_inner();
    let reply = replies.message().await.expect("reflection reply").expect("one reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply: {reply:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.iter().any(|n| n == "cedana.daemon.v1.Daemon"), "services: {names:?}");

    shutdown.send(()).unwrap();
    server.await.unwrap().expect("server ran cleanly");
}

#[tokio::test]
async fn connecting_to_a_missing_socket_reports_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let err = cedana_protos::connect_uds(dir.path().join("absent.sock")).await.expect_err("nothing listens there");
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    let mut kind = None;
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            kind = Some(io.kind());
            break;
        }
        source = e.source();
    }
    assert_eq!(kind, Some(std::io::ErrorKind::NotFound), "{err:?}");
}

#[test]
fn descriptor_set_and_version() {
    assert_eq!(cedana_protos::API_VERSION, "v1");
    assert!(!cedana_protos::FILE_DESCRIPTOR_SET.is_empty());
}
