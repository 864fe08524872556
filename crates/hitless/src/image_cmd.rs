//! `hitless image build|inspect`.
//!
//! `--schema` syntax: `SERVICE=WRITES:READS`, several services separated by `;`, version
//! lists by `,`. `kvd=1:1,2` means service `kvd` writes schema version 1 and reads versions 1
//! and 2; `kv=1,2:1,2;cfg=3:3` declares two services. The native version of a service is the
//! highest version it both reads and writes. An empty string declares no replicated service.
//!
//! `inspect` verifies the image (manifest, every file digest, and the signature when the
//! environment variable `HITLESS_TRUSTED_KEY` holds a hex ed25519 public key).

use std::path::Path;

use anyhow::{bail, Context};
use hitless_image::{
    build as image_build, manifest, sign, Image, Kind, OpenOptions, SignatureStatus,
};

/// Environment variable holding a trusted image signing key (64 hex digits).
pub const TRUSTED_KEY_ENV: &str = "HITLESS_TRUSTED_KEY";

/// Builds a `process` or `vm` image from `binary` into `out`.
pub fn build(
    kind: &str,
    out: &Path,
    name: &str,
    version: &str,
    binary: &Path,
    schema: &str,
) -> anyhow::Result<()> {
    let schemas = manifest::parse_schema_spec(schema).context("invalid --schema")?;
    let image = match kind {
        "process" => image_build::process_image(out, name, version, binary, &[], &schemas)?,
        "vm" => image_build::vm_image(out, name, version, binary, &[], &schemas, None)?,
        other => bail!("unknown image kind {other:?}: expected \"process\" or \"vm\""),
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
