//! Image directories end to end: build, open, tamper, sign, and (where the machine has a
//! kernel, busybox and QEMU) build and boot a VM image.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use hitless_image::build::{self, READY_LINE};
use hitless_image::manifest::{parse_schema_spec, MAX_MANIFEST_LEN};
use hitless_image::service::{Protocol, ServiceContract};
use hitless_image::{
    sign, Image, ImageError, Kind, ManifestError, OpenOptions, SignatureStatus, MANIFEST_FILE,
    SIGNATURE_FILE,
};

fn fake_binary(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, b"\x7fELF pretend service binary").unwrap();
    p
}

/// A contract with the argument template `args`.
fn contract(args: &[&str]) -> ServiceContract {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    ServiceContract::from_parts(Protocol::Resp, 6379, 7000, &args).unwrap()
}

fn process_image(dir: &Path) -> Image {
    let bin = fake_binary(dir, "kvd");
    let schemas = parse_schema_spec("kv=1:1,2").unwrap();
    build::process_image(
        &dir.join("img"),
        "kvd",
        "1.0.0",
        &bin,
        &contract(&["--port", "7000"]),
        &schemas,
    )
    .unwrap()
}

#[test]
fn process_image_builds_and_reopens_with_typed_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let img = process_image(tmp.path());
    let again = Image::open(&img.dir).unwrap();
    let m = &again.manifest;
    assert_eq!(m.kind, Kind::Process);
    assert_eq!(m.version.to_string(), "1.0.0");
    assert_eq!(m.entrypoint.path, "bin/kvd");
    assert_eq!(m.service.args_text(), ["--port", "7000"]);
    assert!(m.entrypoint.args.is_empty());
    assert_eq!(m.format, hitless_image::manifest::MANIFEST_FORMAT);
    assert_eq!(m.schemas["kv"].native, 1);
    assert_eq!(
        m.files["bin/kvd"],
        hitless_image::sha256_bytes(b"\x7fELF pretend service binary")
    );
    assert_eq!(again.signature, SignatureStatus::Unsigned);
    assert_eq!(
        fs::read(again.entrypoint_path()).unwrap(),
        b"\x7fELF pretend service binary"
    );
    // No staging directory is left behind.
    let names: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn build_refuses_non_empty_output_and_bad_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let img = process_image(tmp.path());
    let bin = fake_binary(tmp.path(), "kvd");
    let err = build::process_image(
        &img.dir,
        "kvd",
        "1.0.0",
        &bin,
        &contract(&[]),
        &BTreeMap::new(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
    let out = tmp.path().join("bad");
    let err = build::process_image(&out, "kvd", "one", &bin, &contract(&[]), &BTreeMap::new())
        .unwrap_err();
    assert!(
        err.to_string().contains("field `version` is invalid"),
        "{err}"
    );
    let err = build::process_image(
        &out,
        "kvd",
        "1.0.0",
        &tmp.path().join("absent"),
        &contract(&[]),
        &BTreeMap::new(),
    )
    .unwrap_err();
    assert!(matches!(err, ImageError::Io { .. }), "{err}");
    assert!(!out.exists(), "a failed build leaves nothing");
}

#[test]
fn digest_mismatch_names_file_and_both_digests() {
    let tmp = tempfile::tempdir().unwrap();
    let img = process_image(tmp.path());
    let listed = img.manifest.files["bin/kvd"].clone();
    fs::write(img.dir.join("bin/kvd"), b"\x7fELF trojan").unwrap();
    let actual = hitless_image::sha256_bytes(b"\x7fELF trojan");
    match Image::open(&img.dir).unwrap_err() {
        ImageError::DigestMismatch {
            file,
            expected,
            actual: got,
            ..
        } => {
            assert_eq!(file, "bin/kvd");
            assert_eq!(expected, listed);
            assert_eq!(got, actual);
        }
        other => panic!("expected a digest mismatch, got {other}"),
    }
    let msg = Image::open(&img.dir).unwrap_err().to_string();
    assert!(
        msg.contains("bin/kvd") && msg.contains(&listed) && msg.contains(&actual),
        "{msg}"
    );
}

#[test]
fn missing_and_symlinked_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let img = process_image(tmp.path());
    let f = img.dir.join("bin/kvd");
    let keep = tmp.path().join("kept");
    fs::rename(&f, &keep).unwrap();
    let err = Image::open(&img.dir).unwrap_err();
    assert!(
        matches!(err, ImageError::MissingFile { ref file, .. } if file == "bin/kvd"),
        "{err}"
    );
    std::os::unix::fs::symlink(&keep, &f).unwrap();
    let err = Image::open(&img.dir).unwrap_err();
    assert!(err.to_string().contains("symbolic link"), "{err}");
}

#[test]
fn malformed_and_oversized_manifests_are_refused_with_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let img = process_image(tmp.path());
    let mpath = img.dir.join(MANIFEST_FILE);
    let good = fs::read_to_string(&mpath).unwrap();
    fs::write(
        &mpath,
        good.replace("kind = \"process\"", "kind = \"unikernel\""),
    )
    .unwrap();
    let err = Image::open(&img.dir).unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::Manifest {
                source: ManifestError::UnknownKind { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains(&mpath.display().to_string()),
        "{err}"
    );
    let mut big = good.clone();
    big.push_str(&format!("# {}\n", "x".repeat(MAX_MANIFEST_LEN as usize)));
    fs::write(&mpath, big).unwrap();
    let err = Image::open(&img.dir).unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::Manifest {
                source: ManifestError::TooLarge { .. },
                ..
            }
        ),
        "{err}"
    );
    fs::write(&mpath, [0xffu8, 0xfe, 0x00]).unwrap();
    assert!(Image::open(&img.dir)
        .unwrap_err()
        .to_string()
        .contains("not UTF-8"));
    fs::remove_file(&mpath).unwrap();
    assert!(matches!(
        Image::open(&img.dir).unwrap_err(),
        ImageError::Io { .. }
    ));
}

#[test]
fn signature_verifies_and_tampering_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let img = process_image(tmp.path());
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let other = SigningKey::from_bytes(&[9u8; 32]);
    let trusted = OpenOptions {
        trusted_keys: vec![key.verifying_key()],
    };

    let err = Image::open_with(&img.dir, &trusted).unwrap_err();
    assert!(matches!(err, ImageError::Unsigned { .. }), "{err}");

    sign::sign_image(&img.dir, &key).unwrap();
    let ok = Image::open_with(&img.dir, &trusted).unwrap();
    assert_eq!(
        ok.signature,
        SignatureStatus::Verified {
            key: sign::verifying_key_to_hex(&key.verifying_key())
        }
    );
    assert_eq!(
        Image::open(&img.dir).unwrap().signature,
        SignatureStatus::NotChecked
    );

    // Signed by a key that is not trusted.
    let wrong = OpenOptions {
        trusted_keys: vec![other.verifying_key()],
    };
    assert!(matches!(
        Image::open_with(&img.dir, &wrong).unwrap_err(),
        ImageError::BadSignature { .. }
    ));

    // Tampered manifest: change an argument (digests still match, so only the signature can
    // catch it).
    let mpath = img.dir.join(MANIFEST_FILE);
    let text = fs::read_to_string(&mpath).unwrap();
    fs::write(&mpath, text.replace("7000", "7001")).unwrap();
    assert!(
        Image::open(&img.dir).is_ok(),
        "unsigned checking still accepts it"
    );
    let err = Image::open_with(&img.dir, &trusted).unwrap_err();
    assert!(matches!(err, ImageError::BadSignature { .. }), "{err}");
    assert!(err.to_string().contains("does not verify"), "{err}");

    // Malformed signature file.
    fs::write(img.dir.join(SIGNATURE_FILE), "rsa:00\n").unwrap();
    let err = Image::open(&img.dir).unwrap_err();
    assert!(matches!(err, ImageError::BadSignatureFile { .. }), "{err}");

    // Keys round-trip through hex.
    let hexkey = sign::verifying_key_to_hex(&key.verifying_key());
    assert_eq!(
        sign::verifying_key_from_hex(&hexkey).unwrap(),
        key.verifying_key()
    );
    assert!(sign::verifying_key_from_hex("zz").is_err());
}

/// Parsed newc entry: name -> (mode, data).
fn read_cpio(bytes: &[u8]) -> BTreeMap<String, (u32, Vec<u8>)> {
    let hex = |s: &[u8]| u32::from_str_radix(std::str::from_utf8(s).unwrap(), 16).unwrap();
    let mut out = BTreeMap::new();
    let mut pos = 0;
    loop {
        let h = &bytes[pos..pos + 110];
        assert_eq!(&h[..6], b"070701");
        let f = |i: usize| hex(&h[6 + i * 8..14 + i * 8]);
        let (mode, size, namesize) = (f(1), f(6) as usize, f(11) as usize);
        let name = String::from_utf8(bytes[pos + 110..pos + 110 + namesize - 1].to_vec()).unwrap();
        let data_at = (pos + 110 + namesize + 3) & !3;
        if name == "TRAILER!!!" {
            return out;
        }
        out.insert(name, (mode, bytes[data_at..data_at + size].to_vec()));
        pos = (data_at + size + 3) & !3;
    }
}

fn vm_prerequisites() -> Option<&'static str> {
    if build::newest_kernel(Path::new("/boot")).is_none() {
        return Some("no /boot/vmlinuz-* (apt-get install linux-image-amd64)");
    }
    if !Path::new("/bin/busybox").is_file() {
        return Some("no /bin/busybox (apt-get install busybox-static)");
    }
    None
}

#[test]
fn vm_image_build_has_kernel_modules_busybox_init_and_libraries() {
    if let Some(why) = vm_prerequisites() {
        eprintln!("skipping VM image build: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // /bin/sh is dynamically linked on Debian: its libraries and loader must be included.
    let svc = tmp.path().join("svc");
    fs::copy("/bin/sh", &svc).unwrap();
    let schemas = parse_schema_spec("kv=1,2:1,2").unwrap();
    let img = build::vm_image(
        &tmp.path().join("vm"),
        "kvd",
        "2.0.0",
        &svc,
        &contract(&["-c", "echo hi"]),
        &schemas,
        None,
    )
    .unwrap();
    let vm = img.manifest.vm.clone().unwrap();
    let release = vm.kernel_release.clone();
    assert!(Path::new("/lib/modules").join(&release).is_dir());
    assert_eq!(img.manifest.files.len(), 3);
    let (kernel, initramfs) = img.boot_paths().unwrap();
    assert_eq!(build::kernel_release(&kernel).unwrap(), release);
    let entries = read_cpio(&fs::read(initramfs).unwrap());

    let (mode, init) = &entries["init"];
    assert_eq!(*mode, 0o100_755);
    let init = String::from_utf8(init.clone()).unwrap();
    assert!(init.contains("exec '/bin/svc' '-c' 'echo hi'"), "{init}");
    assert_eq!(entries["bin/svc"].1, fs::read("/bin/sh").unwrap());
    assert_eq!(entries["bin/busybox"].1, fs::read("/bin/busybox").unwrap());
    assert_eq!(entries["bin/sh"], (0o120_777, b"/bin/busybox".to_vec()));
    assert_eq!(entries["dev/console"].0, 0o020_600);
    // The loader and libc from ldd are present.
    for lib in build::ldd(Path::new("/bin/sh")).unwrap() {
        let guest = lib.to_string_lossy().trim_start_matches('/').to_string();
        assert!(entries.contains_key(&guest), "{guest} missing");
    }
    // virtio_net and its dependencies are present and loaded in dependency order.
    let pos = |m: &str| {
        init.find(&format!("/{m}.ko'"))
            .unwrap_or_else(|| panic!("{m} not loaded by init"))
    };
    assert!(pos("failover") < pos("net_failover") && pos("net_failover") < pos("virtio_net"));
    assert!(pos("virtio_ring") < pos("virtio") && pos("virtio") < pos("virtio_pci"));
    assert!(pos("virtio_console") > pos("virtio"));
    for line in init.lines().filter(|l| l.starts_with("insmod ")) {
        let path = line.split('\'').nth(1).unwrap().trim_start_matches('/');
        let (mode, data) = &entries[path];
        assert_eq!(*mode, 0o100_644);
        assert_eq!(
            &data[..4],
            b"\x7fELF",
            "{path} must be an uncompressed module"
        );
    }
}

/// Boots a VM image under QEMU (software emulation, so it runs anywhere QEMU is installed) and
/// waits for the init's ready line and the service's own output.
#[test]
fn vm_image_boots_to_the_service() {
    if let Some(why) = vm_prerequisites() {
        eprintln!("skipping VM boot: {why}");
        return;
    }
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipping VM boot: qemu-system-x86_64 is not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let svc = tmp.path().join("svc");
    fs::copy("/bin/sh", &svc).unwrap();
    let script = "echo service-up $HITLESS_CONTROL; ip -4 addr show eth0 | grep -q 10.0.2.15 && echo eth0-configured; poweroff -f";
    let img = build::vm_image(
        &tmp.path().join("vm"),
        "probe",
        "1.0.0",
        &svc,
        &contract(&["-c", script]),
        &BTreeMap::new(),
        None,
    )
    .unwrap();
    let (kernel, initramfs) = img.boot_paths().unwrap();
    let cmdline = format!(
        "{} hitless.control=/dev/vport0p1",
        img.manifest.vm.as_ref().unwrap().cmdline
    );
    let log = tmp.path().join("console.log");
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-m",
            "256",
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initramfs)
        .args([
            "-append",
            &cmdline,
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-pci,netdev=n0",
        ])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = String::from_utf8_lossy(&fs::read(&log).unwrap()).into_owned();
    assert!(
        status.is_some(),
        "guest did not power off within {deadline:?}:\n{out}"
    );
    let release = &img.manifest.vm.as_ref().unwrap().kernel_release;
    assert!(
        out.contains(&format!("hitless-init: kernel {release}")),
        "{out}"
    );
    assert!(out.contains(READY_LINE), "{out}");
    assert!(out.contains("service-up /dev/vport0p1"), "{out}");
    assert!(out.contains("eth0-configured"), "{out}");
    assert!(!out.contains("hitless-init: warning"), "{out}");
    eprintln!("VM boot to service took {:?}", started.elapsed());
}
