//! The class of an error, for front ends that speak a wire protocol: the daemon maps a kind to a gRPC code,
//! the shim to a ttrpc code, the CLI to its exit status and advice. Every error of the library has one.

/// What went wrong, in the terms of a wire protocol (the codes gRPC and ttrpc share).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A process, container, checkpoint or file that does not exist.
    NotFound,
    /// The request itself is wrong, whatever the state (a bad name, an unknown compression).
    InvalidArgument,
    /// The request is fine but the state of things does not allow it (a stopped container, a PID in use,
    /// a corrupt checkpoint, a hook that refused).
    FailedPrecondition,
    /// What the request would create exists already.
    AlreadyExists,
    /// Out of disk space or another resource.
    ResourceExhausted,
    /// A tool or service the operation needs is missing or not answering (CRIU, runc).
    Unavailable,
    /// The caller cancelled, or the deadline passed.
    Cancelled,
    /// Not supported (yet).
    Unimplemented,
    /// The caller may not do this (another user's process, job or checkpoint; a folder they cannot write).
    PermissionDenied,
    /// Anything else: a failure inside CRIU, the runtime or the system.
    Internal,
}

impl ErrorKind {
    /// The kind an I/O error stands for.
    pub fn of_io(e: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::NotFound => ErrorKind::NotFound,
            K::AlreadyExists => ErrorKind::AlreadyExists,
            K::PermissionDenied | K::ReadOnlyFilesystem => ErrorKind::FailedPrecondition,
            K::StorageFull | K::QuotaExceeded | K::OutOfMemory => ErrorKind::ResourceExhausted,
            K::InvalidInput => ErrorKind::InvalidArgument,
            K::Interrupted => ErrorKind::Cancelled,
            // A store or peer that does not answer: worth retrying later.
            K::TimedOut | K::ConnectionRefused | K::ConnectionReset | K::ConnectionAborted | K::NotConnected => {
                ErrorKind::Unavailable
            }
            _ => ErrorKind::Internal,
        }
    }

    /// The gRPC status code number of this kind (the same numbers ttrpc uses).
    pub fn code(self) -> i32 {
        match self {
            ErrorKind::Cancelled => 1,
            ErrorKind::InvalidArgument => 3,
            ErrorKind::NotFound => 5,
            ErrorKind::AlreadyExists => 6,
            ErrorKind::ResourceExhausted => 8,
            ErrorKind::FailedPrecondition => 9,
            ErrorKind::PermissionDenied => 7,
            ErrorKind::Unimplemented => 12,
            ErrorKind::Internal => 13,
            ErrorKind::Unavailable => 14,
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::FailedPrecondition => "failed precondition",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::ResourceExhausted => "resource exhausted",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Unimplemented => "unimplemented",
            ErrorKind::PermissionDenied => "permission denied",
            ErrorKind::Internal => "internal",
        };
        f.write_str(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_kinds_and_codes() {
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(ErrorKind::of_io(&full), ErrorKind::ResourceExhausted);
        let missing = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(ErrorKind::of_io(&missing), ErrorKind::NotFound);
        assert_eq!(ErrorKind::of_io(&std::io::Error::other("x")), ErrorKind::Internal);
        assert_eq!(ErrorKind::FailedPrecondition.code(), 9);
        assert_eq!(ErrorKind::Unavailable.to_string(), "unavailable");
    }
}
