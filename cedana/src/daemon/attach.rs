//! The Attach call: a client's stdin into an attachable job, the job's output and exit status back.

use cedana::error::ErrorKind;
use cedana_protos::v1 as pb;
use tonic::Request;

use super::convert::status;
use super::service::{Reply, Service};

/// The stream of a job's output, as the generated service wants it.
pub type AttachStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::AttachOutput, tonic::Status>> + Send>>;

/// Serve one Attach call.
pub async fn serve(_service: Service, _request: Request<tonic::Streaming<pb::AttachInput>>) -> Reply<AttachStream> {
    Err(status(ErrorKind::Unimplemented, "attaching to jobs is not built yet"))
}
