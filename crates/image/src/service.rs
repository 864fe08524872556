//! The service contract: how an agent runs the service an image holds.
//!
//! A manifest of format 2 declares it in a `[service]` table:
//!
//! ```toml
//! [service]
//! protocol = "resp"                # "resp" | "length-prefixed" | "opaque"
//! service_port = 6379              # where the service listens inside a VM guest
//! sync_port = 7000                 # where state sync listens inside a VM guest
//! args = ["--service-listen", "{service_listen}", "--sync-listen", "{sync_listen}"]
//! ```
//!
//! - `protocol` is the framing of the client protocol: the front of the agent counts, holds
//!   and replays requests by it, so an upgrade may not change it.
//! - `service_port` and `sync_port` are the ports inside the instance's own network (a VM
//!   guest); the agent forwards host ports to them. A process instance shares the host's
//!   network, so the agent gives it host ports of its own and passes them through the
//!   placeholders.
//! - `args` is the argument template of the entrypoint. Each argument is literal text with
//!   placeholders in braces, from the fixed set of [`Placeholder`]s; `{{` and `}}` stand for
//!   literal braces. An unknown placeholder or a stray brace is refused when the manifest is
//!   loaded. A process instance gets the template expanded by the agent ([`expand`]); a VM
//!   image's `/init` expands it in the guest from the `hitless.*` kernel parameters the agent
//!   sets ([`kernel_params`], [`ArgTemplate::shell_word`]).
//!
//! Manifests of format 1 have no `[service]` table: they get the [legacy
//! contract](ServiceContract::legacy), the one the agent applied to every image before the
//! contract existed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::manifest::{Kind, ManifestError};

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ManifestError {
    ManifestError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Most arguments in a template.
pub const MAX_TEMPLATE_ARGS: usize = 128;
/// Longest template argument, in bytes (before expansion).
pub const MAX_TEMPLATE_ARG_LEN: usize = 1024;
/// Service port of the legacy contract (inside a VM guest).
pub const LEGACY_SERVICE_PORT: u16 = 6379;
/// Sync port of the legacy contract (inside a VM guest).
pub const LEGACY_SYNC_PORT: u16 = 7000;

/// The framing of a service's client protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// Redis serialization protocol: requests and replies are RESP messages.
    #[default]
    Resp,
    /// Each message is a 4-byte big-endian length and that many bytes.
    LengthPrefixed,
    /// A byte stream with no known message boundaries.
    Opaque,
}

impl Protocol {
    /// Every protocol, in declaration order.
    pub const ALL: [Protocol; 3] = [Protocol::Resp, Protocol::LengthPrefixed, Protocol::Opaque];

    /// The name used in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Resp => "resp",
            Protocol::LengthPrefixed => "length-prefixed",
            Protocol::Opaque => "opaque",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Protocol::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                format!("{s:?} is not a known protocol (expected \"resp\", \"length-prefixed\" or \"opaque\")")
            })
    }
}

/// A value the agent substitutes into the argument template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Placeholder {
    /// `{instance_id}`: the instance's identifier (the agent checks it in `Configure`).
    InstanceId,
    /// `{service_listen}`: the address the service listens on for clients, `IP:PORT`.
    ServiceListen,
    /// `{sync_listen}`: the address state sync listens on for standbys, `IP:PORT`.
    SyncListen,
    /// `{service_port}`: the port of `{service_listen}`.
    ServicePort,
    /// `{sync_port}`: the port of `{sync_listen}`.
    SyncPort,
    /// `{control}`: the control channel's endpoint: a unix socket path the service listens
    /// on (process) or a character device path (VM guest).
    Control,
    /// `{ha_grace_ms}`: the HA grace in milliseconds.
    HaGraceMs,
}

impl Placeholder {
    /// Every placeholder.
    pub const ALL: [Placeholder; 7] = [
        Placeholder::InstanceId,
        Placeholder::ServiceListen,
        Placeholder::SyncListen,
        Placeholder::ServicePort,
        Placeholder::SyncPort,
        Placeholder::Control,
        Placeholder::HaGraceMs,
    ];

    /// Its name between the braces.
    pub fn name(self) -> &'static str {
        match self {
            Placeholder::InstanceId => "instance_id",
            Placeholder::ServiceListen => "service_listen",
            Placeholder::SyncListen => "sync_listen",
            Placeholder::ServicePort => "service_port",
            Placeholder::SyncPort => "sync_port",
            Placeholder::Control => "control",
            Placeholder::HaGraceMs => "ha_grace_ms",
        }
    }

    /// The `hitless.<key>=` kernel parameter that carries it to a VM guest, whose `/init`
    /// exports it as `HITLESS_<KEY>`. Ports are not passed: a guest's ports are the
    /// contract's own.
    pub fn kernel_param(self) -> Option<&'static str> {
        match self {
            Placeholder::InstanceId => Some("instance"),
            Placeholder::ServiceListen => Some("service"),
            Placeholder::SyncListen => Some("sync"),
            Placeholder::Control => Some("control_device"),
            Placeholder::HaGraceMs => Some("ha_grace_ms"),
            Placeholder::ServicePort | Placeholder::SyncPort => None,
        }
    }

    /// Its value in `v`.
    pub fn value(self, v: &Values) -> String {
        match self {
            Placeholder::InstanceId => v.instance_id.clone(),
            Placeholder::ServiceListen => v.service_listen.clone(),
            Placeholder::SyncListen => v.sync_listen.clone(),
            Placeholder::ServicePort => v.service_port.to_string(),
            Placeholder::SyncPort => v.sync_port.to_string(),
            Placeholder::Control => v.control.clone(),
            Placeholder::HaGraceMs => v.ha_grace_ms.to_string(),
        }
    }

    fn list() -> String {
        let names: Vec<String> = Placeholder::ALL
            .iter()
            .map(|p| format!("{{{}}}", p.name()))
            .collect();
        names.join(", ")
    }
}

/// The values of the placeholders for one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Values {
    /// `{instance_id}`.
    pub instance_id: String,
    /// `{service_listen}`.
    pub service_listen: String,
    /// `{sync_listen}`.
    pub sync_listen: String,
    /// `{service_port}`.
    pub service_port: u16,
    /// `{sync_port}`.
    pub sync_port: u16,
    /// `{control}`.
    pub control: String,
    /// `{ha_grace_ms}`.
    pub ha_grace_ms: u64,
}

/// One piece of a template argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Literal text.
    Literal(String),
    /// A placeholder.
    Hole(Placeholder),
}

/// One argument of the template, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgTemplate {
    segments: Vec<Segment>,
}

impl ArgTemplate {
    /// An argument taken literally, braces included (format-1 arguments).
    pub fn literal(s: &str) -> ArgTemplate {
        ArgTemplate {
            segments: if s.is_empty() {
                vec![]
            } else {
                vec![Segment::Literal(s.to_string())]
            },
        }
    }

    /// Parses one template argument.
    ///
    /// # Errors
    /// A sentence saying what is wrong: an unknown or empty placeholder, an unclosed `{`, a
    /// stray `}`, a NUL, or more than [`MAX_TEMPLATE_ARG_LEN`] bytes.
    pub fn parse(s: &str) -> Result<ArgTemplate, String> {
        if s.len() > MAX_TEMPLATE_ARG_LEN {
            return Err(format!("it is longer than {MAX_TEMPLATE_ARG_LEN} bytes"));
        }
        if s.contains('\0') {
            return Err("it contains a NUL".into());
        }
        let mut segments = Vec::new();
        let mut lit = String::new();
        let mut chars = s.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, c)| c) == Some('{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek().map(|&(_, c)| c) == Some('}') => {
                    chars.next();
                    lit.push('}');
                }
                '}' => {
                    return Err(format!(
                    "the '}}' at byte {i} closes no placeholder (write '}}}}' for a literal brace)"
                ))
                }
                '{' => {
                    let rest = &s[i + 1..];
                    let end = rest.find('}').ok_or_else(|| {
                        format!("the '{{' at byte {i} is never closed (write '{{{{' for a literal brace)")
                    })?;
                    let name = &rest[..end];
                    let hole = Placeholder::ALL
                        .into_iter()
                        .find(|p| p.name() == name)
                        .ok_or_else(|| {
                            format!(
                                "{{{name}}} is not a known placeholder (the placeholders are {})",
                                Placeholder::list()
                            )
                        })?;
                    if !lit.is_empty() {
                        segments.push(Segment::Literal(std::mem::take(&mut lit)));
                    }
                    segments.push(Segment::Hole(hole));
                    // Skip the name and the closing brace.
                    for _ in 0..name.chars().count() + 1 {
                        chars.next();
                    }
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            segments.push(Segment::Literal(lit));
        }
        Ok(ArgTemplate { segments })
    }

    /// Its pieces.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The placeholders it uses.
    pub fn placeholders(&self) -> impl Iterator<Item = Placeholder> + '_ {
        self.segments.iter().filter_map(|s| match s {
            Segment::Hole(p) => Some(*p),
            Segment::Literal(_) => None,
        })
    }

    /// The argument for one instance.
    pub fn expand(&self, v: &Values) -> String {
        let mut out = String::new();
        for s in &self.segments {
            match s {
                Segment::Literal(l) => out.push_str(l),
                Segment::Hole(p) => out.push_str(&p.value(v)),
            }
        }
        out
    }

    /// One `/bin/sh` word that expands to the argument in a VM guest: literals quoted,
    /// placeholders read from the `HITLESS_*` variables `/init` exports (ports from
    /// `ports`, the contract's guest ports).
    pub fn shell_word(&self, ports: (u16, u16)) -> String {
        if self.segments.is_empty() {
            return "''".into();
        }
        let mut out = String::new();
        for s in &self.segments {
            match s {
                Segment::Literal(l) => out.push_str(&crate::build::sh_quote(l)),
                Segment::Hole(Placeholder::ServicePort) => out.push_str(&ports.0.to_string()),
                Segment::Hole(Placeholder::SyncPort) => out.push_str(&ports.1.to_string()),
                Segment::Hole(p) => {
                    let key = p.kernel_param().expect("every other placeholder has one");
                    out.push_str(&format!("\"${{HITLESS_{}}}\"", key.to_ascii_uppercase()));
                }
            }
        }
        out
    }
}

impl fmt::Display for ArgTemplate {
    /// The template text (braces escaped), which parses back to the same template.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.segments {
            match s {
                Segment::Literal(l) => f.write_str(&l.replace('{', "{{").replace('}', "}}"))?,
                Segment::Hole(p) => write!(f, "{{{}}}", p.name())?,
            }
        }
        Ok(())
    }
}

/// How the agent runs an image's service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceContract {
    /// The client protocol's framing.
    pub protocol: Protocol,
    /// The service's port inside a VM guest.
    pub service_port: u16,
    /// State sync's port inside a VM guest.
    pub sync_port: u16,
    /// The entrypoint's argument template.
    pub args: Vec<ArgTemplate>,
}

/// The legacy contract's arguments for a process instance.
const LEGACY_PROCESS_ARGS: [&str; 10] = [
    "--instance-id",
    "{instance_id}",
    "--service-listen",
    "{service_listen}",
    "--sync-listen",
    "{sync_listen}",
    "--control-listen",
    "{control}",
    "--ha-grace-ms",
    "{ha_grace_ms}",
];

impl ServiceContract {
    /// The contract of a format-1 image: RESP, guest ports 6379 and 7000, and the command
    /// line the agent gave every process image before contracts existed (instance id,
    /// service, sync and control addresses and the HA grace as `--` options). A format-1 VM
    /// image runs the arguments its `/init` was built with (`entrypoint_args`, literally) and
    /// reads the per-instance values from the `hitless.*` kernel parameters.
    pub fn legacy(kind: Kind, entrypoint_args: &[String]) -> ServiceContract {
        let args = match kind {
            Kind::Process => LEGACY_PROCESS_ARGS
                .iter()
                .map(|a| ArgTemplate::parse(a).expect("the legacy template is valid"))
                .collect(),
            Kind::Vm => entrypoint_args
                .iter()
                .map(|a| ArgTemplate::literal(a))
                .collect(),
        };
        ServiceContract {
            protocol: Protocol::Resp,
            service_port: LEGACY_SERVICE_PORT,
            sync_port: LEGACY_SYNC_PORT,
            args,
        }
    }

    /// Parses a contract from its raw parts.
    ///
    /// # Errors
    /// [`ManifestError::Invalid`] naming the field (for a bad argument, `service.args[i]` and
    /// the argument); see [`ServiceContract::validate`] and [`ArgTemplate::parse`].
    pub fn from_parts(
        protocol: Protocol,
        service_port: u16,
        sync_port: u16,
        args: &[String],
    ) -> Result<ServiceContract, ManifestError> {
        if args.len() > MAX_TEMPLATE_ARGS {
            return Err(invalid(
                "service.args",
                format!(
                    "it has {} arguments, more than {MAX_TEMPLATE_ARGS}",
                    args.len()
                ),
            ));
        }
        let args = args
            .iter()
            .enumerate()
            .map(|(i, a)| {
                ArgTemplate::parse(a).map_err(|r| {
                    invalid(format!("service.args[{i}]"), format!("argument {a:?}: {r}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let c = ServiceContract {
            protocol,
            service_port,
            sync_port,
            args,
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks the ports (non-zero and distinct) and the template's bounds.
    ///
    /// # Errors
    /// [`ManifestError::Invalid`] naming the field.
    pub fn validate(&self) -> Result<(), ManifestError> {
        for (f, p) in [
            ("service.service_port", self.service_port),
            ("service.sync_port", self.sync_port),
        ] {
            if p == 0 {
                return Err(invalid(f, "port 0 is not a port to listen on"));
            }
        }
        if self.service_port == self.sync_port {
            return Err(invalid(
                "service.sync_port",
                format!(
                    "it is the service port {} too; the two must differ",
                    self.service_port
                ),
            ));
        }
        if self.args.len() > MAX_TEMPLATE_ARGS {
            return Err(invalid(
                "service.args",
                format!("more than {MAX_TEMPLATE_ARGS} arguments"),
            ));
        }
        if let Some(i) = self
            .args
            .iter()
            .position(|a| a.to_string().len() > MAX_TEMPLATE_ARG_LEN)
        {
            return Err(invalid(
                format!("service.args[{i}]"),
                format!("it is longer than {MAX_TEMPLATE_ARG_LEN} bytes"),
            ));
        }
        Ok(())
    }

    /// The template as text, one string per argument.
    pub fn args_text(&self) -> Vec<String> {
        self.args.iter().map(ToString::to_string).collect()
    }
}

/// The entrypoint's arguments for one instance: the template expanded with `v`.
pub fn expand(args: &[ArgTemplate], v: &Values) -> Vec<String> {
    args.iter().map(|a| a.expand(v)).collect()
}

/// The `hitless.<key>=<value>` kernel parameters that carry `v` to a VM guest, separated by
/// spaces (the values hold no spaces: ids, addresses, device paths, numbers).
pub fn kernel_params(v: &Values) -> String {
    let params: Vec<String> = Placeholder::ALL
        .into_iter()
        .filter_map(|p| Some(format!("hitless.{}={}", p.kernel_param()?, p.value(v))))
        .collect();
    params.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> Values {
        Values {
            instance_id: "i7".into(),
            service_listen: "127.0.0.1:7100".into(),
            sync_listen: "127.0.0.1:7101".into(),
            service_port: 7100,
            sync_port: 7101,
            control: "/run/i7/control.sock".into(),
            ha_grace_ms: 1000,
        }
    }

    #[test]
    fn templates_expand_every_placeholder_and_literal_braces() {
        let v = values();
        let cases = [
            ("--service-listen", "--service-listen"),
            ("{service_listen}", "127.0.0.1:7100"),
            ("--listen={sync_listen}", "--listen=127.0.0.1:7101"),
            ("{instance_id}-{control}", "i7-/run/i7/control.sock"),
            ("ports {service_port}/{sync_port}", "ports 7100/7101"),
            ("grace={ha_grace_ms}ms", "grace=1000ms"),
            ("{{literal}} {{{instance_id}}}", "{literal} {i7}"),
            ("", ""),
        ];
        for (t, want) in cases {
            let a = ArgTemplate::parse(t).unwrap();
            assert_eq!(a.expand(&v), want, "{t}");
            // The text form parses back to the same template.
            assert_eq!(ArgTemplate::parse(&a.to_string()).unwrap(), a, "{t}");
        }
    }

    #[test]
    fn malformed_templates_are_refused_with_the_reason() {
        for (t, want) in [
            ("{nope}", "{nope} is not a known placeholder"),
            ("{}", "{} is not a known placeholder"),
            ("{Service_Listen}", "not a known placeholder"),
            ("--x={service_listen", "is never closed"),
            ("a}b", "closes no placeholder"),
            ("{{instance_id}", "closes no placeholder"),
            ("a\0b", "NUL"),
        ] {
            let err = ArgTemplate::parse(t).unwrap_err();
            assert!(err.contains(want), "{t:?}: {err}");
        }
        let long = "x".repeat(MAX_TEMPLATE_ARG_LEN + 1);
        assert!(ArgTemplate::parse(&long)
            .unwrap_err()
            .contains("longer than"));
    }

    #[test]
    fn contracts_name_the_bad_argument_and_bound_the_template() {
        let args = vec!["--ok".to_string(), "--bad={sevice_listen}".to_string()];
        let fail = |sp: u16, yp: u16, args: &[String]| {
            ServiceContract::from_parts(Protocol::Resp, sp, yp, args)
                .unwrap_err()
                .to_string()
        };
        let msg = fail(1, 2, &args);
        assert!(
            msg.contains("`service.args[1]` is invalid: argument \"--bad={sevice_listen}\""),
            "{msg}"
        );
        let many = vec!["a".to_string(); MAX_TEMPLATE_ARGS + 1];
        let msg = fail(1, 2, &many);
        assert!(
            msg.contains("`service.args` is invalid") && msg.contains("more than"),
            "{msg}"
        );
        assert!(fail(0, 2, &[]).contains("`service.service_port` is invalid"));
        assert!(fail(5, 5, &[]).contains("`service.sync_port` is invalid"));
    }

    #[test]
    fn legacy_process_contract_is_the_historic_command_line() {
        let c = ServiceContract::legacy(Kind::Process, &["ignored".into()]);
        assert_eq!(c.protocol, Protocol::Resp);
        assert_eq!((c.service_port, c.sync_port), (6379, 7000));
        assert_eq!(
            expand(&c.args, &values()),
            [
                "--instance-id",
                "i7",
                "--service-listen",
                "127.0.0.1:7100",
                "--sync-listen",
                "127.0.0.1:7101",
                "--control-listen",
                "/run/i7/control.sock",
                "--ha-grace-ms",
                "1000"
            ]
        );
        // A format-1 VM image keeps the arguments baked into its /init, braces and all.
        let c = ServiceContract::legacy(Kind::Vm, &["--x={y}".into()]);
        assert_eq!(expand(&c.args, &values()), ["--x={y}"]);
    }

    #[test]
    fn protocols_parse_and_print_in_kebab_case() {
        for p in Protocol::ALL {
            assert_eq!(p.as_str().parse::<Protocol>().unwrap(), p);
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{p}\""));
        }
        assert_eq!(Protocol::LengthPrefixed.to_string(), "length-prefixed");
        assert!("http"
            .parse::<Protocol>()
            .unwrap_err()
            .contains("not a known protocol"));
    }

    #[test]
    fn kernel_params_and_shell_words_carry_the_values_into_a_guest() {
        let v = values();
        assert_eq!(
            kernel_params(&v),
            "hitless.instance=i7 hitless.service=127.0.0.1:7100 hitless.sync=127.0.0.1:7101 \
             hitless.control_device=/run/i7/control.sock hitless.ha_grace_ms=1000"
        );
        let a = ArgTemplate::parse("--s={service_listen}:{service_port}").unwrap();
        assert_eq!(a.shell_word((80, 81)), "'--s='\"${HITLESS_SERVICE}\"':'80");
        // The word, run through a real shell with the variable set, gives the expansion.
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("printf %s {}", a.shell_word((80, 81))))
            .env("HITLESS_SERVICE", "0.0.0.0:80")
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "--s=0.0.0.0:80:80");
        assert_eq!(ArgTemplate::parse("").unwrap().shell_word((1, 2)), "''");
    }
}
