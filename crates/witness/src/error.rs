//! Errors of witness clients and of the builtin daemon.

/// Why a witness request did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    /// No answer within the request timeout, or the connection failed.
    #[error("the witness at {endpoint} is unreachable: {detail}")]
    Unreachable {
        /// Where.
        endpoint: String,
        /// What failed.
        detail: String,
    },
    /// The witness answered something this build cannot read.
    #[error("the witness answered a malformed message: {0}")]
    Protocol(String),
    /// The witness refused the request itself (not the change: the request).
    #[error("the witness refused the request: {0}")]
    Rejected(String),
    /// The stored record breaks the record's limits.
    #[error("the witness holds an invalid record: {0}")]
    BadRecord(String),
    /// Other writers kept moving the record.
    #[error("the record kept changing: {rounds} compare-and-swap rounds lost in a row")]
    Contended {
        /// Rounds tried.
        rounds: usize,
    },
    /// A configuration the client cannot use.
    #[error("invalid witness configuration: {0}")]
    Config(String),
}
