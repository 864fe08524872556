//! `hitless witness`: the builtin witness daemon, in the foreground until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use hitless_witness::builtin::ServerConfig;

/// The daemon's command line.
#[derive(Args, Debug, Clone)]
pub struct WitnessArgs {
    /// The address to listen on (host:port).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Where the pairs' records are kept (created if missing).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The longest lease granted, in milliseconds; for as long after a start no lease is
    /// granted (a lease granted before the start may still run).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub lease_max_ms: u64,
}

impl WitnessArgs {
    fn config(&self) -> ServerConfig {
        let mut c = ServerConfig::new(&self.data_dir);
        c.lease_max = Duration::from_millis(self.lease_max_ms);
        c
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(args: &WitnessArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let shutdown = stop_signal().context("cannot watch for SIGTERM")?;
        hitless_witness::builtin::run(args.listen, args.config(), shutdown).await?;
        Ok(())
    })
}

/// Completes on the first SIGTERM or SIGINT.
fn stop_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cmd {
        #[command(flatten)]
        args: WitnessArgs,
    }

    fn parse(argv: &[&str]) -> Result<WitnessArgs, String> {
        let mut full = vec!["witness"];
        full.extend_from_slice(argv);
        Cmd::try_parse_from(full)
            .map(|c| c.args)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_lease_period_defaults_to_ten_seconds_and_is_bounded() {
        let a = parse(&["--listen", "127.0.0.1:7400", "--data-dir", "/var/lib/w"]).unwrap();
        assert_eq!(a.config().lease_max, Duration::from_secs(10));
        assert_eq!(a.config().data_dir, PathBuf::from("/var/lib/w"));
        let a = parse(&[
            "--listen",
            "[::1]:7400",
            "--data-dir",
            "d",
            "--lease-max-ms",
            "250",
        ])
        .unwrap();
        assert_eq!(a.config().lease_max, Duration::from_millis(250));
        for bad in ["5", "60001"] {
            let e = parse(&[
                "--listen",
                "127.0.0.1:1",
                "--data-dir",
                "d",
                "--lease-max-ms",
                bad,
            ])
            .unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        assert!(parse(&["--listen", "nowhere", "--data-dir", "d"]).is_err());
    }
}
