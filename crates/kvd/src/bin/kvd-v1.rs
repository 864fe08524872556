//! kvd with replicated schema version 1.
fn main() -> std::process::ExitCode {
    kvd::run(kvd::SchemaVersion::V1)
}
