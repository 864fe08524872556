//! The agent's TOML configuration.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use hitless_core::ApplianceId;
pub use hitless_vmm::BackendKind;

/// The largest configuration file accepted.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// A configuration that cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the configuration file {path} is {size} bytes, over the limit of {MAX_CONFIG_BYTES}")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("the configuration file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("the configuration file {path} is not valid: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
}

/// Peer failure detection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeartbeatConfig {
    /// Interval between heartbeats to the peer agent.
    pub interval_ms: u64,
    /// Heartbeats missed before the peer is declared lost.
    pub misses: u32,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        Self {
            interval_ms: 50,
            misses: 3,
        }
    }
}

/// Resources and addresses of instances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InstanceConfig {
    /// This host's address for instances: what they listen on (a process shares the host's
    /// network; a VM's ports are forwarded from it) and what the peer appliance's instances
    /// and front dial. On a pair of real hosts, the address of the interface that faces the
    /// peer; `127.0.0.1` (the default) only when both appliances run on one machine. The
    /// agent refuses to start if the host does not have it.
    pub host_addr: IpAddr,
    /// First port for instances on this appliance; each instance slot uses two
    /// (service, sync). Keep it outside the ephemeral port range (see
    /// /proc/sys/net/ipv4/ip_local_port_range), or an outgoing connection may hold a port an
    /// instance needs.
    pub port_base: u16,
    /// Memory limit of one instance in MiB.
    pub memory_mib: u64,
    /// CPU limit of one instance, in percent of one CPU.
    pub cpu_percent: u32,
    /// Virtual CPUs of a VM instance.
    pub vcpus: u32,
    /// Grace period of a stop before the instance is killed, in milliseconds.
    pub stop_grace_ms: u64,
    /// After the designated HA standby of the instance in control drops out, how long that
    /// instance holds acknowledgements before it gives them without the standby (degraded),
    /// in milliseconds: a failover decided meanwhile may be promoting that standby. Longer
    /// than detecting a lost instance or appliance and failing over. Default: 1000 with the
    /// process backend, 5000 with QEMU (emulated guests react slower).
    pub ha_grace_ms: Option<u64>,
}

impl Default for InstanceConfig {
    fn default() -> Self {
        Self {
            host_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port_base: 17800,
            memory_mib: 512,
            cpu_percent: 100,
            vcpus: 1,
            stop_grace_ms: 3000,
            ha_grace_ms: None,
        }
    }
}

/// The service address as a virtual IP of its own (two real hosts): the appliance in control
/// adds `service_addr`'s IP to `interface` and announces it; the other does not hold it.
/// Without this section the address is shared on one host (both fronts bind it with
/// SO_REUSEPORT), which only works when both appliances run on one machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipSection {
    /// The interface that faces the clients, e.g. `eth0`.
    pub interface: String,
    /// The prefix length the address is added with (the clients' subnet).
    pub prefix_len: u8,
    /// Gratuitous ARP (IPv4) or unsolicited neighbour advertisements (IPv6).
    #[serde(default)]
    pub announce: hitless_vip::AnnounceConfig,
}

/// How reads are served while the pair may be split (see `docs/ARCHITECTURE.md`, "The
/// witness").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReadMode {
    /// The instance in control answers reads as long as it runs: during a partition the
    /// old side may answer a read with a value the new side has since overwritten.
    #[default]
    Any,
    /// The appliance in control holds a lease at the witness and its front stops answering
    /// before the lease could have run out there; a promotion waits for the lease to run out.
    Lease,
}

/// The HA grace instances get with a witness: an hour, far beyond their acknowledgement
/// timeout, so that only the control plane (after the witness dropped the standby) lets the
/// instance in control acknowledge without it.
pub const WITNESS_HA_GRACE_MS: u64 = 3_600_000;

/// The warning given (at start, in `hitless status`, in the lab's report) when a pair has no
/// witness.
pub const NO_WITNESS_WARNING: &str = "no witness: a partition between the appliances can lose acknowledged writes (see docs/ARCHITECTURE.md, \"The witness\")";

/// The pair's third vote (see `docs/ARCHITECTURE.md`, "The witness").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WitnessSection {
    /// `"none"` (a partition can lose acknowledged writes), `"builtin"` (the
    /// `hitless witness` daemon) or `"etcd"`.
    pub kind: hitless_witness::WitnessKind,
    /// Where the witness is: `host:port` of the builtin daemon, or etcd client URLs
    /// (`http://host:2379`).
    pub endpoints: Vec<String>,
    /// The name of the pair's record at the witness (several pairs may share one witness).
    pub pair: String,
    /// Bound of one request to the witness, in milliseconds.
    pub timeout_ms: u64,
    /// How reads are served during a partition.
    pub reads: ReadMode,
    /// The read lease (with `reads = "lease"`), in milliseconds.
    pub lease_ms: u64,
}

impl WitnessSection {
    /// Its kind and endpoints, or [`NO_WITNESS_WARNING`].
    pub fn summary(&self) -> String {
        match self.kind {
            hitless_witness::WitnessKind::None => NO_WITNESS_WARNING.to_string(),
            kind => format!(
                "{kind} at {} (pair {:?}, reads {:?})",
                self.endpoints.join(", "),
                self.pair,
                self.reads
            ),
        }
    }
}

impl Default for WitnessSection {
    fn default() -> Self {
        Self {
            kind: hitless_witness::WitnessKind::None,
            endpoints: Vec::new(),
            pair: "hitless".into(),
            timeout_ms: 250,
            reads: ReadMode::Any,
            lease_ms: 2_000,
        }
    }
}

/// Who may use the HTTP API (see `docs/SECURITY.md`, "The API").
///
/// With a tokens file, every request needs `Authorization: Bearer TOKEN` with a token of the
/// file whose role allows it. Without one the API is open to whoever reaches it: the agent
/// starts so only when `api_listen` is a loopback address, or when `allow_unauthenticated`
/// says so explicitly (with a warning at start).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    /// The tokens file: lines `ROLE TOKEN`, `ROLE` being `read` or `operator`; readable by
    /// its owner only (see [`crate::auth`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_file: Option<PathBuf>,
    /// Serve the API without credentials on a non-loopback address.
    pub allow_unauthenticated: bool,
}

/// The agent configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This appliance: `appliance = "primary" | "secondary"`.
    pub appliance: ApplianceId,
    /// The HTTP API address.
    pub api_listen: SocketAddr,
    /// Where this agent accepts the peer agent's link.
    pub peer_listen: SocketAddr,
    /// The peer agent's link address.
    pub peer_addr: SocketAddr,
    /// The device's service address (bound by the appliance in control).
    pub service_addr: SocketAddr,
    /// State directory: journal, instance run directories and logs.
    pub data_dir: PathBuf,
    /// The image the pair runs when first started.
    pub image: PathBuf,
    /// Hypervisor backend: `backend = "process" | "qemu"`.
    #[serde(default = "default_backend")]
    pub backend: BackendKind,
    /// Peer failure detection.
    #[serde(default)]
    pub heartbeat: HeartbeatConfig,
    /// Instance resources.
    #[serde(default)]
    pub instances: InstanceConfig,
    /// The service address as a virtual IP held by the appliance in control.
    #[serde(default)]
    pub vip: Option<VipSection>,
    /// The witness: `[witness] kind = "none" | "builtin" | "etcd"` and its endpoints.
    #[serde(default)]
    pub witness: WitnessSection,
    /// Who may use the HTTP API: `[api] tokens_file = "/etc/hitless/api-tokens"`.
    #[serde(default)]
    pub api: ApiSection,
}

fn default_backend() -> BackendKind {
    BackendKind::Process
}

impl AgentConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
                size: meta.len(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates configuration text; `path` names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            // The full report quotes the offending line, which names the field.
            message: e.to_string().trim_end().replace('\n', "\n    "),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            message,
        };
        if self.heartbeat.interval_ms == 0 || self.heartbeat.interval_ms > 10_000 {
            return Err(invalid(
                "heartbeat.interval_ms",
                format!("{} is outside 1..=10000", self.heartbeat.interval_ms),
            ));
        }
        if self.heartbeat.misses == 0 || self.heartbeat.misses > 100 {
            return Err(invalid(
                "heartbeat.misses",
                format!("{} is outside 1..=100", self.heartbeat.misses),
            ));
        }
        let addrs = [
            ("api_listen", self.api_listen),
            ("peer_listen", self.peer_listen),
            ("peer_addr", self.peer_addr),
            ("service_addr", self.service_addr),
        ];
        for (i, (a, x)) in addrs.iter().enumerate() {
            for (b, y) in &addrs[i + 1..] {
                if x == y {
                    return Err(invalid(a, format!("{x} is also used as {b}")));
                }
            }
        }
        let host = self.instances.host_addr;
        if host.is_unspecified() || host.is_multicast() {
            return Err(invalid(
                "instances.host_addr",
                format!("{host} is not an address of one host"),
            ));
        }
        if host.is_loopback() && !self.peer_addr.ip().is_loopback() {
            return Err(invalid(
                "instances.host_addr",
                format!(
                    "{host} is a loopback address but the peer appliance is at {}: its instances could not reach this appliance's; name this host's address on the network the peer shares",
                    self.peer_addr.ip()
                ),
            ));
        }
        if self.instances.port_base < 1024 || self.instances.port_base > 65000 {
            return Err(invalid(
                "instances.port_base",
                format!("{} is outside 1024..=65000", self.instances.port_base),
            ));
        }
        if !(16..=65536).contains(&self.instances.memory_mib) {
            return Err(invalid(
                "instances.memory_mib",
                format!("{} is outside 16..=65536", self.instances.memory_mib),
            ));
        }
        if !(1..=6400).contains(&self.instances.cpu_percent) {
            return Err(invalid(
                "instances.cpu_percent",
                format!("{} is outside 1..=6400", self.instances.cpu_percent),
            ));
        }
        if !(1..=64).contains(&self.instances.vcpus) {
            return Err(invalid(
                "instances.vcpus",
                format!("{} is outside 1..=64", self.instances.vcpus),
            ));
        }
        if let Some(v) = self.vip_config() {
            v.validate().map_err(|e| invalid("vip", e.to_string()))?;
        }
        self.validate_witness(path)?;
        self.validate_api(path)?;
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "is empty".into()));
        }
        Ok(())
    }

    fn validate_api(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            message,
        };
        match &self.api.tokens_file {
            Some(file) if file.as_os_str().is_empty() => {
                Err(invalid("api.tokens_file", "is empty".into()))
            }
            Some(_) if self.api.allow_unauthenticated => Err(invalid(
                "api.allow_unauthenticated",
                "is set together with api.tokens_file; keep one: with a tokens file every request needs a token".into(),
            )),
            None if !self.api_listen.ip().is_loopback() && !self.api.allow_unauthenticated => {
                Err(invalid(
                    "api.tokens_file",
                    format!(
                        "is not set while api_listen {} is not a loopback address: anyone who reaches it could start an upgrade; name a tokens file (`hitless token new`, see docs/SECURITY.md) or set api.allow_unauthenticated = true",
                        self.api_listen
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    fn validate_witness(&self, path: &Path) -> Result<(), ConfigError> {
        use hitless_witness::WitnessKind;
        let invalid = |field, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            message,
        };
        let w = &self.witness;
        match w.kind {
            WitnessKind::None => {
                if w.reads == ReadMode::Lease {
                    return Err(invalid(
                        "witness.reads",
                        "\"lease\" needs a witness to hold the lease (witness.kind is \"none\")"
                            .into(),
                    ));
                }
                return Ok(());
            }
            WitnessKind::Builtin => {
                for e in &w.endpoints {
                    e.parse::<SocketAddr>().map_err(|_| {
                        invalid(
                            "witness.endpoints",
                            format!("{e:?} is not the host:port of a builtin witness"),
                        )
                    })?;
                }
            }
            WitnessKind::Etcd => {
                for e in &w.endpoints {
                    if e.starts_with("https://") {
                        return Err(invalid(
                            "witness.endpoints",
                            format!("{e:?}: TLS to etcd is not configurable yet; use an http:// client URL on a trusted network"),
                        ));
                    }
                    if !e.starts_with("http://") {
                        return Err(invalid(
                            "witness.endpoints",
                            format!("{e:?} is not an etcd client URL (http://host:2379)"),
                        ));
                    }
                }
            }
        }
        if w.endpoints.is_empty() || w.endpoints.len() > 16 {
            return Err(invalid(
                "witness.endpoints",
                format!("{} endpoints; a witness needs 1..=16", w.endpoints.len()),
            ));
        }
        if w.pair.is_empty()
            || w.pair.len() > 64
            || !w
                .pair
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "witness.pair",
                format!("{:?} is not 1..=64 letters, digits, '-' or '_'", w.pair),
            ));
        }
        if !(10..=10_000).contains(&w.timeout_ms) {
            return Err(invalid(
                "witness.timeout_ms",
                format!("{} is outside 10..=10000", w.timeout_ms),
            ));
        }
        if !(100..=60_000).contains(&w.lease_ms) || w.lease_ms < 2 * w.timeout_ms {
            return Err(invalid(
                "witness.lease_ms",
                format!(
                    "{} is outside 100..=60000 or under twice witness.timeout_ms",
                    w.lease_ms
                ),
            ));
        }
        Ok(())
    }

    /// The virtual service address, if the config has a `[vip]` section.
    pub fn vip_config(&self) -> Option<hitless_vip::VipConfig> {
        self.vip.as_ref().map(|v| hitless_vip::VipConfig {
            interface: v.interface.clone(),
            addr: self.service_addr.ip(),
            prefix_len: v.prefix_len,
            announce: v.announce,
        })
    }

    /// How long without a heartbeat before the peer is declared lost.
    pub fn peer_timeout(&self) -> Duration {
        Duration::from_millis(self.heartbeat.interval_ms * u64::from(self.heartbeat.misses))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
appliance = "primary"
api_listen = "127.0.0.1:7701"
peer_listen = "127.0.0.1:7711"
peer_addr = "127.0.0.1:7712"
service_addr = "127.0.0.1:6380"
data_dir = "/tmp/x"
image = "/tmp/img"
"#;

    #[test]
    fn defaults_are_50ms_heartbeats_and_3_misses() {
        let c = AgentConfig::parse(Path::new("a.toml"), GOOD).unwrap();
        assert_eq!(c.heartbeat.interval_ms, 50);
        assert_eq!(c.heartbeat.misses, 3);
        assert_eq!(c.peer_timeout(), Duration::from_millis(150));
        assert_eq!(c.backend, BackendKind::Process);
    }

    #[test]
    fn unknown_field_is_refused_by_name() {
        let text = format!("{GOOD}\nbogus = 1\n");
        let e = AgentConfig::parse(Path::new("a.toml"), &text).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        assert!(e.to_string().contains("a.toml"), "{e}");
    }

    #[test]
    fn bad_values_are_refused_naming_the_field() {
        let e = AgentConfig::parse(
            Path::new("a.toml"),
            &format!("{GOOD}\n[heartbeat]\nmisses = 0\n"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("heartbeat.misses"), "{e}");
        let dup = GOOD.replace("127.0.0.1:7712", "127.0.0.1:7711");
        let e = AgentConfig::parse(Path::new("a.toml"), &dup).unwrap_err();
        assert!(e.to_string().contains("peer_listen"), "{e}");
        let e = AgentConfig::parse(Path::new("a.toml"), "appliance = \"tertiary\"").unwrap_err();
        assert!(e.to_string().contains("tertiary"), "{e}");
    }

    #[test]
    fn instances_use_the_host_address_named_and_loopback_only_with_a_loopback_peer() {
        let c = AgentConfig::parse(Path::new("a.toml"), GOOD).unwrap();
        assert_eq!(c.instances.host_addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        let two_hosts = GOOD.replace("127.0.0.1:7712", "198.18.0.2:7711").replace(
            "peer_listen = \"127.0.0.1:7711\"",
            "peer_listen = \"198.18.0.1:7711\"",
        );
        let e = AgentConfig::parse(Path::new("a.toml"), &two_hosts).unwrap_err();
        assert!(e.to_string().contains("instances.host_addr"), "{e}");
        assert!(e.to_string().contains("198.18.0.2"), "{e}");
        let text = format!("{two_hosts}\n[instances]\nhost_addr = \"198.18.0.1\"\n");
        let c = AgentConfig::parse(Path::new("a.toml"), &text).unwrap();
        assert_eq!(
            c.instances.host_addr,
            "198.18.0.1".parse::<IpAddr>().unwrap()
        );
        for bad in ["0.0.0.0", "224.0.0.1", "::"] {
            let text = format!("{GOOD}\n[instances]\nhost_addr = \"{bad}\"\n");
            let e = AgentConfig::parse(Path::new("a.toml"), &text).unwrap_err();
            assert!(e.to_string().contains("instances.host_addr"), "{bad}: {e}");
        }
    }

    #[test]
    fn appliance_and_backend_read_the_same_words_as_before() {
        let cases = [
            (
                "primary",
                ApplianceId::Primary,
                "process",
                BackendKind::Process,
            ),
            (
                "secondary",
                ApplianceId::Secondary,
                "qemu",
                BackendKind::Qemu,
            ),
        ];
        for (appliance, id, backend, kind) in cases {
            let text = GOOD.replace("\"primary\"", &format!("\"{appliance}\""))
                + &format!("backend = \"{backend}\"\n");
            let c = AgentConfig::parse(Path::new("a.toml"), &text).unwrap();
            assert_eq!(c.appliance, id);
            assert_eq!(c.backend, kind);
            // And they are written back the same way.
            let back = toml::to_string(&c).unwrap();
            assert!(
                back.contains(&format!("appliance = \"{appliance}\"")),
                "{back}"
            );
            assert!(back.contains(&format!("backend = \"{backend}\"")), "{back}");
        }
        for bad in ["Primary", "qemu-kvm"] {
            let text = format!("{GOOD}backend = \"{bad}\"\n");
            let e = AgentConfig::parse(Path::new("a.toml"), &text).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn a_witness_is_optional_and_its_section_is_checked() {
        let none = AgentConfig::parse(Path::new("x"), GOOD).unwrap();
        assert_eq!(none.witness.kind, hitless_witness::WitnessKind::None);
        assert!(none
            .witness
            .summary()
            .contains("can lose acknowledged writes"));
        let builtin = format!(
            "{GOOD}[witness]\nkind = \"builtin\"\nendpoints = [\"198.18.0.3:27800\"]\nreads = \"lease\"\n"
        );
        let c = AgentConfig::parse(Path::new("x"), &builtin).unwrap();
        assert_eq!(c.witness.kind, hitless_witness::WitnessKind::Builtin);
        assert_eq!(c.witness.reads, ReadMode::Lease);
        let refused = |text: String, field: &str| {
            let e = AgentConfig::parse(Path::new("x"), &text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(field), "{e}");
        };
        refused(
            format!("{GOOD}[witness]\nkind = \"builtin\"\n"),
            "witness.endpoints",
        );
        refused(
            format!("{GOOD}[witness]\nkind = \"etcd\"\nendpoints = [\"10.0.0.3:2379\"]\n"),
            "witness.endpoints",
        );
        refused(
            format!("{GOOD}[witness]\nreads = \"lease\"\n"),
            "witness.reads",
        );
        refused(
            format!(
                "{GOOD}[witness]\nkind = \"builtin\"\nendpoints = [\"127.0.0.1:1\"]\npair = \"a/b\"\n"
            ),
            "witness.pair",
        );
    }

    #[test]
    fn an_api_off_loopback_needs_a_tokens_file_or_an_explicit_opening() {
        let open = AgentConfig::parse(Path::new("x"), GOOD).unwrap();
        assert_eq!(open.api, ApiSection::default());
        let exposed = GOOD.replace("127.0.0.1:7701", "0.0.0.0:7701");
        let e = AgentConfig::parse(Path::new("x"), &exposed)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("api.tokens_file") && e.contains("0.0.0.0:7701"),
            "{e}"
        );
        let tokens = format!("{exposed}[api]\ntokens_file = \"/etc/hitless/api-tokens\"\n");
        let c = AgentConfig::parse(Path::new("x"), &tokens).unwrap();
        assert_eq!(
            c.api.tokens_file.as_deref(),
            Some(Path::new("/etc/hitless/api-tokens"))
        );
        let allowed = format!("{exposed}[api]\nallow_unauthenticated = true\n");
        assert!(
            AgentConfig::parse(Path::new("x"), &allowed)
                .unwrap()
                .api
                .allow_unauthenticated
        );
        let both = format!("{tokens}allow_unauthenticated = true\n");
        let e = AgentConfig::parse(Path::new("x"), &both)
            .unwrap_err()
            .to_string();
        assert!(e.contains("api.allow_unauthenticated"), "{e}");
    }
}
