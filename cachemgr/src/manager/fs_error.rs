//! `FsError`: how an operation of the core fails, as an errno (`libc::E*`); RPC and chunk
//! cache failures map here.
//! Invariant: the value is a positive errno (anything else becomes `EIO`), so an adapter
//! hands it on as it is.

use proto::{ErrorCode, ProtoError, Response};
use tracing::warn;

/// The failure of a filesystem operation, as the errno the kernel (or `holdfast fs`) is
/// told. Anything but a positive errno becomes `EIO`, as the kernel would have it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FsError(i32);

pub type FsResult<T> = Result<T, FsError>;

impl FsError {
    pub const EACCES: FsError = FsError(libc::EACCES);
    pub const EAGAIN: FsError = FsError(libc::EAGAIN);
    pub const EFBIG: FsError = FsError(libc::EFBIG);
    pub const EINVAL: FsError = FsError(libc::EINVAL);
    pub const EIO: FsError = FsError(libc::EIO);
    pub const EMFILE: FsError = FsError(libc::EMFILE);
    pub const ENOENT: FsError = FsError(libc::ENOENT);
    pub const ESTALE: FsError = FsError(libc::ESTALE);
    pub const ETIMEDOUT: FsError = FsError(libc::ETIMEDOUT);
    pub const EXDEV: FsError = FsError(libc::EXDEV);

    pub fn from_errno(errno: i32) -> FsError {
        if errno > 0 {
            FsError(errno)
        } else {
            FsError::EIO
        }
    }

    pub fn errno(self) -> i32 {
        self.0
    }
}

/// The text `strerror` gives.
impl std::fmt::Display for FsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::io::Error::from_raw_os_error(self.0).fmt(f)
    }
}

impl std::error::Error for FsError {}

/// What a failed RPC gives the caller: the server's error code as its errno; a server
/// that cannot be reached (refused, reset, closed, no answer within the timeout) or a
/// pair with no active member within the failover timeout as `ETIMEDOUT`, as OpenAFS
/// reports a down server; anything else on the way (a garbled frame) as `EIO`.
pub fn rpc_error(e: &ProtoError) -> FsError {
    match e {
        // The pool passes `NotActive` on only once it gave up waiting for a takeover.
        ProtoError::Remote(ErrorCode::NotActive { .. }) => FsError::ETIMEDOUT,
        ProtoError::Remote(code) => FsError::from_errno(code.errno()),
        // A request the server's protocol version lacks (a special file for an older
        // server): that server cannot do it.
        ProtoError::PeerTooOld { .. } => FsError::from_errno(libc::EOPNOTSUPP),
        e if e.is_transport() => FsError::ETIMEDOUT,
        _ => FsError::EIO,
    }
}

pub(crate) fn chunk_io_error(e: std::io::Error) -> FsError {
    warn!(error = %e, "chunk cache i/o failed");
    FsError::EIO
}

pub(crate) fn unexpected(response: &Response) -> FsError {
    warn!(
        response = response.kind_name(),
        "fileserver sent a response of the wrong kind"
    );
    FsError::EIO
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn an_unreachable_server_maps_to_etimedout() {
        let e = ProtoError::Timeout(Duration::from_secs(2));
        assert_eq!(rpc_error(&e).errno(), libc::ETIMEDOUT);
        assert_eq!(rpc_error(&ProtoError::Closed), FsError::ETIMEDOUT);
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(rpc_error(&ProtoError::Io(refused)), FsError::ETIMEDOUT);
        let fenced = ErrorCode::NotActive {
            epoch: proto::Epoch(3),
            hint: None,
        };
        assert_eq!(rpc_error(&ProtoError::Remote(fenced)), FsError::ETIMEDOUT);
        let e = ProtoError::Remote(ErrorCode::NoSuchEntry);
        assert_eq!(rpc_error(&e), FsError::ENOENT);
        assert_eq!(
            rpc_error(&ProtoError::Handshake("bad".into())),
            FsError::EIO
        );
    }

    #[test]
    fn only_positive_errnos_are_kept_and_read_as_strerror() {
        assert_eq!(FsError::from_errno(libc::ENOSPC).errno(), libc::ENOSPC);
        assert_eq!(FsError::from_errno(0), FsError::EIO);
        assert_eq!(FsError::from_errno(-libc::ENOENT), FsError::EIO);
        assert_eq!(
            FsError::ENOENT.to_string(),
            std::io::Error::from_raw_os_error(libc::ENOENT).to_string()
        );
    }
}
