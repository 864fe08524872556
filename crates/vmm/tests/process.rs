//! Process sandbox lifecycle against the real kernel (runs as root).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hitless_vmm::{
    Backend, CpuQuota, ExitInfo, InstanceSpec, InstanceStatus, Payload, ProcessBackend,
    ProcessPayload, ResourceLimits, VmmError,
};

fn spec(dir: &Path, id: &str, script: &str) -> InstanceSpec {
    InstanceSpec {
        id: id.into(),
        payload: Payload::Process(ProcessPayload {
            binary: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![("GREETING".into(), "hi".into())],
        }),
        run_dir: dir.join(id),
        limits: ResourceLimits::default(),
        ports: vec![],
        control_socket: dir.join(id).join("control.sock"),
    }
}

fn unique(name: &str) -> String {
    format!("t-{}-{name}", std::process::id())
}

/// Waits (bounded) until the console log contains `needle`.
fn wait_for_log(path: &Path, needle: &str, bound: Duration) -> String {
    let deadline = Instant::now() + bound;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) || Instant::now() >= deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

#[test]
fn instance_runs_in_its_own_namespaces_under_the_sandbox_init() {
    let dir = tempfile::tempdir().unwrap();
    let id = unique("ns");
    let s = spec(
        dir.path(),
        &id,
        "echo pid=$$; echo init=$(cat /proc/1/comm); echo host=$(hostname); echo env=$GREETING; echo ctl=$HITLESS_CONTROL_SOCKET; \
         echo procs=$(ls /proc | grep -c '^[0-9]'); echo err >&2; exec sleep 30",
    );
    let mut h = ProcessBackend::default().start(&s).unwrap();
    let pid = h.pid().unwrap().to_string();
    let log = wait_for_log(h.console_log(), "err", Duration::from_secs(5));
    // The service's pid is the init's only child.
    let service = h.service_pid().unwrap();
    assert_ne!(service.to_string(), pid);
    let children: Vec<u32> = children_states(h.pid().unwrap())
        .into_iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(children, [service]);
    // The payload is the only child of the sandbox's init, which is PID 1.
    assert!(log.contains("pid=2\n"), "{log}");
    assert!(log.contains("init=hitless-init\n"), "{log}");
    assert!(log.contains(&format!("host={id}\n")), "{log}");
    assert!(log.contains("env=hi\n"), "{log}");
    assert!(
        log.contains(&format!("ctl={}\n", s.control_socket.display())),
        "{log}"
    );
    // A fresh /proc shows only the sandbox's own processes (sh, ls, grep, ...).
    let procs: usize = log
        .lines()
        .find_map(|l| l.strip_prefix("procs="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(procs < 10, "{log}");
    assert!(
        log.contains("err\n"),
        "stderr goes to the console log: {log}"
    );
    for kind in ["pid_for_children", "uts", "ipc", "mnt"] {
        let theirs = if kind == "pid_for_children" {
            ns(&pid, "pid")
        } else {
            ns(&pid, kind)
        };
        let ours = ns(
            "self",
            if kind == "pid_for_children" {
                "pid"
            } else {
                kind
            },
        );
        assert_ne!(theirs, ours, "{kind} namespace is shared");
    }
    // The network namespace is shared by default.
    assert_eq!(ns(&pid, "net"), ns("self", "net"));
    assert!(h.status().is_running());
    let e = h.kill().unwrap();
    assert_eq!(e, ExitInfo::Signal(9));
}

#[test]
fn cgroup_limits_are_written_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let id = unique("cg");
    let mut s = spec(dir.path(), &id, "exec sleep 30");
    s.limits = ResourceLimits {
        memory_bytes: Some(96 << 20),
        cpu: Some(CpuQuota::from_millicpus(500)),
        pids_max: Some(64),
    };
    let backend = ProcessBackend::default();
    if backend.config().cgroup.is_none() {
        eprintln!("skipping: no cgroup hierarchy on this host");
        return;
    }
    let mut h = backend.start(&s).unwrap();
    let pid = h.pid().unwrap();
    let info = h.info();
    assert!(!info.cgroups.is_empty());
    let mut saw_memory = false;
    for d in &info.cgroups {
        let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|l| l == pid.to_string()),
            "{} lacks {pid}",
            d.display()
        );
        for f in ["memory.limit_in_bytes", "memory.max"] {
            if let Ok(v) = std::fs::read_to_string(d.join(f)) {
                assert_eq!(v.trim(), (96u64 << 20).to_string());
                saw_memory = true;
            }
        }
        if let Ok(q) = std::fs::read_to_string(d.join("cpu.cfs_quota_us")) {
            assert_eq!(q.trim(), "50000");
        }
        if let Ok(q) = std::fs::read_to_string(d.join("cpu.max")) {
            assert_eq!(q.trim(), "50000 100000");
        }
    }
    assert!(
        saw_memory,
        "memory limit file not found in {:?}",
        info.cgroups
    );
    h.stop(Duration::from_millis(200)).unwrap();
    for d in &info.cgroups {
        assert!(!d.exists(), "{} left behind", d.display());
    }
}

#[test]
fn graceful_stop_uses_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(
        dir.path(),
        &unique("term"),
        "trap 'echo got-term; exit 3' TERM; echo ready; while :; do sleep 0.05; done",
    );
    let mut h = ProcessBackend::default().start(&s).unwrap();
    wait_for_log(h.console_log(), "ready", Duration::from_secs(5));
    let t = Instant::now();
    let e = h.stop(Duration::from_secs(10)).unwrap();
    assert_eq!(e, ExitInfo::Code(3));
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(std::fs::read_to_string(h.console_log())
        .unwrap()
        .contains("got-term"));
    assert_eq!(h.status(), InstanceStatus::Exited(ExitInfo::Code(3)));
    assert_eq!(h.pid(), None);
    // Stopping again reports the same exit.
    assert_eq!(h.stop(Duration::from_secs(1)).unwrap(), ExitInfo::Code(3));
}

/// The children of `pid` (from `/proc/<pid>/task/<pid>/children`) and their states.
fn children_states(pid: u32) -> Vec<(u32, char)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    text.split_whitespace()
        .filter_map(|c| {
            let stat = std::fs::read_to_string(format!("/proc/{c}/stat")).ok()?;
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            Some((c.parse().ok()?, state))
        })
        .collect()
}

#[test]
fn a_payload_without_a_sigterm_handler_stops_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    // `sleep` installs no handler: as PID 1 it would ignore SIGTERM until the SIGKILL.
    let s = spec(
        dir.path(),
        &unique("nohandler"),
        "echo ready; exec sleep 1000",
    );
    let mut h = ProcessBackend::default().start(&s).unwrap();
    wait_for_log(h.console_log(), "ready", Duration::from_secs(5));
    let t = Instant::now();
    let e = h.stop(Duration::from_secs(5)).unwrap();
    // Ended by the forwarded SIGTERM (reported by the init as 128 + 15), not by a SIGKILL.
    assert_eq!(e, ExitInfo::Code(128 + libc::SIGTERM));
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

#[test]
fn forwarded_signals_reach_the_payload() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(
        dir.path(),
        &unique("usr1"),
        "trap 'echo got-usr1' USR1; trap 'echo got-hup; exit 4' HUP; echo ready; \
         while :; do sleep 0.05; done",
    );
    let mut h = ProcessBackend::default().start(&s).unwrap();
    wait_for_log(h.console_log(), "ready", Duration::from_secs(5));
    let pid = h.pid().unwrap() as i32;
    // SAFETY: plain kill(2) on the sandbox's init, our child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
    let log = wait_for_log(h.console_log(), "got-usr1", Duration::from_secs(5));
    assert!(log.contains("got-usr1"), "{log}");
    assert!(h.status().is_running(), "SIGUSR1 must not end the init");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    assert_eq!(
        h.wait_timeout(Duration::from_secs(5)).unwrap(),
        Some(ExitInfo::Code(4))
    );
}

#[test]
fn the_sandbox_init_keeps_none_of_the_agents_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    // A socket of the "agent" (this test): a copy that never execs must not keep it open.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let s = spec(dir.path(), &unique("fds"), "echo ready; exec sleep 1000");
    let mut h = ProcessBackend::default().start(&s).unwrap();
    wait_for_log(h.console_log(), "ready", Duration::from_secs(5));
    let pid = h.pid().unwrap();
    let mut fds: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    assert_eq!(fds, [0, 1, 2], "descriptors of the init");
    drop(listener);
    h.kill().unwrap();
}

#[test]
fn the_sandbox_init_reaps_orphaned_zombies() {
    let dir = tempfile::tempdir().unwrap();
    // Each subshell exits at once, orphaning its `sleep`, which is reparented to PID 1 and
    // becomes a zombie of PID 1 when it ends.
    let s = spec(
        dir.path(),
        &unique("zombies"),
        "for i in 1 2 3 4 5 6 7 8; do (sleep 0.05 &); done; echo spawned; exec sleep 1000",
    );
    let mut h = ProcessBackend::default().start(&s).unwrap();
    let pid = h.pid().unwrap();
    wait_for_log(h.console_log(), "spawned", Duration::from_secs(5));
    // Until the sleeps ended and were reaped, PID 1 has more than the payload as children.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut kids = children_states(pid);
    while kids.len() != 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        kids = children_states(pid);
    }
    assert_eq!(kids.len(), 1, "children of the init: {kids:?}");
    assert_ne!(kids[0].1, 'Z', "{kids:?}");
    assert_eq!(
        h.stop(Duration::from_secs(5)).unwrap(),
        ExitInfo::Code(128 + libc::SIGTERM)
    );
}

#[test]
fn sigterm_ignorer_is_killed_after_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(
        dir.path(),
        &unique("ignore"),
        "trap '' TERM; echo ready; while :; do sleep 0.05; done",
    );
    let mut h = ProcessBackend::default().start(&s).unwrap();
    wait_for_log(h.console_log(), "ready", Duration::from_secs(5));
    let t = Instant::now();
    let e = h.stop(Duration::from_millis(300)).unwrap();
    assert_eq!(e, ExitInfo::Signal(libc::SIGKILL));
    assert!(t.elapsed() >= Duration::from_millis(300));
}

#[test]
fn external_kill_9_ends_the_whole_tree() {
    let dir = tempfile::tempdir().unwrap();
    // PID 1 spawns a grandchild that would outlive a plain process group.
    let s = spec(
        dir.path(),
        &unique("kill9"),
        "sleep 1000 & echo child=$!; wait",
    );
    let mut h = ProcessBackend::default().start(&s).unwrap();
    let pid = h.pid().unwrap();
    wait_for_log(h.console_log(), "child=", Duration::from_secs(5));
    // Find the grandchild's host pid through our /proc.
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let grandchild: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    // SAFETY: plain kill(2) on a pid we own.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let e = h.wait_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(e, Some(ExitInfo::Signal(9)));
    assert_eq!(h.status(), InstanceStatus::Exited(ExitInfo::Signal(9)));
    // The grandchild died with the namespace (the kernel reaps it before
    // PID 1's exit is reported).
    assert!(
        !Path::new(&format!("/proc/{grandchild}")).exists()
            || std::fs::read_to_string(format!("/proc/{grandchild}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true),
        "grandchild {grandchild} survived"
    );
}

#[test]
fn exit_watch_notifies_other_threads_and_restart_works() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(dir.path(), &unique("exit"), "echo run; exit 5");
    let backend = ProcessBackend::default();
    let mut h = backend.start(&s).unwrap();
    let w = h.exit_watch();
    let t = std::thread::spawn(move || w.wait_timeout(Duration::from_secs(5)));
    assert_eq!(t.join().unwrap(), Some(ExitInfo::Code(5)));
    let mut h2 = backend
        .restart(h.as_mut(), &s, Duration::from_secs(1))
        .unwrap();
    assert_eq!(
        h2.wait_timeout(Duration::from_secs(5)).unwrap(),
        Some(ExitInfo::Code(5))
    );
    // Both runs appended to the same console log.
    let log = std::fs::read_to_string(h2.console_log()).unwrap();
    assert_eq!(log.matches("run\n").count(), 2, "{log}");
}

#[test]
fn bad_specs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let backend = ProcessBackend::default();
    let mut s = spec(dir.path(), &unique("bad"), "true");
    s.payload = Payload::Process(ProcessPayload {
        binary: "/nonexistent/bin/app".into(),
        args: vec![],
        env: vec![],
    });
    let err = backend.start(&s).err().unwrap();
    assert!(matches!(err, VmmError::BadPath { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("/nonexistent/bin/app"), "{msg}");

    // A directory is not a binary.
    s.payload = Payload::Process(ProcessPayload {
        binary: "/tmp".into(),
        args: vec![],
        env: vec![],
    });
    assert!(matches!(backend.start(&s), Err(VmmError::BadPath { .. })));

    // Exec-time failure (a script with a missing interpreter) is reported
    // with its stage.
    let script = dir.path().join("noint.sh");
    std::fs::write(&script, "#!/nonexistent/interp\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    s.payload = Payload::Process(ProcessPayload {
        binary: script,
        args: vec![],
        env: vec![],
    });
    let err = backend.start(&s).err().unwrap();
    assert!(
        matches!(err, VmmError::Launch { stage, .. } if stage == "executing the payload"),
        "{err}"
    );

    s.id = "bad/id".into();
    assert!(matches!(backend.start(&s), Err(VmmError::InvalidSpec(_))));
}

/// Helper mode of `agent_death_kills_its_instances`: start an instance,
/// report its pid, then linger until killed.
fn agent_stand_in() {
    let dir = PathBuf::from(std::env::var("HITLESS_VMM_AGENT_DIR").unwrap());
    let s = spec(&dir, &unique("orphan"), "exec sleep 60");
    let h = ProcessBackend::default().start(&s).unwrap();
    println!("instance-pid={}", h.pid().unwrap());
    std::mem::forget(h);
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn agent_death_kills_its_instances() {
    if std::env::var_os("HITLESS_VMM_AGENT_DIR").is_some() {
        agent_stand_in();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut agent = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "agent_death_kills_its_instances",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("HITLESS_VMM_AGENT_DIR", dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(agent.stdout.take().unwrap());
    let mut pid = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid.is_none() && Instant::now() < deadline {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut out, &mut line).unwrap() == 0 {
            break;
        }
        // libtest prints "test <name> ... " on the same line first.
        pid = line
            .trim()
            .split_once("instance-pid=")
            .map(|(_, p)| p.parse::<u32>().unwrap());
    }
    let pid = pid.expect("the stand-in agent reported its instance");
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let agent_pid = agent.id();
    agent.kill().unwrap();
    agent.wait().unwrap();
    // The instance got SIGKILL from PR_SET_PDEATHSIG; once its parent is
    // gone it is reaped by init, so /proc/<pid> disappears.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
    assert!(
        state.as_deref().is_none_or(|s| s.contains(") Z ")),
        "instance {pid} outlived its agent: {state:?}"
    );
    // The dead agent could not remove the instance cgroup; a restarted agent
    // would reuse it. Clean it up here.
    let id = format!("t-{agent_pid}-orphan");
    for base in [
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/pids",
    ] {
        let d = Path::new(base).join("hitless").join(&id);
        // A zombie still pins a v1 cgroup until the host's init reaps it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while d.exists() && std::fs::remove_dir(&d).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn launches_never_hang_while_other_threads_allocate() {
    // The sandbox init forks in a copy of this multithreaded process: it must not take a lock
    // (the allocator's, libc's atfork ones) that another thread held at the moment of the
    // clone, or it would wait forever and the launch would time out.
    let dir = tempfile::tempdir().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn: Vec<_> = (0..3)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut keep = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    keep.push(vec![0u8; 4096]);
                    if keep.len() > 256 {
                        keep.clear();
                    }
                }
            })
        })
        .collect();
    let backend = ProcessBackend::default();
    for i in 0..20 {
        let s = spec(dir.path(), &unique(&format!("churn{i}")), "exec sleep 30");
        let t = Instant::now();
        let mut h = backend.start(&s).unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "launch {i} took {:?}",
            t.elapsed()
        );
        assert_eq!(
            h.stop(Duration::from_secs(5)).unwrap(),
            ExitInfo::Code(128 + libc::SIGTERM)
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in churn {
        t.join().unwrap();
    }
}
