//! Writes the seed corpora: small valid encodings for every fuzz target, each checked by the
//! decoder it seeds before it is written.
//!
//! Run from `fuzz/`: `cargo run --example seeds` (writes `corpus/<target>/seed-<name>`).

use std::collections::BTreeMap;
use std::path::Path;

use hitless_control::{
    encode_frame, AgentCommand, AgentMessage, Configure, FrameKind, Hello, InstanceMessage,
    InstanceStatus, Role, SchemaSupport, ServiceStatus, SyncMode,
};
use hitless_image::{Manifest, SchemaDecl};
use hitless_sync::wire::{self, Control, FormatRange, FrameType, ResumePoint, WIRE_VERSION};
use hitless_sync::{Digest, Mutation};

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut n = 0;
    for (target, seeds) in [
        ("sync_frame", sync_frame()),
        ("sync_payload", sync_payload()),
        ("control_frame", control_frame()),
        ("control_message", control_message()),
        ("journal_envelope", journal_envelope()),
        ("kvd_resp", kvd_resp()),
        ("agent_resp", agent_resp()),
        ("agent_length_prefixed", agent_length_prefixed()),
        ("image_manifest", image_manifest()),
        ("agent_config", agent_config()),
        ("agent_peer_msg", agent_peer_msg()),
    ] {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in seeds {
            assert!(bytes.len() <= 4096, "{target}/{name} is not a small seed");
            std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
            n += 1;
        }
    }
    println!("wrote {n} seeds under {}", root.display());
    Ok(())
}

type Seeds = Vec<(&'static str, Vec<u8>)>;

fn muts() -> Vec<Mutation> {
    vec![
        Mutation::put("kv", b"alpha".to_vec(), b"1".to_vec()),
        Mutation::put("kv", b"beta".to_vec(), vec![0xff; 12]),
        Mutation::delete("kv", b"gamma".to_vec()),
        Mutation::put("meta", b"ver".to_vec(), b"2".to_vec()),
    ]
}

fn batch_payload(first: u64) -> Vec<u8> {
    let mut p = first.to_le_bytes().to_vec();
    p.extend(wire::encode_batch_payload(&muts()));
    p
}

fn digest() -> Digest {
    serde_json::from_str(r#"{"tables":{}}"#).expect("empty digest")
}

fn controls() -> Vec<(&'static str, Control)> {
    vec![
        (
            "hello",
            Control::Hello {
                service: "kvd".into(),
                node: "standby-1".into(),
                native: 2,
                reads: vec![1, 2],
                writes: vec![1, 2],
                ha: true,
                epoch: 3,
                resume: Some(ResumePoint { seq: 41, epoch: 3 }),
                formats: Some(FormatRange::BUILD),
            },
        ),
        (
            "welcome",
            Control::Welcome {
                node: "active-1".into(),
                native: 2,
                stream_version: 1,
                tables: vec!["kv".into(), "meta".into()],
                format: Some(WIRE_VERSION),
            },
        ),
        (
            "refuse",
            Control::Refuse {
                reason: "no common schema version".into(),
            },
        ),
        (
            "bulk-begin",
            Control::BulkBegin {
                seq: 40,
                records: 2,
            },
        ),
        (
            "bulk-end",
            Control::BulkEnd {
                seq: 40,
                digest: digest(),
                last_epoch: 3,
            },
        ),
        (
            "resume-begin",
            Control::ResumeBegin {
                from: 38,
                seq: 41,
                batches: 2,
            },
        ),
        (
            "resume-end",
            Control::ResumeEnd {
                seq: 41,
                last_epoch: 3,
                digest: digest(),
            },
        ),
        ("digest-check", Control::DigestCheck { digest: digest() }),
        (
            "digest-result",
            Control::DigestResult {
                seq: 41,
                matched: true,
            },
        ),
        ("promote", Control::Promote { last_seq: 41 }),
    ]
}

fn sync_frame() -> Seeds {
    let mut stream = Vec::new();
    for (_, c) in controls().iter().take(4) {
        stream.extend(c.encode(3, 0));
    }
    stream.extend(wire::encode_frame(
        FrameType::BulkChunk,
        3,
        40,
        &wire::encode_batch_payload(&muts()),
    ));
    stream.extend(wire::encode_frame(
        FrameType::Batch,
        3,
        44,
        &batch_payload(41),
    ));
    stream.extend(wire::encode_frame(FrameType::Heartbeat, 3, 44, &[]));
    let mut replay = 2u64.to_le_bytes().to_vec();
    replay.extend(batch_payload(39));
    let seeds: Seeds = vec![
        ("stream", [&[7u8][..], &stream].concat()),
        (
            "batch",
            [
                &[0u8][..],
                &wire::encode_frame(FrameType::Batch, 1, 4, &batch_payload(1)),
            ]
            .concat(),
        ),
        (
            "replay",
            [
                &[31u8][..],
                &wire::encode_frame(FrameType::ReplayBatch, 3, 42, &replay),
            ]
            .concat(),
        ),
        (
            "ack",
            [
                &[255u8][..],
                &wire::encode_frame(FrameType::Ack, 3, 44, &[]),
            ]
            .concat(),
        ),
    ];
    for (name, s) in &seeds {
        let mut rest = &s[1..];
        while !rest.is_empty() {
            let (_, used) = wire::decode_frame(rest).unwrap_or_else(|e| panic!("{name}: {e}"));
            rest = &rest[used..];
        }
    }
    seeds
}

fn sync_payload() -> Seeds {
    // Selector byte (frame type - 1), header sequence (8 bytes LE), epoch byte, payload.
    let seed = |kind: FrameType, seq: u64, payload: &[u8]| {
        let mut v = vec![kind as u8 - 1];
        v.extend(seq.to_le_bytes());
        v.push(3);
        v.extend(payload);
        v
    };
    let mut replay = 2u64.to_le_bytes().to_vec();
    replay.extend(batch_payload(39));
    let mut seeds: Seeds = vec![
        ("batch", seed(FrameType::Batch, 44, &batch_payload(41))),
        (
            "bulk-chunk",
            seed(
                FrameType::BulkChunk,
                40,
                &wire::encode_batch_payload(&muts()),
            ),
        ),
        ("replay", seed(FrameType::ReplayBatch, 42, &replay)),
        // A batch ending at the largest sequence number (its span check once overflowed).
        (
            "batch-last-max",
            seed(FrameType::Batch, u64::MAX, &batch_payload(u64::MAX - 3)),
        ),
    ];
    for (name, c) in controls() {
        let json = serde_json::to_vec(&c).expect("serializes");
        seeds.push((name, seed(c.frame_type(), 41, &json)));
    }
    seeds
}

fn agent_messages() -> Vec<(&'static str, AgentMessage)> {
    let msg = |request_id, command| AgentMessage {
        request_id,
        command,
    };
    vec![
        (
            "configure",
            msg(
                1,
                AgentCommand::Configure(Configure {
                    instance_id: "i7".into(),
                    role: Role::Standby,
                    epoch: 4,
                    active_sync_addr: Some("127.0.0.1:17801".into()),
                    designated_ha: true,
                    sync_mode: SyncMode::Synchronous,
                }),
            ),
        ),
        ("promote", msg(2, AgentCommand::Promote { epoch: 5 })),
        (
            "demote",
            msg(
                3,
                AgentCommand::Demote {
                    epoch: 6,
                    new_active_sync_addr: None,
                },
            ),
        ),
        ("status-request", msg(4, AgentCommand::StatusRequest)),
    ]
}

fn instance_messages() -> Vec<(&'static str, InstanceMessage)> {
    let schemas = BTreeMap::from([(
        "kvd".to_string(),
        SchemaSupport {
            read: vec![1, 2],
            write: vec![1, 2],
            native: 2,
        },
    )]);
    let services = BTreeMap::from([(
        "kvd".to_string(),
        ServiceStatus {
            applied_seq: 41,
            lag: 0,
            bulk_done: true,
            digest_verified_at: Some(40),
            ready: true,
        },
    )]);
    vec![
        (
            "hello",
            InstanceMessage::Hello(Hello {
                instance_id: "i7".into(),
                image_version: "2.0.0".into(),
                schemas,
                kernel_release: None,
                service_addr: "127.0.0.1:17800".into(),
                sync_addr: "127.0.0.1:17801".into(),
                formats: Some(hitless_control::FormatRange::BUILD),
            }),
        ),
        (
            "status",
            InstanceMessage::Status {
                request_id: 4,
                status: InstanceStatus {
                    role: Some(Role::Active),
                    epoch: 5,
                    services,
                    ready: true,
                    acked_seq: 41,
                    fenced: false,
                    quiesced: false,
                    memory: None,
                },
            },
        ),
        ("ack", InstanceMessage::Ack { request_id: 2 }),
        (
            "error",
            InstanceMessage::Error {
                request_id: 0,
                message: "stale epoch".into(),
            },
        ),
    ]
}

fn control_frame() -> Seeds {
    let mut stream = Vec::new();
    for (_, m) in agent_messages() {
        stream.extend(encode_frame(FrameKind::Agent, &serde_json::to_vec(&m).unwrap()).unwrap());
    }
    for (_, m) in instance_messages() {
        stream.extend(encode_frame(FrameKind::Instance, &serde_json::to_vec(&m).unwrap()).unwrap());
    }
    let one = encode_frame(
        FrameKind::Agent,
        &serde_json::to_vec(&agent_messages()[0].1).unwrap(),
    )
    .unwrap();
    vec![
        ("stream", [&[5u8][..], &stream].concat()),
        ("configure", [&[0u8][..], &one].concat()),
    ]
}

fn control_message() -> Seeds {
    let mut seeds = Seeds::new();
    for (name, m) in agent_messages() {
        seeds.push((
            name,
            [&[0u8][..], &serde_json::to_vec(&m).unwrap()].concat(),
        ));
    }
    for (name, m) in instance_messages() {
        let name = match name {
            "hello" => "instance-hello",
            other => other,
        };
        seeds.push((
            name,
            [&[1u8][..], &serde_json::to_vec(&m).unwrap()].concat(),
        ));
    }
    seeds
}

fn journal_envelope() -> Seeds {
    use hitless_journal::envelope::encode;
    vec![
        ("record", encode(br#"{"a":1}"#).unwrap()),
        ("empty", encode(b"").unwrap()),
        ("binary", encode(&[0u8, 1, 2, 0xfe, 0xff]).unwrap()),
    ]
}

fn kvd_resp() -> Seeds {
    vec![
        (
            "get",
            [&b"\0"[..], &kvd::resp::encode_request(&["GET", "k"])].concat(),
        ),
        (
            "set-small-limits",
            [
                &b"\x11"[..],
                &kvd::resp::encode_request(&["SET", "key", "value"]),
            ]
            .concat(),
        ),
        ("inline", b"\0SET k \"a b\" 'c d'\r\n".to_vec()),
        ("pipeline", b"\0*1\r\n$4\r\nPING\r\n*0\r\nPING\n".to_vec()),
        (
            "reply",
            b"\0*3\r\n$3\r\nabc\r\n:-12\r\n*2\r\n+OK\r\n$-1\r\n".to_vec(),
        ),
        ("error", b"\0-ERR unknown command\r\n".to_vec()),
    ]
}

fn agent_resp() -> Seeds {
    vec![
        (
            "request",
            kvd::resp::encode_request(&["SET", "key", "value"]),
        ),
        (
            "reply",
            b"*3\r\n$3\r\nabc\r\n:-12\r\n*2\r\n+OK\r\n$-1\r\n".to_vec(),
        ),
        ("inline", b"PING\r\n".to_vec()),
        ("nested", b"*1\r\n*1\r\n*1\r\n-ERR x\r\n".to_vec()),
    ]
}

/// A bound selector byte (255: the front's own bound), then length-prefixed messages.
fn agent_length_prefixed() -> Seeds {
    let framed = |payloads: &[&[u8]]| -> Vec<u8> {
        let mut out = vec![u8::MAX];
        for p in payloads {
            out.extend_from_slice(&u32::try_from(p.len()).unwrap().to_be_bytes());
            out.extend_from_slice(p);
        }
        out
    };
    let seeds = vec![
        ("one", framed(&[b"hello"])),
        ("pipeline", framed(&[b"a", b"", b"\x00\xff\r\n", b"last"])),
        ("partial", framed(&[b"whole", b"cut"])[..16].to_vec()),
        ("over-bound", vec![1, 0, 0, 0, 17, b'x']),
    ];
    let check =
        hitless_agent::framing::LengthPrefixedFraming::new(hitless_agent::resp::MAX_MESSAGE);
    assert_eq!(check.message_len(&seeds[0].1[1..]), Ok(Some(9)));
    seeds
}

fn image_manifest() -> Seeds {
    let digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".to_string();
    let process = Manifest {
        format: 1,
        name: "appliance-os".into(),
        version: "2.1.0-rc.1+b7".parse().unwrap(),
        kind: hitless_image::Kind::Process,
        entrypoint: hitless_image::manifest::Entrypoint {
            path: "bin/kvd".into(),
            args: vec!["--schema".into(), "2".into()],
        },
        service: hitless_image::ServiceContract::legacy(
            hitless_image::Kind::Process,
            &["--schema".into(), "2".into()],
        ),
        schemas: BTreeMap::from([
            ("kvd".to_string(), SchemaDecl::new(2, [1, 2]).unwrap()),
            (
                "cfg".to_string(),
                SchemaDecl {
                    reads: [1, 2, 3].into(),
                    writes: [2, 3].into(),
                    native: 2,
                },
            ),
        ]),
        vm: None,
        files: BTreeMap::from([("bin/kvd".to_string(), digest.clone())]),
    };
    let mut vm = process.clone();
    vm.kind = hitless_image::Kind::Vm;
    vm.version = "3.0.0".parse().unwrap();
    vm.vm = Some(hitless_image::manifest::VmBoot {
        kernel: "boot/vmlinuz".into(),
        initramfs: "boot/initramfs.cpio".into(),
        cmdline: "console=ttyS0 quiet".into(),
        kernel_release: "6.8.0-hitless".into(),
    });
    vm.files.insert("boot/vmlinuz".into(), digest.clone());
    vm.files.insert("boot/initramfs.cpio".into(), digest);
    // Format 2: the service contract with every placeholder and an escaped brace.
    let mut v2 = process.clone();
    v2.format = 2;
    v2.entrypoint.args.clear();
    v2.service = hitless_image::ServiceContract::from_parts(
        hitless_image::Protocol::LengthPrefixed,
        9000,
        9001,
        &[
            "--id={instance_id}".into(),
            "{service_listen}".into(),
            "{sync_listen}".into(),
            "{service_port}:{sync_port}".into(),
            "--control".into(),
            "{control}".into(),
            "--grace={ha_grace_ms}ms".into(),
            "{{literal}}".into(),
        ],
    )
    .unwrap();
    let seeds: Seeds = vec![
        ("process", process.to_toml().into_bytes()),
        ("vm", vm.to_toml().into_bytes()),
        ("process-v2", v2.to_toml().into_bytes()),
    ];
    for (name, s) in &seeds {
        Manifest::from_toml(std::str::from_utf8(s).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    seeds
}

fn agent_config() -> Seeds {
    let minimal = r#"appliance = "primary"
api_listen = "127.0.0.1:7701"
peer_listen = "127.0.0.1:7711"
peer_addr = "127.0.0.1:7712"
service_addr = "127.0.0.1:6380"
data_dir = "/var/lib/hitless"
image = "/var/lib/hitless/images/appliance-os-1.0.0"
"#;
    let full = format!(
        r#"{}backend = "qemu"

[heartbeat]
interval_ms = 20
misses = 5

[instances]
port_base = 18000
memory_mib = 1024
cpu_percent = 200
vcpus = 2
stop_grace_ms = 5000
"#,
        minimal
            .replace("primary", "secondary")
            .replace("127.0.0.1:6380", "[::1]:6380")
    );
    let seeds: Seeds = vec![("minimal", minimal.into()), ("full", full.into_bytes())];
    for (name, s) in &seeds {
        hitless_agent::AgentConfig::parse(Path::new(name), std::str::from_utf8(s).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    seeds
}

fn agent_peer_msg() -> Seeds {
    let seeds: Seeds = vec![
        ("heartbeat", br#"{"msg":"heartbeat","from":"primary","driving":true,"epoch":4}"#.to_vec()),
        (
            "request",
            br#"{"msg":"request","id":7,"op":{"op":"front-route","route":{"epoch":5,"backend":"127.0.0.1:17800","hold":false},"listen":true}}"#.to_vec(),
        ),
        (
            "control",
            br#"{"msg":"request","id":8,"op":{"op":"control","instance":3,"command":{"type":"promote","epoch":5}}}"#.to_vec(),
        ),
        ("response", br#"{"msg":"response","id":7,"result":{"Ok":{"result":"done"}}}"#.to_vec()),
        ("response-err", br#"{"msg":"response","id":8,"result":{"Err":"no such instance"}}"#.to_vec()),
        (
            "observed",
            br#"{"msg":"observed","observation":{"observation":"exited","instance":3,"reason":"killed","expected":true}}"#.to_vec(),
        ),
        ("journal", br#"{"msg":"journal","index":12,"envelope":"484a5245"}"#.to_vec()),
    ];
    for (name, s) in &seeds {
        serde_json::from_slice::<hitless_agent::remote::PeerMsg>(s)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    seeds
}
