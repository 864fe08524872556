//! Replication benchmark on loopback TCP (`hitless bench sync`).

use serde::Serialize;

use crate::SyncError;

/// Benchmark parameters.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Mutations replicated per throughput run.
    pub mutations: u64,
    /// Mutations per `submit` batch.
    pub batch: usize,
    /// Key length in bytes.
    pub key_len: usize,
    /// Value length in bytes.
    pub value_len: usize,
    /// Synchronous ack latency samples.
    pub ack_samples: usize,
    /// Bulk state size in bytes.
    pub bulk_bytes: u64,
    /// Value size of the bulk state's records.
    pub bulk_value_len: usize,
    /// Loopback round-trip samples.
    pub rtt_samples: usize,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            mutations: 4_000_000,
            batch: 1024,
            key_len: 16,
            value_len: 16,
            ack_samples: 20_000,
            bulk_bytes: 1 << 30,
            bulk_value_len: 64 << 10,
            rtt_samples: 20_000,
        }
    }
}

/// Benchmark figures.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Replicated mutations per second, one standby.
    pub mutations_per_s_1_standby: f64,
    /// Replicated mutations per second, three standbys.
    pub mutations_per_s_3_standbys: f64,
    /// Synchronous-mode ack latency p50 (µs) of a one-mutation apply.
    pub ack_p50_us: f64,
    /// Synchronous-mode ack latency p99 (µs).
    pub ack_p99_us: f64,
    /// Bulk snapshot transfer rate (MiB/s) until the standby is ready.
    pub bulk_mib_per_s: f64,
    /// Bulk state size in MiB.
    pub bulk_mib: f64,
    /// Loopback TCP round trip p50 (µs), measured in the same run.
    pub loopback_rtt_p50_us: f64,
    /// Loopback TCP round trip p99 (µs).
    pub loopback_rtt_p99_us: f64,
    /// Mutations per run.
    pub mutations: u64,
    /// Batch size.
    pub batch: usize,
    /// Key and value lengths.
    pub key_len: usize,
    /// Value length.
    pub value_len: usize,
}

/// Runs the benchmark.
pub fn run(cfg: &BenchConfig) -> Result<BenchReport, SyncError> {
    let _ = cfg;
    todo!()
}
