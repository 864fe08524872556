//! Exit notification for instance processes.
//!
//! A reaper thread per instance blocks in `waitid(WEXITED | WNOWAIT)`, which
//! reports the exit *without* reaping. Only then does it take the state lock,
//! reap the child and publish the [`ExitInfo`]. Signals are sent under the
//! same lock and only while no exit has been published, so a signal can never
//! reach a recycled pid: until the reaper holds the lock the pid is at worst a
//! zombie that still belongs to us.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::ExitInfo;

#[derive(Debug, Default)]
struct State {
    exit: Option<ExitInfo>,
}

/// A cloneable view of one instance process's exit.
#[derive(Debug, Clone)]
pub struct ExitWatch {
    pid: i32,
    inner: Arc<(Mutex<State>, Condvar)>,
}

impl ExitWatch {
    /// Starts the reaper thread for `pid`, which must be a child of this
    /// process that nothing else waits for.
    pub(crate) fn spawn(pid: i32) -> std::io::Result<ExitWatch> {
        let watch = ExitWatch {
            pid,
            inner: Arc::new((Mutex::new(State::default()), Condvar::new())),
        };
        let w = watch.clone();
        std::thread::Builder::new()
            .name(format!("reap-{pid}"))
            .spawn(move || w.reap())?;
        Ok(watch)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere; the state stays valid.
        self.inner.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reap(&self) {
        let pid = Pid::from_raw(self.pid);
        // Wait without reaping; the loop is bounded by the child's lifetime
        // and only repeats on EINTR.
        while let Err(Errno::EINTR) =
            waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT)
        {}
        let mut st = self.lock();
        let info = loop {
            match waitpid(pid, None) {
                Ok(WaitStatus::Exited(_, code)) => break ExitInfo::Code(code),
                Ok(WaitStatus::Signaled(_, sig, _)) => break ExitInfo::Signal(sig as i32),
                Err(Errno::EINTR) => continue,
                Ok(other) => {
                    tracing::warn!(pid = self.pid, ?other, "unexpected wait status");
                    continue;
                }
                Err(e) => {
                    // ECHILD: someone else reaped it; report an unknown code.
                    tracing::warn!(pid = self.pid, error = %e, "child could not be reaped");
                    break ExitInfo::Code(-1);
                }
            }
        };
        tracing::debug!(pid = self.pid, %info, "instance process ended");
        st.exit = Some(info);
        drop(st);
        self.inner.1.notify_all();
    }

    /// The pid being watched.
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// The exit, if it happened.
    pub fn get(&self) -> Option<ExitInfo> {
        self.lock().exit
    }

    /// Waits up to `timeout` for the exit.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitInfo> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if let Some(e) = st.exit {
                return Some(e);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            st = self
                .inner
                .1
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Sends `sig` if the process has not been reaped yet. Returns whether it
    /// was sent.
    pub(crate) fn signal(&self, sig: Signal) -> std::io::Result<bool> {
        let st = self.lock();
        if st.exit.is_some() {
            return Ok(false);
        }
        match kill(Pid::from_raw(self.pid), sig) {
            Ok(()) => Ok(true),
            Err(Errno::ESRCH) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    #[allow(clippy::zombie_processes)] // the ExitWatch reaps them
    fn reports_exit_code_and_signal() {
        let c = Command::new("/bin/sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        let w = ExitWatch::spawn(c.id() as i32).unwrap();
        assert_eq!(
            w.wait_timeout(Duration::from_secs(10)),
            Some(ExitInfo::Code(7))
        );

        let c = Command::new("/bin/sleep").arg("30").spawn().unwrap();
        let w = ExitWatch::spawn(c.id() as i32).unwrap();
        assert_eq!(w.wait_timeout(Duration::from_millis(50)), None);
        assert!(w.signal(Signal::SIGKILL).unwrap());
        assert_eq!(
            w.wait_timeout(Duration::from_secs(10)),
            Some(ExitInfo::Signal(9))
        );
        // No signal goes out after the reap.
        assert!(!w.signal(Signal::SIGKILL).unwrap());
    }
}
