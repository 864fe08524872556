//! How etcd client errors become witness errors.

use tonic::Code;

use crate::WitnessError;

/// A failed connection to `endpoint`.
pub(super) fn connect_error(endpoint: &str, e: etcd_client::Error) -> WitnessError {
    match e {
        etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_) => {
            WitnessError::Config(format!("the etcd endpoints {endpoint} cannot be used: {e}"))
        }
        e => rpc_error(endpoint, "connecting", e),
    }
}

/// A failed request (`what` names it for the message).
pub(super) fn rpc_error(endpoint: &str, what: &str, e: etcd_client::Error) -> WitnessError {
    use etcd_client::Error as E;
    let unreachable = |detail: String| WitnessError::Unreachable {
        endpoint: endpoint.to_string(),
        detail,
    };
    match e {
        E::TransportError(t) => unreachable(format!("{what} failed: {t}")),
        E::IoError(io) => unreachable(format!("{what} failed: {io}")),
        E::GRpcStatus(s) => match class(s.code()) {
            Class::Unreachable => unreachable(format!("{what} failed: {}", s.message())),
            Class::Refused => WitnessError::Rejected(format!(
                "etcd refused {what} ({}): {}",
                s.code().description(),
                s.message()
            )),
            Class::Malformed => WitnessError::Protocol(format!(
                "etcd failed {what} ({}): {}",
                s.code().description(),
                s.message()
            )),
        },
        e => WitnessError::Protocol(format!("{what} failed: {e}")),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Class {
    /// The cluster did not answer (down, no leader, cut off, overloaded).
    Unreachable,
    /// The cluster answered and refused the request (permissions, limits, arguments).
    Refused,
    /// Anything else: an answer this client cannot use.
    Malformed,
}

fn class(code: Code) -> Class {
    match code {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Aborted
        | Code::Unknown
        | Code::ResourceExhausted => Class::Unreachable,
        Code::PermissionDenied
        | Code::Unauthenticated
        | Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::NotFound
        | Code::AlreadyExists => Class::Refused,
        Code::Ok | Code::Unimplemented | Code::Internal | Code::DataLoss => Class::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unavailable_cluster_is_unreachable() {
        let e = rpc_error(
            "http://h:2379",
            "reading the record",
            etcd_client::Error::GRpcStatus(tonic::Status::unavailable("no leader")),
        );
        assert!(matches!(e, WitnessError::Unreachable { .. }), "{e}");
    }

    #[test]
    fn a_permission_error_is_a_refusal_not_an_outage() {
        let e = rpc_error(
            "http://h:2379",
            "writing the record",
            etcd_client::Error::GRpcStatus(tonic::Status::permission_denied(
                "etcdserver: permission denied",
            )),
        );
        assert!(matches!(e, WitnessError::Rejected(_)), "{e}");
        assert!(e.to_string().contains("writing the record"), "{e}");
    }

    #[test]
    fn an_unusable_answer_is_a_protocol_error() {
        let e = rpc_error(
            "http://h:2379",
            "reading the record",
            etcd_client::Error::Utf8Error(String::from_utf8(vec![0xff]).unwrap_err().utf8_error()),
        );
        assert!(matches!(e, WitnessError::Protocol(_)), "{e}");
    }
}
