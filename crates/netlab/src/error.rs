use std::time::Duration;

/// Everything that can go wrong while building, partitioning or removing a lab network.
///
/// Failures of an external tool (`ip`, `nft`) name the command line and carry its stderr, so the
/// operator sees what the kernel refused.
#[derive(Debug, thiserror::Error)]
pub enum NetlabError {
    /// The plan is refused before anything is made.
    #[error("the network plan is invalid: {reason}")]
    InvalidPlan {
        /// What is wrong, naming the field.
        reason: String,
    },
    /// A namespace name or prefix cannot be used.
    #[error("`{name}` cannot be used as a {what}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What the name was for ("network namespace name", "prefix").
        what: &'static str,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A command could not be started (binary missing, namespace missing, ...).
    #[error("could not run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The error of the spawn.
        #[source]
        source: std::io::Error,
    },
    /// A command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr (trimmed, bounded).
        stderr: String,
    },
    /// A command did not finish in time and was killed.
    #[error("`{command}` did not finish within {timeout:?} and was killed")]
    Timeout {
        /// The command line.
        command: String,
        /// The bound it exceeded.
        timeout: Duration,
    },
    /// The output of a command could not be understood.
    #[error("could not read the output of `{command}`: {reason}")]
    Output {
        /// The command line.
        command: String,
        /// What did not parse.
        reason: String,
    },
    /// Reading or writing a file (namespace directory, sysctl) failed.
    #[error("could not {action} {path}: {source}")]
    Io {
        /// What was attempted ("read", "write 0 to", ...).
        action: String,
        /// The file or directory.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// `setns` into a network namespace failed.
    #[error("could not enter network namespace `{netns}`: {source}")]
    Enter {
        /// The namespace name.
        netns: String,
        /// The error of `open` or `setns`.
        #[source]
        source: std::io::Error,
    },
    /// Sending the gratuitous ARP of an address failed.
    #[error("could not announce {addr} from {interface} in network namespace `{netns}`: {source}")]
    Announce {
        /// The namespace.
        netns: String,
        /// The interface inside it.
        interface: String,
        /// The address announced.
        addr: std::net::Ipv4Addr,
        /// The error of the packet socket.
        #[source]
        source: std::io::Error,
    },
    /// A partition name is not one of the known kinds.
    #[error("unknown partition `{name}`; expected one of: {expected}")]
    UnknownPartition {
        /// The name given.
        name: String,
        /// The known names, comma-separated.
        expected: String,
    },
    /// The partition tables found in the namespaces do not describe one partition.
    #[error("the partition rules in place are inconsistent ({detail}); heal removes them all")]
    PartitionInconsistent {
        /// What was found where.
        detail: String,
    },
    /// Names of the prefix were still present after removal.
    #[error("could not remove {names:?}: still present after {waited:?}")]
    Leftover {
        /// What is still there.
        names: Vec<String>,
        /// How long destroy waited.
        waited: Duration,
    },
}
