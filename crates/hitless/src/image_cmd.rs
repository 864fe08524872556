//! `hitless image build|inspect`.
//!
//! `--schema` syntax: `SERVICE=WRITES:READS`, several services separated by `;`, version
//! lists by `,`. `kvd=1:1,2` means service `kvd` writes schema version 1 and reads versions 1
//! and 2; `kv=1,2:1,2;cfg=3:3` declares two services. The native version of a service is the
//! highest version it both reads and writes. An empty string declares no replicated service.
//!
//! The service contract: `--protocol`, `--service-port`, `--sync-port` and `--arg` (one per
//! template argument, placeholders such as `{service_listen}` in braces; see
//! `hitless_image::service`). Without any `--arg` the image gets the contract of the reference
//! service, kvd ([`kvd_contract`]).
//!
//! `inspect` verifies the image (manifest, every file digest, and the signature when the
//! environment variable `HITLESS_TRUSTED_KEY` holds a hex ed25519 public key).

use std::path::Path;

use anyhow::{bail, Context};
use hitless_image::service::{Protocol, ServiceContract, LEGACY_SERVICE_PORT, LEGACY_SYNC_PORT};
use hitless_image::{
    build as image_build, manifest, sign, Image, Kind, OpenOptions, SignatureStatus,
};

/// Environment variable holding a trusted image signing key (64 hex digits).
pub const TRUSTED_KEY_ENV: &str = "HITLESS_TRUSTED_KEY";

/// kvd's service contract: RESP on guest port 6379, state sync on 7000, and its options for
/// the instance id, the listen addresses, the control channel (a unix socket it listens on as
/// a process, a serial device in a VM guest) and the HA grace.
pub fn kvd_contract(kind: Kind) -> ServiceContract {
    let control = match kind {
        Kind::Process => "--control-listen",
        Kind::Vm => "--control-device",
    };
    let args: Vec<String> = [
        "--instance-id",
        "{instance_id}",
        "--service-listen",
        "{service_listen}",
        "--sync-listen",
        "{sync_listen}",
        control,
        "{control}",
        "--ha-grace-ms",
        "{ha_grace_ms}",
    ]
    .map(String::from)
    .into();
    ServiceContract::from_parts(Protocol::Resp, LEGACY_SERVICE_PORT, LEGACY_SYNC_PORT, &args)
        .expect("kvd's contract is valid")
}

/// The service contract options of `hitless image build`.
#[derive(Debug, Clone)]
pub struct ContractArgs {
    /// `--protocol`.
    pub protocol: String,
    /// `--service-port`.
    pub service_port: u16,
    /// `--sync-port`.
    pub sync_port: u16,
    /// `--arg`, in order; empty for kvd's contract.
    pub args: Vec<String>,
}

/// Builds a `process` or `vm` image from `binary` into `out`.
pub fn build(
    kind: &str,
    out: &Path,
    name: &str,
    version: &str,
    binary: &Path,
    schema: &str,
    contract: &ContractArgs,
) -> anyhow::Result<()> {
    let schemas = manifest::parse_schema_spec(schema).context("invalid --schema")?;
    let kind = match kind {
        "process" => Kind::Process,
        "vm" => Kind::Vm,
        other => bail!("unknown image kind {other:?}: expected \"process\" or \"vm\""),
    };
    let service = if contract.args.is_empty() {
        ServiceContract {
            protocol: contract
                .protocol
                .parse()
                .map_err(anyhow::Error::msg)
                .context("invalid --protocol")?,
            service_port: contract.service_port,
            sync_port: contract.sync_port,
            ..kvd_contract(kind)
        }
    } else {
        ServiceContract::from_parts(
            contract
                .protocol
                .parse()
                .map_err(anyhow::Error::msg)
                .context("invalid --protocol")?,
            contract.service_port,
            contract.sync_port,
            &contract.args,
        )
        .context("invalid service contract")?
    };
    service.validate().context("invalid service contract")?;
    let image = match kind {
        Kind::Process => {
            image_build::process_image(out, name, version, binary, &service, &schemas)?
        }
        Kind::Vm => image_build::vm_image(out, name, version, binary, &service, &schemas, None)?,
    };
    let m = &image.manifest;
    println!(
        "built {} image {} {} in {}",
        m.kind,
        m.name,
        m.version,
        image.dir.display()
    );
    if let Some(vm) = &m.vm {
        println!("kernel release {}", vm.kernel_release);
    }
    for (file, digest) in &m.files {
        println!("  {digest}  {file}");
    }
    Ok(())
}

fn signature_text(s: &SignatureStatus) -> String {
    match s {
        SignatureStatus::Unsigned => "unsigned".into(),
        SignatureStatus::NotChecked => "signed (not checked: no trusted key configured)".into(),
        SignatureStatus::Verified { key } => format!("verified with key {key}"),
    }
}

/// Verifies the image in `dir` and prints its description (or one JSON object).
pub fn inspect(dir: &Path, json: bool) -> anyhow::Result<()> {
    let mut opts = OpenOptions::default();
    if let Ok(k) = std::env::var(TRUSTED_KEY_ENV) {
        let key =
            sign::verifying_key_from_hex(&k).with_context(|| format!("in ${TRUSTED_KEY_ENV}"))?;
        opts.trusted_keys.push(key);
    }
    let image = Image::open_with(dir, &opts)?;
    let m = &image.manifest;
    if json {
        let schemas: serde_json::Map<String, serde_json::Value> = m
            .schemas
            .iter()
            .map(|(svc, d)| {
                (
                    svc.clone(),
                    serde_json::json!({"reads": d.reads, "writes": d.writes, "native": d.native}),
                )
            })
            .collect();
        let out = serde_json::json!({
            "dir": image.dir,
            "name": m.name,
            "version": m.version.to_string(),
            "kind": m.kind.to_string(),
            "entrypoint": {"path": m.entrypoint.path, "args": m.entrypoint.args},
            "service": {
                "protocol": m.service.protocol,
                "service_port": m.service.service_port,
                "sync_port": m.service.sync_port,
                "args": m.service.args_text(),
            },
            "schemas": schemas,
            "vm": m.vm.as_ref().map(|vm| serde_json::json!({
                "kernel": vm.kernel,
                "initramfs": vm.initramfs,
                "cmdline": vm.cmdline,
                "kernel_release": vm.kernel_release,
            })),
            "files": m.files,
            "signature": signature_text(&image.signature),
            "verified": true,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "image      {} {} ({})",
        m.name,
        m.version,
        image.dir.display()
    );
    println!("kind       {}", m.kind);
    println!(
        "entrypoint {} {}",
        m.entrypoint.path,
        m.entrypoint.args.join(" ")
    );
    println!(
        "service    {} on port {}, sync on port {}; args {}",
        m.service.protocol,
        m.service.service_port,
        m.service.sync_port,
        m.service.args_text().join(" ")
    );
    if m.kind == Kind::Vm {
        if let Some(vm) = &m.vm {
            println!("kernel     {} (release {})", vm.kernel, vm.kernel_release);
            println!("initramfs  {}", vm.initramfs);
            println!("cmdline    {}", vm.cmdline);
        }
    }
    for (svc, d) in &m.schemas {
        let list = |s: &std::collections::BTreeSet<u32>| {
            s.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
        };
        println!(
            "schema     {svc}: native {}, writes {}, reads {}",
            d.native,
            list(&d.writes),
            list(&d.reads)
        );
    }
    println!("signature  {}", signature_text(&image.signature));
    println!("files      {} (all digests verified)", m.files.len());
    for (file, digest) in &m.files {
        println!("  {digest}  {file}");
    }
    Ok(())
}
