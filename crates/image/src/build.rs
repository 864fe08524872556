//! Building images: a process image (the service binary plus a manifest) and a bootable VM
//! image (a kernel, an initramfs built here, and a manifest).
//!
//! A VM image's initramfs is an uncompressed newc cpio archive ([`crate::cpio`]) holding:
//! busybox and its applet links, `/init` (see [`init_script`]), the service binary (and, if it
//! is dynamically linked, the libraries and loader `ldd` lists), and the virtio kernel modules
//! with their dependencies from `modules.dep`, decompressed if the distribution compresses
//! them. Output directories are built under a temporary name and renamed into place, so a
//! failed build leaves nothing behind.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{BufWriter, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cpio::CpioWriter;
use crate::manifest::{
    validate_name, Entrypoint, Kind, Manifest, SchemaDecl, VmBoot, MANIFEST_FORMAT,
};
use crate::service::ServiceContract;
use crate::{io_err, sha256_file, Image, ImageError, Result, MANIFEST_FILE};

/// Modules an image cannot boot usefully without (unless built into the kernel).
pub const REQUIRED_MODULES: &[&str] = &["virtio_pci", "virtio_net", "virtio_console"];
/// Modules included when the kernel provides them.
pub const OPTIONAL_MODULES: &[&str] = &["virtio_mmio", "virtio_blk", "virtio_rng"];
/// Default kernel command line of a VM image.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1";
/// Line `/init` prints once the guest is up, just before it starts the service.
pub const READY_LINE: &str = "hitless-init: ready";
/// Path of the kernel inside a VM image.
pub const KERNEL_PATH: &str = "boot/vmlinuz";
/// Path of the initramfs inside a VM image.
pub const INITRAMFS_PATH: &str = "boot/initramfs.cpio";

/// Inputs of a VM image build beyond the service itself.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Kernel image; `None` picks the newest `/boot/vmlinuz-*`.
    pub kernel: Option<PathBuf>,
    /// Root of the module trees (`/lib/modules`).
    pub modules_root: PathBuf,
    /// Statically linked busybox.
    pub busybox: PathBuf,
    /// Kernel command line recorded in the manifest.
    pub cmdline: String,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            kernel: None,
            modules_root: PathBuf::from("/lib/modules"),
            busybox: PathBuf::from("/bin/busybox"),
            cmdline: DEFAULT_CMDLINE.to_string(),
        }
    }
}

fn build_err(out: &Path, reason: impl Into<String>) -> ImageError {
    ImageError::Build {
        out: out.to_path_buf(),
        reason: reason.into(),
    }
}

/// A directory under construction next to the output; removed unless committed.
struct Staging {
    tmp: PathBuf,
    out: PathBuf,
    done: bool,
}

impl Staging {
    fn new(out: &Path) -> Result<Staging> {
        match fs::read_dir(out) {
            Ok(mut it) => {
                if it.next().is_some() {
                    return Err(build_err(
                        out,
                        "the output directory already exists and is not empty",
                    ));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(out, "read output directory")(e)),
        }
        let name = out
            .file_name()
            .ok_or_else(|| build_err(out, "the output path has no final component"))?
            .to_string_lossy()
            .into_owned();
        let parent = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(parent).map_err(io_err(parent, "create parent directory"))?;
        let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(io_err(&tmp, "create staging directory"))?;
        Ok(Staging {
            tmp,
            out: out.to_path_buf(),
            done: false,
        })
    }

    fn commit(mut self) -> Result<()> {
        if self.out.exists() {
            fs::remove_dir(&self.out)
                .map_err(io_err(&self.out, "replace empty output directory"))?;
        }
        fs::rename(&self.tmp, &self.out).map_err(io_err(&self.out, "move image into place"))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

fn binary_name(out: &Path, binary: &Path) -> Result<String> {
    let name = binary
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| build_err(out, format!("{} has no file name", binary.display())))?;
    validate_name("binary", &name).map_err(|e| build_err(out, e.to_string()))?;
    Ok(name)
}

fn copy_executable(src: &Path, dst: &Path) -> Result<()> {
    let md = fs::metadata(src).map_err(io_err(src, "stat binary"))?;
    if !md.is_file() {
        return Err(build_err(
            dst,
            format!("{} is not a regular file", src.display()),
        ));
    }
    if let Some(p) = dst.parent() {
        fs::create_dir_all(p).map_err(io_err(p, "create directory"))?;
    }
    fs::copy(src, dst).map_err(io_err(src, "copy binary"))?;
    fs::set_permissions(dst, fs::Permissions::from_mode(0o755))
        .map_err(io_err(dst, "set permissions"))?;
    Ok(())
}

fn finish(staging: Staging, manifest: &mut Manifest, out: &Path) -> Result<Image> {
    for (file, digest) in manifest.files.iter_mut() {
        *digest = sha256_file(&staging.tmp.join(file))?;
    }
    manifest.validate().map_err(|source| ImageError::Manifest {
        path: out.join(MANIFEST_FILE),
        source,
    })?;
    let mpath = staging.tmp.join(MANIFEST_FILE);
    fs::write(&mpath, manifest.to_toml()).map_err(io_err(&mpath, "write manifest"))?;
    staging.commit()?;
    Image::open(out)
}

fn base_manifest(
    out: &Path,
    name: &str,
    version: &str,
    kind: Kind,
    entry: &str,
    service: &ServiceContract,
    schemas: &BTreeMap<String, SchemaDecl>,
) -> Result<Manifest> {
    let merr = |source| ImageError::Manifest {
        path: out.join(MANIFEST_FILE),
        source,
    };
    validate_name("name", name).map_err(merr)?;
    let version = version.parse().map_err(|r: String| {
        merr(crate::ManifestError::Invalid {
            field: "version".into(),
            reason: r,
        })
    })?;
    Ok(Manifest {
        format: MANIFEST_FORMAT,
        name: name.to_string(),
        version,
        kind,
        entrypoint: Entrypoint {
            path: entry.to_string(),
            args: Vec::new(),
        },
        service: service.clone(),
        schemas: schemas.clone(),
        vm: None,
        files: [(entry.to_string(), String::new())].into(),
    })
}

/// Builds a process image in `out_dir` (which must not exist or be empty): the binary copied
/// to `bin/<its file name>`, and a manifest listing it with its digest.
///
/// # Errors
/// Bad name, version or schema, an unreadable binary, a non-empty output directory, or I/O.
pub fn process_image(
    out_dir: &Path,
    name: &str,
    version: &str,
    binary: &Path,
    service: &ServiceContract,
    schemas: &BTreeMap<String, SchemaDecl>,
) -> Result<Image> {
    let entry = format!("bin/{}", binary_name(out_dir, binary)?);
    let mut manifest = base_manifest(
        out_dir,
        name,
        version,
        Kind::Process,
        &entry,
        service,
        schemas,
    )?;
    let staging = Staging::new(out_dir)?;
    copy_executable(binary, &staging.tmp.join(&entry))?;
    finish(staging, &mut manifest, out_dir)
}

/// Builds a bootable VM image with default [`VmOptions`], except for the kernel.
///
/// # Errors
/// As [`vm_image_with`].
pub fn vm_image(
    out_dir: &Path,
    name: &str,
    version: &str,
    binary: &Path,
    service: &ServiceContract,
    schemas: &BTreeMap<String, SchemaDecl>,
    kernel: Option<&Path>,
) -> Result<Image> {
    let opts = VmOptions {
        kernel: kernel.map(Path::to_path_buf),
        ..VmOptions::default()
    };
    vm_image_with(out_dir, name, version, binary, service, schemas, &opts)
}

/// Builds a bootable VM image in `out_dir`: `boot/vmlinuz`, `boot/initramfs.cpio` and the
/// service binary at `bin/<its file name>` (also its path in the guest).
///
/// # Errors
/// No kernel found, a kernel whose release has no module tree, a required module missing, a
/// service binary that is not ELF, busybox missing, `ldd` failing on a dynamic binary, or I/O.
pub fn vm_image_with(
    out_dir: &Path,
    name: &str,
    version: &str,
    binary: &Path,
    service: &ServiceContract,
    schemas: &BTreeMap<String, SchemaDecl>,
    opts: &VmOptions,
) -> Result<Image> {
    let entry = format!("bin/{}", binary_name(out_dir, binary)?);
    if entry == "bin/busybox" {
        return Err(build_err(out_dir, "the service binary of a VM image may not be named busybox (that name holds the guest's busybox)"));
    }
    let mut manifest = base_manifest(out_dir, name, version, Kind::Vm, &entry, service, schemas)?;
    let kernel = match &opts.kernel {
        Some(k) => k.clone(),
        None => newest_kernel(Path::new("/boot")).ok_or_else(|| {
            build_err(
                out_dir,
                "no kernel given and no /boot/vmlinuz-* found (install linux-image-amd64)",
            )
        })?,
    };
    let release = kernel_release(&kernel).ok_or_else(|| build_err(out_dir, format!("cannot determine the kernel release of {}: no version string in its header and no vmlinuz-<release> file name", kernel.display())))?;
    let elf = read_elf_info(binary)
        .map_err(|r| build_err(out_dir, format!("service binary {}: {r}", binary.display())))?;

    let staging = Staging::new(out_dir)?;
    copy_executable(binary, &staging.tmp.join(&entry))?;
    let kpath = staging.tmp.join(KERNEL_PATH);
    fs::create_dir_all(kpath.parent().expect("has parent"))
        .map_err(io_err(&kpath, "create boot directory"))?;
    fs::copy(&kernel, &kpath).map_err(io_err(&kernel, "copy kernel"))?;

    let ipath = staging.tmp.join(INITRAMFS_PATH);
    let file = File::create(&ipath).map_err(io_err(&ipath, "create initramfs"))?;
    let mut w = CpioWriter::new(BufWriter::new(file));
    let cerr =
        |e: crate::cpio::CpioError| build_err(out_dir, format!("writing the initramfs: {e}"));
    for d in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "run",
        "lib",
    ] {
        w.add_dir(d, 0o755).map_err(cerr)?;
    }
    w.add_char_device("dev/console", 0o600, 5, 1)
        .map_err(cerr)?;
    w.add_char_device("dev/null", 0o666, 1, 3).map_err(cerr)?;

    // Service binary and, if dynamic, its libraries.
    add_host_file(&mut w, binary, &entry, 0o755).map_err(|r| build_err(out_dir, r))?;
    let mut libs = BTreeSet::new();
    if elf.dynamic {
        libs.extend(ldd(binary).map_err(|r| build_err(out_dir, r))?);
    }
    // Busybox (normally static; handled the same way if not).
    if !opts.busybox.is_file() {
        return Err(build_err(
            out_dir,
            format!(
                "busybox not found at {} (install busybox-static)",
                opts.busybox.display()
            ),
        ));
    }
    let bb = read_elf_info(&opts.busybox)
        .map_err(|r| build_err(out_dir, format!("busybox {}: {r}", opts.busybox.display())))?;
    add_host_file(&mut w, &opts.busybox, "bin/busybox", 0o755)
        .map_err(|r| build_err(out_dir, r))?;
    if bb.dynamic {
        libs.extend(ldd(&opts.busybox).map_err(|r| build_err(out_dir, r))?);
    }
    for lib in &libs {
        let guest = lib.to_string_lossy().trim_start_matches('/').to_string();
        if !w.contains(&guest) {
            w.add_parents(&guest).map_err(cerr)?;
            add_host_file(&mut w, lib, &guest, 0o755).map_err(|r| build_err(out_dir, r))?;
        }
    }
    for applet in busybox_applets(&opts.busybox) {
        if !w.contains(&applet) {
            w.add_parents(&applet).map_err(cerr)?;
            w.add_symlink(&applet, "/bin/busybox").map_err(cerr)?;
        }
    }

    // Kernel modules, in load order.
    let mods =
        resolve_modules(&opts.modules_root.join(&release)).map_err(|r| build_err(out_dir, r))?;
    let mut guest_mods = Vec::new();
    for m in &mods {
        let data = read_module(&m.host).map_err(|r| build_err(out_dir, r))?;
        let guest = format!("lib/modules/{release}/{}", m.rel_ko);
        w.add_parents(&guest).map_err(cerr)?;
        w.add_file(&guest, 0o644, &data).map_err(cerr)?;
        guest_mods.push(format!("/{guest}"));
    }
    let init = init_script(&release, &guest_mods, &format!("/{entry}"), service);
    w.add_file("init", 0o755, init.as_bytes()).map_err(cerr)?;
    let info = format!("name={name}\nversion={version}\nkernel_release={release}\n");
    w.add_file("etc/hitless-image", 0o644, info.as_bytes())
        .map_err(cerr)?;
    w.finish().map_err(cerr)?;

    manifest.vm = Some(VmBoot {
        kernel: KERNEL_PATH.into(),
        initramfs: INITRAMFS_PATH.into(),
        cmdline: opts.cmdline.clone(),
        kernel_release: release,
    });
    manifest.files.insert(KERNEL_PATH.into(), String::new());
    manifest.files.insert(INITRAMFS_PATH.into(), String::new());
    finish(staging, &mut manifest, out_dir)
}

fn add_host_file<W: std::io::Write>(
    w: &mut CpioWriter<W>,
    host: &Path,
    guest: &str,
    perm: u32,
) -> std::result::Result<(), String> {
    let data = fs::read(host).map_err(|e| format!("reading {}: {e}", host.display()))?;
    w.add_file(guest, perm, &data)
        .map_err(|e| format!("adding {} to the initramfs: {e}", host.display()))
}

/// Shell-quotes one word for `/bin/sh`.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r#"'\''"#))
}

/// The guest's `/init`: mounts proc, sys, devtmpfs and tmpfs; loads `modules` in order; exports
/// every `hitless.<key>=<value>` kernel parameter as `HITLESS_<KEY>`; brings up `lo` and `eth0`
/// for QEMU user networking (address `hitless.ip`, default 10.0.2.15/24; gateway `hitless.gw`,
/// default 10.0.2.2); prints the kernel release and [`READY_LINE`]; then execs the entrypoint
/// with the contract's argument template, its placeholders read from those variables (see
/// [`crate::service::ArgTemplate::shell_word`]).
pub fn init_script(
    release: &str,
    modules: &[String],
    entrypoint: &str,
    service: &ServiceContract,
) -> String {
    let mut s = String::from(
        r#"#!/bin/sh
# hitless guest init
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
echo "hitless-init: kernel $(uname -r)"
"#,
    );
    s.push_str(&format!(
        "[ \"$(uname -r)\" = {} ] || echo \"hitless-init: warning: modules are for {release}\"\n",
        sh_quote(release)
    ));
    for m in modules {
        s.push_str(&format!(
            "insmod {q} || echo \"hitless-init: warning: insmod {m} failed\"\n",
            q = sh_quote(m)
        ));
    }
    s.push_str(
        r#"for arg in $(cat /proc/cmdline); do
  case "$arg" in
    hitless.*=*)
      key="${arg%%=*}"; key="${key#hitless.}"
      key=$(echo "$key" | tr 'a-z.-' 'A-Z__')
      export "HITLESS_$key=${arg#*=}"
      ;;
  esac
done
ip link set lo up
n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
if [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up
  ip addr add "${HITLESS_IP:-10.0.2.15/24}" dev eth0
  ip route add default via "${HITLESS_GW:-10.0.2.2}"
  echo "nameserver 10.0.2.3" > /etc/resolv.conf
  echo "hitless-init: eth0 ${HITLESS_IP:-10.0.2.15/24}"
else
  echo "hitless-init: warning: no eth0"
fi
"#,
    );
    s.push_str(&format!("echo \"{READY_LINE}\"\n"));
    let mut cmd = format!("exec {}", sh_quote(entrypoint));
    for a in &service.args {
        cmd.push(' ');
        cmd.push_str(&a.shell_word((service.service_port, service.sync_port)));
    }
    s.push_str(&cmd);
    s.push('\n');
    s
}

/// The newest `vmlinuz-<release>` in `boot_dir`, comparing releases numerically.
pub fn newest_kernel(boot_dir: &Path) -> Option<PathBuf> {
    let key = |r: &str| -> Vec<(u64, String)> {
        r.split(|c: char| !c.is_ascii_alphanumeric())
            .map(|p| (p.parse().unwrap_or(0), p.to_string()))
            .collect()
    };
    fs::read_dir(boot_dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let r = n.strip_prefix("vmlinuz-")?.to_string();
            e.path().is_file().then_some((key(&r), e.path()))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, p)| p)
}

/// The release of a kernel: from the version string in its x86 boot header, else from a
/// `vmlinuz-<release>` file name.
pub fn kernel_release(kernel: &Path) -> Option<String> {
    hitless_vmm::kernel_release(kernel).or_else(|| {
        kernel
            .file_name()?
            .to_str()?
            .strip_prefix("vmlinuz-")
            .filter(|r| !r.is_empty())
            .map(str::to_string)
    })
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    n
}

/// What the builder needs to know about an executable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElfInfo {
    /// 64-bit (else 32-bit).
    pub is_64: bool,
    /// Has a program interpreter (`PT_INTERP`), i.e. is dynamically linked.
    pub dynamic: bool,
}

/// Parses the ELF header and program headers of `path` (little-endian ELF only).
///
/// # Errors
/// A sentence saying why it is not a usable ELF executable.
pub fn read_elf_info(path: &Path) -> std::result::Result<ElfInfo, String> {
    let mut f = File::open(path).map_err(|e| format!("cannot be read: {e}"))?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = read_up_to(&mut f, &mut buf);
    let b = &buf[..n];
    if b.len() < 52 || &b[..4] != b"\x7fELF" {
        return Err("is not an ELF executable".into());
    }
    if b[5] != 1 {
        return Err("is a big-endian ELF file, which is not supported".into());
    }
    let is_64 = match b[4] {
        1 => false,
        2 => true,
        _ => return Err("has an unknown ELF class".into()),
    };
    let u16_at = |o: usize| {
        b.get(o..o + 2)
            .map(|s| u16::from_le_bytes([s[0], s[1]]) as usize)
    };
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8)
            .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")) as usize)
    };
    let (phoff, phentsize, phnum) = if is_64 {
        (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    } else {
        (u32_at(0x1c), u16_at(0x2a), u16_at(0x2c))
    };
    let (phoff, phentsize, phnum) = match (phoff, phentsize, phnum) {
        (Some(a), Some(b), Some(c)) => (a, b, c),
        _ => return Err("has a truncated ELF header".into()),
    };
    let mut dynamic = false;
    for i in 0..phnum.min(256) {
        let Some(ty) = phoff.checked_add(i * phentsize).and_then(u32_at) else {
            return Err(
                "has program headers beyond the first 64 KiB, which is not supported".into(),
            );
        };
        if ty == 3 {
            dynamic = true;
        }
    }
    Ok(ElfInfo { is_64, dynamic })
}

/// Absolute paths of the shared libraries and loader a dynamic executable needs, as `ldd`
/// reports them.
///
/// # Errors
/// `ldd` cannot run, fails, or reports a library as not found.
pub fn ldd(binary: &Path) -> std::result::Result<Vec<PathBuf>, String> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| format!("running ldd on {}: {e}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            return Err(format!(
                "{} needs a library that is not installed: {line}",
                binary.display()
            ));
        }
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// Busybox's applets as guest paths (`bin/sh`, `sbin/insmod`, ...). Falls back to the applets
/// `/init` uses if busybox cannot list them.
pub fn busybox_applets(busybox: &Path) -> Vec<String> {
    let listed = Command::new(busybox)
        .arg("--list-full")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty() && !l.starts_with('/'))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    if listed.iter().any(|a| a == "bin/sh") {
        return listed;
    }
    [
        "sh", "mount", "mkdir", "insmod", "ip", "echo", "cat", "uname", "tr", "sleep", "poweroff",
    ]
    .iter()
    .map(|a| format!("bin/{a}"))
    .collect()
}

/// One module to put in the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleFile {
    /// Module name (`virtio_net`).
    pub name: String,
    /// File on the host.
    pub host: PathBuf,
    /// Path relative to the module tree, with any compression suffix removed (`kernel/.../x.ko`).
    pub rel_ko: String,
}

fn module_name(rel: &str) -> String {
    let file = rel.rsplit('/').next().unwrap_or(rel);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// The virtio modules ([`REQUIRED_MODULES`] and, where present, [`OPTIONAL_MODULES`]) and their
/// dependencies from `<tree>/modules.dep`, ordered so each module follows its dependencies.
/// Modules built into the kernel (`modules.builtin`) are skipped.
///
/// # Errors
/// The tree or `modules.dep` is missing, or a required module is neither a module nor built in.
pub fn resolve_modules(tree: &Path) -> std::result::Result<Vec<ModuleFile>, String> {
    let dep_path = tree.join("modules.dep");
    let text = fs::read_to_string(&dep_path).map_err(|e| {
        format!(
            "reading {}: {e} (is the kernel's module tree installed?)",
            dep_path.display()
        )
    })?;
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in text.lines() {
        let Some((m, rest)) = line.split_once(':') else {
            continue;
        };
        let m = m.trim();
        deps.insert(
            module_name(m),
            (
                m.to_string(),
                rest.split_whitespace().map(module_name).collect(),
            ),
        );
    }
    let builtin: BTreeSet<String> = fs::read_to_string(tree.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();
    let mut order: Vec<ModuleFile> = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        name: &str,
        deps: &HashMap<String, (String, Vec<String>)>,
        tree: &Path,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<ModuleFile>,
        depth: usize,
    ) -> std::result::Result<(), String> {
        if depth > 64 {
            return Err(format!(
                "module dependencies of {name} are nested too deeply"
            ));
        }
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        let (rel, ds) = deps.get(name).ok_or_else(|| {
            format!("module {name} is listed as a dependency but not in modules.dep")
        })?;
        for d in ds {
            visit(d, deps, tree, seen, order, depth + 1)?;
        }
        let rel_ko = match rel.find(".ko") {
            Some(i) => format!("{}.ko", &rel[..i]),
            None => rel.clone(),
        };
        order.push(ModuleFile {
            name: name.to_string(),
            host: tree.join(rel),
            rel_ko,
        });
        Ok(())
    }
    for (want, required) in REQUIRED_MODULES
        .iter()
        .map(|m| (m, true))
        .chain(OPTIONAL_MODULES.iter().map(|m| (m, false)))
    {
        if deps.contains_key(*want) {
            visit(want, &deps, tree, &mut seen, &mut order, 0)?;
        } else if builtin.contains(*want) {
            tracing::debug!(module = want, "built into the kernel");
        } else if required {
            return Err(format!(
                "kernel module {want} is neither in {} nor built into the kernel",
                dep_path.display()
            ));
        } else {
            tracing::debug!(module = want, "not provided by this kernel; skipped");
        }
    }
    Ok(order)
}

/// Reads a module file, decompressing `.ko.xz`, `.ko.zst` and `.ko.gz` with the `xz`, `zstd`
/// and `gzip` tools (busybox `insmod` loads plain `.ko` files only).
///
/// # Errors
/// The file cannot be read or the decompressor fails.
pub fn read_module(path: &Path) -> std::result::Result<Vec<u8>, String> {
    let s = path.to_string_lossy();
    let tool = if s.ends_with(".ko.xz") {
        Some("xz")
    } else if s.ends_with(".ko.zst") {
        Some("zstd")
    } else if s.ends_with(".ko.gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => fs::read(path).map_err(|e| format!("reading module {}: {e}", path.display())),
        Some(t) => {
            let out = Command::new(t)
                .args(["-d", "-c"])
                .arg(path)
                .output()
                .map_err(|e| format!("running {t} to decompress {}: {e}", path.display()))?;
            if !out.status.success() {
                return Err(format!(
                    "{t} could not decompress {}: {}",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok(out.stdout)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_normalise() {
        assert_eq!(
            module_name("kernel/drivers/char/hw_random/virtio-rng.ko"),
            "virtio_rng"
        );
        assert_eq!(module_name("kernel/net/core/failover.ko.xz"), "failover");
    }

    #[test]
    fn modules_are_ordered_after_their_dependencies() {
        let dir = tempfile::tempdir().unwrap();
        let dep = "\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/net/core/failover.ko.xz:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko.xz
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko.xz kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
";
        fs::write(dir.path().join("modules.dep"), dep).unwrap();
        fs::write(
            dir.path().join("modules.builtin"),
            "kernel/drivers/char/virtio_console.ko\n",
        )
        .unwrap();
        let mods = resolve_modules(dir.path()).unwrap();
        let names: Vec<&str> = mods.iter().map(|m| m.name.as_str()).collect();
        let pos = |n: &str| {
            names
                .iter()
                .position(|x| *x == n)
                .unwrap_or_else(|| panic!("{n} missing from {names:?}"))
        };
        assert!(pos("virtio_ring") < pos("virtio") && pos("virtio") < pos("virtio_pci"));
        assert!(pos("virtio_pci_modern_dev") < pos("virtio_pci"));
        assert!(pos("failover") < pos("net_failover") && pos("net_failover") < pos("virtio_net"));
        assert!(pos("virtio_net") < pos("virtio_blk"));
        assert_eq!(names.len(), 8, "each module once: {names:?}");
        assert!(
            !names.contains(&"virtio_console"),
            "built-in modules are skipped"
        );
        let fo = &mods[pos("failover")];
        assert_eq!(fo.rel_ko, "kernel/net/core/failover.ko");
        assert!(fo.host.ends_with("kernel/net/core/failover.ko.xz"));

        // A required module missing entirely is an error naming it.
        fs::write(dir.path().join("modules.builtin"), "").unwrap();
        let err = resolve_modules(dir.path()).unwrap_err();
        assert!(err.contains("virtio_console"), "{err}");
    }

    #[test]
    fn compressed_modules_are_decompressed() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("m.ko");
        fs::write(&plain, b"\x7fELF module body").unwrap();
        assert_eq!(read_module(&plain).unwrap(), b"\x7fELF module body");
        if Command::new("xz").arg("--version").output().is_err() {
            eprintln!("skipping the .ko.xz case: xz is not installed");
            return;
        }
        let st = Command::new("xz")
            .args(["-k", "-z"])
            .arg(&plain)
            .status()
            .unwrap();
        assert!(st.success());
        let xz = dir.path().join("m.ko.xz");
        assert_ne!(fs::read(&xz).unwrap(), b"\x7fELF module body");
        assert_eq!(read_module(&xz).unwrap(), b"\x7fELF module body");
        fs::write(&xz, b"not xz").unwrap();
        assert!(read_module(&xz)
            .unwrap_err()
            .contains("could not decompress"));
    }

    #[test]
    fn init_script_quotes_and_orders() {
        let s = init_script(
            "6.1.0-56-amd64",
            &["/lib/modules/r/a.ko".into(), "/lib/modules/r/b.ko".into()],
            "/bin/kvd",
            &crate::service::ServiceContract::from_parts(
                crate::service::Protocol::Resp,
                80,
                81,
                &["--name".into(), "it's".into(), "--at={sync_listen}".into()],
            )
            .unwrap(),
        );
        assert!(s.starts_with("#!/bin/sh\n"));
        let a = s.find("insmod '/lib/modules/r/a.ko'").unwrap();
        let b = s.find("insmod '/lib/modules/r/b.ko'").unwrap();
        let ready = s.find(READY_LINE).unwrap();
        let exec = s
            .find("exec '/bin/kvd' '--name' 'it'\\''s' '--at='\"${HITLESS_SYNC}\"")
            .unwrap();
        assert!(a < b && b < ready && ready < exec);
        assert!(s.contains("mount -t devtmpfs devtmpfs /dev"));
        assert!(s.contains("10.0.2.2"));
    }

    #[test]
    fn elf_detection() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("script");
        fs::write(&f, "#!/bin/sh\n").unwrap();
        assert!(read_elf_info(&f).unwrap_err().contains("not an ELF"));
        let me = std::env::current_exe().unwrap();
        let info = read_elf_info(&me).unwrap();
        assert!(info.is_64);
        assert!(info.dynamic, "test binaries link dynamically against libc");
        if Path::new("/bin/busybox").is_file() {
            assert!(
                !read_elf_info(Path::new("/bin/busybox")).unwrap().dynamic,
                "busybox-static has no interpreter"
            );
        }
    }

    #[test]
    fn newest_kernel_compares_numerically() {
        let dir = tempfile::tempdir().unwrap();
        for r in ["6.1.0-9-amd64", "6.1.0-56-amd64", "5.10.0-30-amd64"] {
            fs::write(dir.path().join(format!("vmlinuz-{r}")), b"x").unwrap();
        }
        fs::write(dir.path().join("config-9.9.9"), b"x").unwrap();
        let k = newest_kernel(dir.path()).unwrap();
        assert!(k.ends_with("vmlinuz-6.1.0-56-amd64"), "{}", k.display());
        assert_eq!(kernel_release(&k).as_deref(), Some("6.1.0-56-amd64"));
    }
}
