//! Errors of the task logic, classified by kind; the ttrpc adapter turns a kind into its code in one place.

use containerd_shim_protos::ttrpc::{self, Code};

/// What went wrong, as a kind the caller can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    NotFound,
    InvalidArgument,
    FailedPrecondition,
    AlreadyExists,
    Unimplemented,
    Internal,
    /// A refusal containerd's runc shim reports as a plain error (code UNKNOWN), e.g. exec in a stopped
    /// or paused task, or the runtime failing an exec; kept so clients see the same code from both shims.
    Unknown,
    /// The work did not finish in the time it had (a checkpoint-on-stop's budget).
    DeadlineExceeded,
}

/// An error of the shim: a kind and a readable message.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: Kind,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Error {
        Error { kind, message: message.into() }
    }
    pub fn not_found(message: impl Into<String>) -> Error {
        Error::new(Kind::NotFound, message)
    }
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(Kind::InvalidArgument, message)
    }
    pub fn precondition(message: impl Into<String>) -> Error {
        Error::new(Kind::FailedPrecondition, message)
    }
    pub fn unimplemented(message: impl Into<String>) -> Error {
        Error::new(Kind::Unimplemented, message)
    }
    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(Kind::Internal, message)
    }
    pub fn exists(message: impl Into<String>) -> Error {
        Error::new(Kind::AlreadyExists, message)
    }
    pub fn unknown(message: impl Into<String>) -> Error {
        Error::new(Kind::Unknown, message)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        let kind = match e.kind() {
            std::io::ErrorKind::NotFound => Kind::NotFound,
            std::io::ErrorKind::InvalidInput => Kind::InvalidArgument,
            _ => Kind::Internal,
        };
        Error::new(kind, e.to_string())
    }
}

impl Kind {
    /// The ttrpc (gRPC) code of this kind.
    pub fn code(self) -> Code {
        match self {
            Kind::NotFound => Code::NOT_FOUND,
            Kind::InvalidArgument => Code::INVALID_ARGUMENT,
            Kind::FailedPrecondition => Code::FAILED_PRECONDITION,
            Kind::AlreadyExists => Code::ALREADY_EXISTS,
            Kind::Unimplemented => Code::UNIMPLEMENTED,
            Kind::Internal => Code::INTERNAL,
            Kind::Unknown => Code::UNKNOWN,
            Kind::DeadlineExceeded => Code::DEADLINE_EXCEEDED,
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.kind.code(), e.message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_become_their_codes() {
        let e: ttrpc::Error = Error::precondition("task is running").into();
        match e {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::FAILED_PRECONDITION);
                assert_eq!(s.message(), "task is running");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(Kind::NotFound.code(), Code::NOT_FOUND);
        assert_eq!(Kind::Unimplemented.code(), Code::UNIMPLEMENTED);
        assert_eq!(Kind::Unknown.code(), Code::UNKNOWN);
    }
}
