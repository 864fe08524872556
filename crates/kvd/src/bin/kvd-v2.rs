//! kvd with replicated schema version 2.
fn main() -> std::process::ExitCode {
    kvd::run(kvd::SchemaVersion::V2)
}
