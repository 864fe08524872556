//! Running code and commands inside a network namespace, and running the external tools (`ip`,
//! `nft`) with bounded time and output.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};

use crate::NetlabError;

/// Where `ip netns add` pins named network namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Bound on one run of `ip` or `nft`.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the stdout kept from one command (`ip -j link show` on a busy host stays far below).
const STDOUT_LIMIT: u64 = 4 << 20;
/// Bound on the stderr kept from one command (it only goes into an error message).
const STDERR_LIMIT: u64 = 16 << 10;
/// How often a running command is polled for its exit.
const POLL: Duration = Duration::from_millis(5);

/// Checks a network namespace name: what `ip netns` accepts as a file name in [`NETNS_DIR`].
pub fn validate_netns_name(netns: &str) -> Result<(), NetlabError> {
    let refuse = |reason| NetlabError::InvalidName {
        name: netns.to_string(),
        what: "network namespace name",
        reason,
    };
    if netns.is_empty() || netns.len() > 255 {
        return Err(refuse("a namespace name has 1 to 255 characters"));
    }
    if netns == "." || netns == ".." || netns.contains('/') || netns.contains('\0') {
        return Err(refuse(
            "a namespace name is a plain file name (no `/`, not `.` or `..`)",
        ));
    }
    Ok(())
}

/// The file that pins the namespace: `/run/netns/<netns>`.
pub fn netns_path(netns: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(netns)
}

fn open_netns(netns: &str) -> io::Result<OwnedFd> {
    if validate_netns_name(netns).is_err() {
        return Err(io::Error::from_raw_os_error(libc_einval()));
    }
    // File::open sets O_CLOEXEC: the descriptor never leaks into a spawned program.
    Ok(File::open(netns_path(netns))?.into())
}

fn libc_einval() -> i32 {
    nix::errno::Errno::EINVAL as i32
}

/// Moves the **calling thread** into the named network namespace (`setns(CLONE_NEWNET)` on
/// `/run/netns/<netns>`).
///
/// A network namespace is a per-thread attribute: only this thread changes, the rest of the
/// process stays where it was. What the thread does afterwards happens inside the namespace:
/// sockets it creates belong to the namespace for their whole life (they may then be used from
/// any thread), threads it spawns start inside it, and `/proc/sys/net` shows the namespace's
/// settings to it. `/sys/class/net` still shows the namespace sysfs was mounted in; use netlink
/// (`ip`) to look at links. There is no way back other than entering another namespace, so call
/// this on a thread of its own ([`run_in`] does), never on an async runtime's worker.
pub fn enter(netns: &str) -> Result<(), NetlabError> {
    let fd = open_netns(netns).map_err(|source| NetlabError::Enter {
        netns: netns.to_string(),
        source,
    })?;
    setns(fd, CloneFlags::CLONE_NEWNET).map_err(|errno| NetlabError::Enter {
        netns: netns.to_string(),
        source: io::Error::from(errno),
    })
}

/// Runs `f` on a new thread that first [`enter`]s `netns`, and returns its result.
///
/// The caller's thread does not move. Sockets `f` creates stay in the namespace after `f`
/// returns, so this is how to make a listener or a connected stream inside a namespace and use it
/// from anywhere. A panic in `f` is resumed on the caller.
pub fn run_in<T, F>(netns: &str, f: F) -> Result<T, NetlabError>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    thread::scope(|scope| {
        let handle = thread::Builder::new()
            .name(format!("netns {netns}"))
            .spawn_scoped(scope, || {
                enter(netns)?;
                Ok(f())
            })
            .map_err(|source| NetlabError::Enter {
                netns: netns.to_string(),
                source,
            })?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// A [`Command`] that runs `program` inside the network namespace `netns`.
///
/// The child calls `setns(CLONE_NEWNET)` between fork and exec on a descriptor of
/// `/run/netns/<netns>` opened now (so the namespace is pinned from here on). It was picked over
/// `ip netns exec`, which also unshares the mount namespace and remounts `/sys` for the child:
/// that would hide `/sys/fs/cgroup`, which the agents' process sandbox needs, and would put an
/// extra `ip` in front of every program. The price: `/sys/class/net` in the child still shows
/// the root namespace (use `ip`, which asks netlink), and `/etc/netns/<netns>` is not bind
/// mounted over `/etc`.
///
/// The program's pid is the child's pid (no wrapper). If the namespace does not exist or the
/// name is invalid, spawning fails with that error (`NotFound`, `InvalidInput`).
pub fn command_in(netns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    let prepared: Result<OwnedFd, i32> =
        open_netns(netns).map_err(|e| e.raw_os_error().unwrap_or_else(libc_einval));
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // operations are allowed. It performs one `setns` system call on a descriptor opened before
    // the fork, and builds `io::Error`s from raw errno values, which allocates nothing. It
    // touches no lock, no allocator and no state shared with other threads.
    unsafe {
        cmd.pre_exec(move || match &prepared {
            Ok(fd) => setns(fd, CloneFlags::CLONE_NEWNET).map_err(io::Error::from),
            Err(errno) => Err(io::Error::from_raw_os_error(*errno)),
        });
    }
    cmd
}

/// How to describe a command line in messages: program and arguments, plus the namespace.
pub(crate) fn describe(program: &str, args: &[&str], netns: Option<&str>) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    if let Some(ns) = netns {
        s.push_str(&format!(" (in network namespace {ns})"));
    }
    s
}

/// Runs `ip`/`nft` style tools: `program args`, inside `netns` if given, `stdin` fed in, and
/// returns stdout. A non-zero exit becomes [`NetlabError::Command`] with the stderr.
pub(crate) fn run_tool(
    program: &str,
    args: &[&str],
    netns: Option<&str>,
    stdin: Option<&str>,
) -> Result<String, NetlabError> {
    let command = describe(program, args, netns);
    if let Some(ns) = netns {
        // Without this, a missing namespace would read like a missing program.
        validate_netns_name(ns)?;
        if !netns_path(ns).exists() {
            return Err(NetlabError::Enter {
                netns: ns.to_string(),
                source: io::Error::new(io::ErrorKind::NotFound, "no such network namespace"),
            });
        }
    }
    let mut cmd = match netns {
        Some(ns) => command_in(ns, program),
        None => Command::new(program),
    };
    cmd.args(args);
    tracing::debug!(%command, "netlab: running");
    run_bounded(cmd, &command, stdin, COMMAND_TIMEOUT)
}

fn drain(mut r: impl Read + Send + 'static, limit: u64) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut kept = Vec::new();
        // Errors only cut the capture short; the exit status is what decides.
        let _ = (&mut r).take(limit).read_to_end(&mut kept);
        let _ = io::copy(&mut r, &mut io::sink());
        kept
    })
}

fn join_by(handle: thread::JoinHandle<Vec<u8>>, deadline: Instant) -> Option<Vec<u8>> {
    while !handle.is_finished() {
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL);
    }
    handle.join().ok()
}

fn run_bounded(
    mut cmd: Command,
    command: &str,
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<String, NetlabError> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| NetlabError::Spawn {
        command: command.to_string(),
        source,
    })?;
    let out = child.stdout.take().map(|o| drain(o, STDOUT_LIMIT));
    let err = child.stderr.take().map(|e| drain(e, STDERR_LIMIT));
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A tool that exits early closes its end; its exit status tells what went wrong.
        let _ = pipe.write_all(input.as_bytes());
    }
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(NetlabError::Timeout {
                    command: command.to_string(),
                    timeout,
                });
            }
            Ok(None) => thread::sleep(POLL),
            Err(source) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(NetlabError::Spawn {
                    command: command.to_string(),
                    source,
                });
            }
        }
    };
    // The pipes close when the tool exits, unless it left a child holding them: do not wait for
    // that past the bound.
    let stdout = out.and_then(|h| join_by(h, deadline)).unwrap_or_default();
    let stderr = err.and_then(|h| join_by(h, deadline)).unwrap_or_default();
    if !status.success() {
        let stderr = String::from_utf8_lossy(&stderr).trim().to_string();
        return Err(NetlabError::Command {
            command: command.to_string(),
            status: status.to_string(),
            stderr: if stderr.is_empty() {
                "(nothing on stderr)".to_string()
            } else {
                stderr
            },
        });
    }
    String::from_utf8(stdout).map_err(|_| NetlabError::Output {
        command: command.to_string(),
        reason: "it is not UTF-8".to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names_that_are_not_plain_file_names_are_refused() {
        for bad in ["", ".", "..", "a/b", "/run/netns/x", "a\0b"] {
            let e = validate_netns_name(bad).unwrap_err().to_string();
            assert!(e.contains("network namespace name"), "{bad:?}: {e}");
        }
        validate_netns_name(&"x".repeat(256)).unwrap_err();
        for ok in ["hl-primary", "x", "a.b", &"x".repeat(255)] {
            validate_netns_name(ok).unwrap();
        }
    }

    #[test]
    fn entering_a_missing_namespace_fails_with_its_name() {
        let e = run_in("netlab-unit-no-such-ns", || ()).unwrap_err();
        assert!(matches!(e, NetlabError::Enter { .. }), "{e:?}");
        assert!(e.to_string().contains("netlab-unit-no-such-ns"), "{e}");
    }

    #[test]
    fn a_command_in_a_missing_namespace_does_not_start() {
        let e = command_in("netlab-unit-no-such-ns", "true")
            .status()
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        let e = command_in("a/b", "true").status().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc_einval()), "{e}");
    }

    #[test]
    fn a_failing_tool_reports_its_command_line_and_stderr() {
        let e = run_tool("sh", &["-c", "echo bad thing >&2; exit 3"], None, None).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("sh -c"), "{text}");
        assert!(text.contains("bad thing"), "{text}");
        assert!(text.contains('3'), "{text}");
    }

    #[test]
    fn a_tool_gets_its_stdin_and_returns_its_stdout() {
        let out = run_tool("cat", &[], None, Some("hello\n")).unwrap();
        assert_eq!(out, "hello\n");
    }

    #[test]
    fn a_missing_tool_is_a_spawn_error_naming_it() {
        let e = run_tool("netlab-no-such-tool", &["x"], None, None).unwrap_err();
        assert!(matches!(e, NetlabError::Spawn { .. }), "{e:?}");
        assert!(e.to_string().contains("netlab-no-such-tool x"), "{e}");
    }

    #[test]
    fn a_tool_that_hangs_is_killed_at_the_bound() {
        let started = Instant::now();
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let e = run_bounded(cmd, "sleep 30", None, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, NetlabError::Timeout { .. }), "{e:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_tool_in_a_missing_namespace_names_the_namespace() {
        let e = run_tool(
            "nft",
            &["list", "ruleset"],
            Some("netlab-unit-no-such-ns"),
            None,
        )
        .unwrap_err();
        assert!(matches!(e, NetlabError::Enter { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains("netlab-unit-no-such-ns"), "{text}");
        assert!(text.contains("no such network namespace"), "{text}");
    }

    #[test]
    fn describe_names_the_namespace() {
        assert_eq!(
            describe("nft", &["-f", "-"], Some("hl-primary")),
            "nft -f - (in network namespace hl-primary)"
        );
        assert_eq!(describe("ip", &["link"], None), "ip link");
    }
}
