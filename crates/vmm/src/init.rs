//! The minimal init that runs as PID 1 of every process sandbox.
//!
//! # Why
//!
//! The kernel drops every signal sent to the init of a PID namespace unless that process
//! installed a handler for it (SIGKILL and SIGSTOP from an ancestor namespace excepted). A
//! service that is PID 1 and never installed a SIGTERM handler (a shell script, `sleep`, most
//! programs that rely on the default action) therefore ignores the agent's graceful stop and
//! is SIGKILLed once the grace runs out. Whether an instance stops gracefully must not depend
//! on the service, so the service never runs as PID 1.
//!
//! # What it does
//!
//! Like `tini`, the sandbox's PID 1:
//!
//! * forks the service as its only child (the child execs the payload);
//! * forwards SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 to it (the service then sees them
//!   with their ordinary default actions, as any non-init process does);
//! * reaps every zombie of the namespace (orphans are reparented to PID 1);
//! * exits as soon as the service exits, with the service's status: its exit code, or
//!   `128 + signal` when a signal ended it (PID 1 cannot end itself by a signal, as a shell
//!   reports it). The kernel then kills whatever else is left in the namespace.
//!
//! SIGKILL from the agent still ends the whole sandbox at once: it is sent to PID 1, whose
//! death takes the namespace down.
//!
//! # How
//!
//! The init is a function run in the cloned child between the sandbox setup and the `execve`
//! of the payload, not a separate program re-executed in a hidden mode: a re-exec would
//! depend on the embedding binary (the agent, a test harness) handling that mode, and would
//! add a second exec that can fail. The function runs in a single-threaded copy of the agent
//! and makes only async-signal-safe system calls (`sigaction`, `sigprocmask`, a raw `clone`
//! that forks without libc's atfork handlers and locks,
//! `close_range`/`close`, `sigwaitinfo`, `kill`, `waitpid`, `prctl`, `_exit`); it never
//! allocates or takes a lock. Right after the fork it closes every inherited descriptor but
//! stdin, stdout and stderr: a copy of the agent that never execs would otherwise keep the
//! agent's listening sockets, peer connections and files open for the lifetime of the
//! instance.
//!
//! The cost of not exec'ing: PID 1 keeps a copy-on-write image of the agent's memory as it was
//! at the clone. The pages are shared with the agent and copied for neither side until one
//! writes them, but a page the agent later changes or frees stays with the init, so each
//! instance may pin up to the agent's resident memory at its start (charged to the agent's
//! cgroup, not the instance's). A small init program exec'd in place (the agent's binary in a
//! hidden mode) would avoid it, at the price of depending on the binary that embeds this crate.
//!
//! The forwarded signals and SIGCHLD are blocked and taken with `sigwaitinfo`; they also get
//! a no-op handler, so the PID-1 rule can never discard them whatever their blocked state. The
//! child restores default dispositions and an empty signal mask before it execs.

/// Signals PID 1 forwards to the service.
pub const FORWARDED_SIGNALS: [libc::c_int; 5] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Name PID 1 shows in `/proc/1/comm` (at most 15 bytes and a NUL).
const INIT_NAME: &core::ffi::CStr = c"hitless-init";

extern "C" fn noop(_: libc::c_int) {}

/// Sets the disposition of every forwarded signal and SIGCHLD. Async-signal-safe.
///
/// # Safety
/// Only async-signal-safe calls; `handler` must be `SIG_DFL` or a valid handler.
unsafe fn set_handlers(handler: libc::sighandler_t) -> bool {
    for sig in FORWARDED_SIGNALS.into_iter().chain([libc::SIGCHLD]) {
        // SAFETY: a zeroed sigaction is a valid value (empty mask, no flags); sigaction is
        // a system call wrapper on a stack value.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler;
            sa.sa_flags = if sig == libc::SIGCHLD {
                libc::SA_NOCLDSTOP
            } else {
                0
            };
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                return false;
            }
        }
    }
    true
}

/// The exit status PID 1 reports for the service's wait status.
pub fn exit_code(status: libc::c_int) -> libc::c_int {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        // Not an exit (waitpid is called without WUNTRACED): report a generic failure.
        1
    }
}

/// Closes every descriptor from 3 up. Async-signal-safe.
///
/// # Safety
/// Only async-signal-safe calls.
unsafe fn close_from_3() {
    // SAFETY: raw system calls on integers.
    unsafe {
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) == 0 {
            return;
        }
        // Kernels before 5.9: close one by one up to the descriptor limit (bounded).
        let mut lim: libc::rlimit = std::mem::zeroed();
        let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur.min(1 << 20) as libc::c_int
        } else {
            1 << 16
        };
        for fd in 3..max {
            libc::close(fd);
        }
    }
}

/// Why [`run`] could not start the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InitFailure {
    /// Installing handlers or the signal mask failed.
    Signals,
    /// `fork` failed.
    Fork,
}

/// Runs PID 1 of a sandbox: forks, runs `exec_child` in the child (which must exec the
/// payload or exit; if it returns, the child exits with 127), and supervises it until it exits; never returns on success. Returns the
/// failure (with `errno` set) if the service could not be started, so the caller can report
/// it while the launch pipe is still open.
///
/// # Safety
/// Must be called in a single-threaded process (the cloned sandbox child) that will never
/// return to the Rust runtime; `exec_child` must itself only make async-signal-safe calls.
pub(crate) unsafe fn run(exec_child: impl FnOnce()) -> InitFailure {
    // SAFETY: every call is a plain async-signal-safe system call wrapper on values on this
    // stack; the process is single-threaded (see the function's contract).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in FORWARDED_SIGNALS.into_iter().chain([libc::SIGCHLD]) {
            libc::sigaddset(&mut set, sig);
        }
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return InitFailure::Signals;
        }
        if !set_handlers(noop as extern "C" fn(libc::c_int) as libc::sighandler_t) {
            return InitFailure::Signals;
        }
        // The raw system call, not libc's fork(): that runs the atfork handlers and takes
        // the allocator's locks, which another thread of the agent may have held at the
        // moment of the clone; in this copy nobody would ever release them.
        let child = libc::syscall(
            libc::SYS_clone,
            libc::SIGCHLD as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        ) as libc::pid_t;
        if child < 0 {
            return InitFailure::Fork;
        }
        if child == 0 {
            // The service: default dispositions, then an empty mask, then exec. Resetting the
            // handlers first means a signal that arrives in between is not lost in `noop`.
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            if !set_handlers(libc::SIG_DFL)
                || libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0
            {
                libc::_exit(127);
            }
            exec_child();
            libc::_exit(127);
        }
        close_from_3();
        libc::prctl(
            libc::PR_SET_NAME,
            INIT_NAME.as_ptr() as libc::c_ulong,
            0,
            0,
            0,
        );
        supervise(child, &set)
    }
}

/// PID 1's loop: forwards signals to `child`, reaps zombies, exits with `child`'s status.
///
/// # Safety
/// As [`run`].
unsafe fn supervise(child: libc::pid_t, set: &libc::sigset_t) -> ! {
    // SAFETY: async-signal-safe system calls on values on this stack. The loop blocks in
    // sigwaitinfo and ends when the child exits (it cannot outlive PID 1's namespace).
    unsafe {
        loop {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let sig = libc::sigwaitinfo(set, &mut info);
            if sig < 0 {
                // EINTR (a signal outside the set): wait again.
                continue;
            }
            if sig != libc::SIGCHLD {
                libc::kill(child, sig);
                continue;
            }
            // SIGCHLD coalesces: reap everything that has ended.
            loop {
                let mut status: libc::c_int = 0;
                let pid = libc::waitpid(-1, &mut status, libc::WNOHANG);
                if pid == child {
                    libc::_exit(exit_code(status));
                }
                if pid <= 0 {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_follows_the_shell_convention() {
        // Wait statuses as the kernel encodes them.
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(0), 0);
        assert_eq!(exit_code(libc::SIGTERM), 128 + libc::SIGTERM);
        assert_eq!(exit_code(libc::SIGKILL | 0x80), 128 + libc::SIGKILL);
    }
}
