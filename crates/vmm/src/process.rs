//! The process sandbox backend.
//!
//! # How an instance is started
//!
//! The payload is started with a single `clone(2)` carrying
//! `CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC` (plus
//! `CLONE_NEWNET` when configured). The cloned child is therefore PID 1 of a
//! fresh PID namespace. It stays there as a minimal init ([`crate::init`]):
//! it forks the payload as its child (pid 2), forwards the stop signals to
//! it, reaps zombies and exits with the payload's status. So:
//!
//! * the host pid the handle reports is the init's, and a SIGKILL to it ends
//!   the whole namespace (the kernel kills every other process in a PID
//!   namespace when its init dies);
//! * the payload is not PID 1, so SIGTERM has its ordinary default action:
//!   a payload without a handler stops gracefully on the agent's SIGTERM,
//!   and a payload that ends by a signal is reported as exiting with code
//!   `128 + signal` (the init's own exit).
//!
//! `clone` is used rather than `fork` + `unshare` + `fork`, and rather than
//! `Command::pre_exec` (which cannot put the exec'd program itself into a new
//! PID namespace). The agent is multithreaded, so between `clone` and
//! `execve` the child only makes raw system calls that are async-signal-safe
//! (`read`, `write`, `close`, `prctl`, `setsid`, `mount`, `sethostname`,
//! `chdir`, `dup2`, `sigaction`, `sigprocmask`, `clone` (as a fork), `sigwaitinfo`,
//! `kill`, `waitpid`, `execve`, `_exit`) on data
//! prepared before the clone; it never allocates or takes a lock.
//!
//! Ordering and failure reporting use two close-on-exec pipes:
//!
//! 1. the child sets `PR_SET_PDEATHSIG(SIGKILL)` and then blocks on the *go*
//!    pipe; if the agent dies before releasing it, the read sees EOF and the
//!    child exits;
//! 2. the agent moves the child into the instance cgroup, then releases it;
//! 3. the child makes all mounts private, mounts a fresh `/proc`, sets the
//!    hostname to the instance id, redirects stdin to `/dev/null` and
//!    stdout+stderr to the console log, forks the payload and becomes its
//!    init; the payload's process execs. Any failing step writes
//!    `(stage, errno)` to the *error* pipe; the init closes its copy after the
//!    fork and a successful exec closes the payload's, so EOF means the
//!    payload runs.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that created the child exits,
//! so every clone happens on one long-lived spawner thread that lives as long
//! as the process: if the agent dies (even by SIGKILL), every sandbox it
//! started receives SIGKILL.

use crate::Watched;
use std::ffi::{CString, OsStr};
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::cgroup::{CgroupVersion, InstanceCgroup};
use crate::exit::ExitWatch;
use crate::{
    Backend, BackendKind, ControlEndpoint, ExitInfo, InstanceHandle, InstanceInfo, InstanceSpec,
    InstanceStatus, Payload, PortForward, ProcessPayload, VmmError, CONTROL_SOCKET_ENV,
    INSTANCE_ID_ENV,
};

/// How long `kill` and the SIGKILL step of `stop` wait for the exit.
pub(crate) const KILL_WAIT: Duration = Duration::from_secs(10);
/// How long the agent waits for the child to exec or report a failure.
const LAUNCH_WAIT_MS: u16 = 10_000;
/// Stack for the cloned child until it execs.
const CHILD_STACK: usize = 256 * 1024;

/// Options of the process sandbox.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// Also give each instance its own (empty, loopback-down) network
    /// namespace. Off by default: instances serve on host loopback.
    pub new_network_namespace: bool,
    /// Cgroup hierarchy to use; `None` = detect. When no hierarchy is found,
    /// instances without limits run without a cgroup and instances with
    /// limits fail to start.
    pub cgroup: Option<CgroupVersion>,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        ProcessConfig {
            new_network_namespace: false,
            cgroup: CgroupVersion::detect(),
        }
    }
}

/// Runs instances as sandboxed host processes (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct ProcessBackend {
    config: ProcessConfig,
}

impl ProcessBackend {
    /// A backend with `config`.
    pub fn new(config: ProcessConfig) -> Self {
        ProcessBackend { config }
    }

    /// The configuration.
    pub fn config(&self) -> &ProcessConfig {
        &self.config
    }
}

/// Setup steps of the child, reported through the error pipe.
const STAGES: [&str; 11] = [
    "setting the parent-death signal",
    "waiting for the agent",
    "creating a session",
    "making mounts private",
    "mounting /proc",
    "setting the hostname",
    "entering the run directory",
    "redirecting stdio",
    "resetting signals",
    "starting the payload under the sandbox init",
    "executing the payload",
];

/// Everything the child touches, prepared before the clone.
struct ChildCtx {
    go_r: i32,
    go_w: i32,
    err_r: i32,
    err_w: i32,
    devnull: i32,
    log: i32,
    binary: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    hostname: *const libc::c_char,
    hostname_len: usize,
    run_dir: *const libc::c_char,
}

/// Writes `(stage, errno)` to the error pipe and exits. Async-signal-safe.
unsafe fn child_fail(ctx: &ChildCtx, stage: u8) -> ! {
    // SAFETY: errno location is thread-local and valid; write and _exit are
    // async-signal-safe and get valid pointers/lengths.
    unsafe {
        let errno = *libc::__errno_location();
        let mut msg = [0u8; 5];
        msg[0] = stage;
        msg[1..].copy_from_slice(&errno.to_ne_bytes());
        libc::write(ctx.err_w, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

/// Entry point of the cloned child. Only async-signal-safe calls.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points at the ChildCtx the parent built before the clone;
    // without CLONE_VM the child owns a copy of that memory, so the pointers
    // inside stay valid until execve. Every call below is a plain system call
    // wrapper that is async-signal-safe, so no lock held by another parent
    // thread at clone time can be reached.
    unsafe {
        let ctx = &*(arg as *const ChildCtx);
        libc::close(ctx.go_w);
        libc::close(ctx.err_r);
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            child_fail(ctx, 0);
        }
        let mut b = 0u8;
        loop {
            let r = libc::read(ctx.go_r, (&mut b as *mut u8).cast(), 1);
            if r == 1 {
                break;
            }
            if r < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            // EOF: the agent went away before releasing us.
            libc::_exit(126);
        }
        libc::close(ctx.go_r);
        if libc::setsid() < 0 {
            child_fail(ctx, 2);
        }
        let root = c"/".as_ptr();
        if libc::mount(
            std::ptr::null(),
            root,
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            child_fail(ctx, 3);
        }
        if libc::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ) != 0
        {
            child_fail(ctx, 4);
        }
        if libc::sethostname(ctx.hostname, ctx.hostname_len) != 0 {
            child_fail(ctx, 5);
        }
        if libc::chdir(ctx.run_dir) != 0 {
            child_fail(ctx, 6);
        }
        if libc::dup2(ctx.devnull, 0) < 0
            || libc::dup2(ctx.log, 1) < 0
            || libc::dup2(ctx.log, 2) < 0
        {
            child_fail(ctx, 7);
        }
        // The Rust runtime ignores SIGPIPE and ignored dispositions survive
        // exec; give the payload default dispositions and an empty mask.
        if libc::signal(libc::SIGPIPE, libc::SIG_DFL) == libc::SIG_ERR {
            child_fail(ctx, 8);
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
            child_fail(ctx, 8);
        }
        // This process stays PID 1 of the namespace as the sandbox init (see
        // `crate::init`); the payload runs as its child.
        let failure = crate::init::run(|| {
            libc::execve(ctx.binary, ctx.argv, ctx.envp);
            child_fail(ctx, 10)
        });
        child_fail(
            ctx,
            match failure {
                crate::init::InitFailure::Signals => 8,
                crate::init::InitFailure::Fork => 9,
            },
        )
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The long-lived thread all clones happen on (see the module docs).
fn spawner() -> &'static Mutex<mpsc::Sender<Job>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("sandbox-spawner".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .expect("the sandbox spawner thread must start");
        Mutex::new(tx)
    })
}

pub(crate) fn on_spawner<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    spawner()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(job)
        .expect("the sandbox spawner thread never exits");
    rx.recv()
        .expect("the sandbox spawner thread runs every job")
}

fn cstring(what: &'static str, s: &OsStr) -> Result<CString, VmmError> {
    CString::new(s.as_bytes())
        .map_err(|_| VmmError::InvalidSpec(format!("{what} {s:?} contains a NUL byte")))
}

fn pipe() -> Result<(OwnedFd, OwnedFd), VmmError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| VmmError::io("creating a pipe", e.into()))
}

/// Owned data the clone needs; moved to the spawner thread.
struct Prepared {
    binary: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    hostname: CString,
    run_dir: CString,
    flags: libc::c_int,
    fds: [i32; 6],
}

/// Clones the child. Runs on the spawner thread.
fn clone_child(p: Prepared) -> std::io::Result<i32> {
    let argv: Vec<*const libc::c_char> = p
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = p
        .envp
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let ctx = ChildCtx {
        go_r: p.fds[0],
        go_w: p.fds[1],
        err_r: p.fds[2],
        err_w: p.fds[3],
        devnull: p.fds[4],
        log: p.fds[5],
        binary: p.binary.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        hostname: p.hostname.as_ptr(),
        hostname_len: p.hostname.as_bytes().len(),
        run_dir: p.run_dir.as_ptr(),
    };
    let mut stack = vec![0u8; CHILD_STACK];
    // The stack grows down: pass its 16-byte aligned top.
    let top = (stack.as_mut_ptr() as usize + CHILD_STACK) & !15;
    // SAFETY: `child_main` only reads `ctx` and the buffers it points to,
    // all of which outlive this call in the parent and are copied into the
    // child (no CLONE_VM). `top` is inside `stack`, which is live for the
    // call. SIGCHLD as exit signal makes the child waitable like a fork.
    let pid = unsafe {
        libc::clone(
            child_main,
            top as *mut libc::c_void,
            p.flags | libc::SIGCHLD,
            &ctx as *const ChildCtx as *mut libc::c_void,
        )
    };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(pid)
}

/// Reads the child's launch report: `Ok(())` on EOF (exec succeeded).
fn read_launch_report(err_r: &OwnedFd) -> Result<(), (usize, std::io::Error)> {
    let mut pfd = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(err_r),
        nix::poll::PollFlags::POLLIN,
    )];
    match nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(LAUNCH_WAIT_MS)) {
        Ok(0) => {
            return Err((
                1,
                std::io::Error::new(ErrorKind::TimedOut, "no report within 10 s"),
            ))
        }
        Ok(_) => {}
        Err(e) => return Err((1, e.into())),
    }
    let mut f = File::from(err_r.try_clone().map_err(|e| (1, e))?);
    let mut buf = Vec::with_capacity(5);
    (&mut f)
        .take(5)
        .read_to_end(&mut buf)
        .map_err(|e| (1usize, e))?;
    if buf.is_empty() {
        return Ok(());
    }
    if buf.len() != 5 {
        return Err((
            1,
            std::io::Error::new(ErrorKind::InvalidData, "truncated launch report"),
        ));
    }
    let stage = (buf[0] as usize).min(STAGES.len() - 1);
    let errno = i32::from_ne_bytes([buf[1], buf[2], buf[3], buf[4]]);
    Err((stage, std::io::Error::from_raw_os_error(errno)))
}

fn check_binary(path: &Path) -> Result<(), VmmError> {
    let bad = |reason: String| VmmError::BadPath {
        what: "payload binary",
        path: path.into(),
        reason,
    };
    if !path.is_absolute() {
        return Err(bad("the path must be absolute".into()));
    }
    let md = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !md.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if md.permissions().mode() & 0o111 == 0 {
        return Err(bad("not executable".into()));
    }
    Ok(())
}

/// Removes a stale socket left at `path` by an earlier run.
pub(crate) fn remove_stale_socket(path: &Path) -> Result<(), VmmError> {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => std::fs::remove_file(path)
            .map_err(|e| VmmError::io(format!("removing stale socket {}", path.display()), e)),
        Ok(_) => Err(VmmError::BadPath {
            what: "control socket",
            path: path.into(),
            reason: "exists and is not a socket".into(),
        }),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(VmmError::io(format!("inspecting {}", path.display()), e)),
    }
}

impl ProcessBackend {
    fn launch(&self, spec: &InstanceSpec, p: &ProcessPayload) -> Result<ProcessHandle, VmmError> {
        check_binary(&p.binary)?;
        std::fs::create_dir_all(&spec.run_dir).map_err(|e| {
            VmmError::io(
                format!("creating run directory {}", spec.run_dir.display()),
                e,
            )
        })?;
        if let Some(parent) = spec.control_socket.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| VmmError::io(format!("creating directory {}", parent.display()), e))?;
        }
        remove_stale_socket(&spec.control_socket)?;
        let console = spec.console_log_path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&console)
            .map_err(|e| VmmError::io(format!("opening console log {}", console.display()), e))?;
        let devnull = File::open("/dev/null").map_err(|e| VmmError::io("opening /dev/null", e))?;

        let mut argv = vec![cstring("binary", p.binary.as_os_str())?];
        for a in &p.args {
            argv.push(cstring("argument", OsStr::new(a))?);
        }
        let mut env: Vec<(String, String)> = Vec::new();
        if let Ok(path) = std::env::var("PATH") {
            env.push(("PATH".into(), path));
        }
        env.extend(p.env.iter().cloned());
        env.push((
            CONTROL_SOCKET_ENV.into(),
            spec.control_socket.to_string_lossy().into_owned(),
        ));
        env.push((INSTANCE_ID_ENV.into(), spec.id.clone()));
        let mut envp = Vec::with_capacity(env.len());
        for (k, v) in &env {
            if k.is_empty() || k.contains('=') {
                return Err(VmmError::InvalidSpec(format!(
                    "environment variable name {k:?} is empty or contains '='"
                )));
            }
            envp.push(cstring(
                "environment entry",
                OsStr::new(&format!("{k}={v}")),
            )?);
        }

        let mut cgroup = match &self.config.cgroup {
            Some(v) => Some(InstanceCgroup::create(v, &spec.id, &spec.limits)?),
            None if spec.limits.is_empty() => None,
            None => {
                return Err(VmmError::Cgroup {
                    path: "/sys/fs/cgroup".into(),
                    reason: "resource limits were requested but no cgroup hierarchy was found"
                        .into(),
                })
            }
        };

        let (go_r, go_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let mut flags =
            libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
        if self.config.new_network_namespace {
            flags |= libc::CLONE_NEWNET;
        }
        let prepared = Prepared {
            binary: argv[0].clone(),
            argv,
            envp,
            hostname: cstring("id", OsStr::new(&spec.id))?,
            run_dir: cstring("run directory", spec.run_dir.as_os_str())?,
            flags,
            fds: [
                go_r.as_raw_fd(),
                go_w.as_raw_fd(),
                err_r.as_raw_fd(),
                err_w.as_raw_fd(),
                devnull.as_raw_fd(),
                log.as_raw_fd(),
            ],
        };
        // The fds stay open here until the clone returned.
        let pid = on_spawner(move || clone_child(prepared)).map_err(|e| VmmError::Launch {
            id: spec.id.clone(),
            stage: "cloning into new namespaces",
            source: e,
        })?;
        drop(go_r);
        drop(err_w);
        drop(devnull);
        drop(log);
        let watch = ExitWatch::spawn(pid).map_err(|e| VmmError::io("starting reaper thread", e));
        let watch = match watch {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: pid is our unreaped child, so it cannot be recycled.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
                return Err(e);
            }
        };
        let fail =
            |stage: &'static str, source: std::io::Error, cg: &mut Option<InstanceCgroup>| {
                let _ = watch.signal(Signal::SIGKILL);
                watch.wait_timeout(KILL_WAIT);
                if let Some(cg) = cg.as_mut() {
                    let _ = cg.remove();
                }
                VmmError::Launch {
                    id: spec.id.clone(),
                    stage,
                    source,
                }
            };
        if let Some(cg) = &cgroup {
            if let Err(e) = cg.add_pid(pid as u32) {
                let err = fail(
                    "joining the cgroup",
                    std::io::Error::other(e.to_string()),
                    &mut cgroup,
                );
                return Err(err);
            }
        }
        let mut go = File::from(go_w);
        if let Err(e) = go.write_all(&[1]) {
            return Err(fail("releasing the child", e, &mut cgroup));
        }
        drop(go);
        if let Err((stage, e)) = read_launch_report(&err_r) {
            return Err(fail(STAGES[stage], e, &mut cgroup));
        }
        // The payload's process exists once its exec closed the pipe: it is the init's only
        // child (it may have ended already, or not be listed without CONFIG_PROC_CHILDREN).
        let service_pid = first_child(pid as u32);
        if service_pid.is_none() {
            tracing::warn!(id = %spec.id, pid, "cannot find the payload's pid under the sandbox init");
        }
        tracing::info!(id = %spec.id, pid, ?service_pid, binary = %p.binary.display(), "sandboxed instance started");
        Ok(ProcessHandle {
            id: spec.id.clone(),
            pid: pid as u32,
            service_pid,
            watch,
            cgroup,
            console,
            control: spec.control_socket.clone(),
            ports: spec.ports.clone(),
        })
    }
}

impl Backend for ProcessBackend {
    fn start(&self, spec: &InstanceSpec) -> Result<Box<dyn InstanceHandle>, VmmError> {
        spec.validate()?;
        let Payload::Process(p) = &spec.payload else {
            return Err(VmmError::WrongPayload {
                backend: BackendKind::Process,
                payload: "vm",
            });
        };
        Ok(Box::new(self.launch(spec, p)?))
    }

    fn kind(&self) -> BackendKind {
        BackendKind::Process
    }
}

/// The first child of `pid`'s main thread, from `/proc`.
fn first_child(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A running sandboxed process.
#[derive(Debug)]
pub struct ProcessHandle {
    id: String,
    /// The sandbox's init (PID 1 inside).
    pid: u32,
    /// The payload (PID 2 inside), if found.
    service_pid: Option<u32>,
    watch: ExitWatch,
    cgroup: Option<InstanceCgroup>,
    console: PathBuf,
    control: PathBuf,
    ports: Vec<PortForward>,
}

impl ProcessHandle {
    /// The instance cgroup, if one was created.
    pub fn cgroup(&self) -> Option<&InstanceCgroup> {
        self.cgroup.as_ref()
    }

    fn send(&self, sig: Signal) -> Result<bool, VmmError> {
        self.watch
            .signal(sig)
            .map_err(|e| VmmError::io(format!("sending {sig} to pid {}", self.pid), e))
    }
}

impl Watched for ProcessHandle {
    fn watched_id(&self) -> &str {
        &self.id
    }

    fn watch(&self) -> &ExitWatch {
        &self.watch
    }

    fn cleanup(&mut self) -> Result<(), VmmError> {
        if let Some(cg) = self.cgroup.as_mut() {
            cg.remove()?;
        }
        let _ = remove_stale_socket(&self.control);
        Ok(())
    }
}

impl InstanceHandle for ProcessHandle {
    fn id(&self) -> &str {
        &self.id
    }

    fn pid(&self) -> Option<u32> {
        match self.watch.get() {
            None => Some(self.pid),
            Some(_) => None,
        }
    }

    fn service_pid(&self) -> Option<u32> {
        match self.watch.get() {
            None => self.service_pid.or(Some(self.pid)),
            Some(_) => None,
        }
    }

    fn status(&mut self) -> InstanceStatus {
        self.watched_status()
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitInfo>, VmmError> {
        self.watched_wait_timeout(timeout)
    }

    fn exit_watch(&self) -> ExitWatch {
        self.watch.clone()
    }

    fn stop(&mut self, grace: Duration) -> Result<ExitInfo, VmmError> {
        if let Some(e) = self.watch.get() {
            return self.finish(e);
        }
        self.send(Signal::SIGTERM)?;
        if let Some(e) = self.watch.wait_timeout(grace) {
            tracing::info!(id = %self.id, %e, "instance stopped gracefully");
            return self.finish(e);
        }
        tracing::warn!(id = %self.id, ?grace, "instance ignored SIGTERM, killing it");
        self.kill()
    }

    fn kill(&mut self) -> Result<ExitInfo, VmmError> {
        self.send(Signal::SIGKILL)?;
        match self.watch.wait_timeout(KILL_WAIT) {
            Some(e) => self.finish(e),
            None => Err(VmmError::Timeout(
                KILL_WAIT,
                "the instance to die after SIGKILL",
            )),
        }
    }

    fn control_endpoint(&self) -> ControlEndpoint {
        ControlEndpoint::Unix(self.control.clone())
    }

    fn console_log(&self) -> &Path {
        &self.console
    }

    fn info(&self) -> InstanceInfo {
        InstanceInfo {
            id: self.id.clone(),
            backend: BackendKind::Process,
            pid: self.pid(),
            kernel_release: None,
            accel: None,
            guest_control_device: None,
            control: self.control_endpoint(),
            qmp_socket: None,
            console_log: self.console.clone(),
            ports: self.ports.clone(),
            cgroups: self
                .cgroup
                .as_ref()
                .map(|c| c.dirs().to_vec())
                .unwrap_or_default(),
        }
    }
}

impl Drop for ProcessHandle {
    fn drop(&mut self) {
        if self.watch.get().is_none() {
            tracing::warn!(id = %self.id, pid = self.pid, "handle dropped while running, killing the instance");
            if let Err(e) = self.kill() {
                tracing::warn!(id = %self.id, error = %e, "kill on drop failed");
            }
        } else if let Err(e) = self.cleanup() {
            tracing::warn!(id = %self.id, error = %e, "cleanup on drop failed");
        }
    }
}
