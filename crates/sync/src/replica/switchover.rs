//! Planned switchover, demotion and fencing.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{not_active, Link, LinkState, Replica, Role};
use crate::wire::Control;
use crate::{Epoch, SyncError};

impl Replica {
    /// Planned switchover to the attached standby `target`: quiesce, drain
    /// until it applied the last sequence, promote it at epoch + 1 and demote
    /// this instance to a detached standby at the new epoch (it then
    /// acknowledges nothing; mutations held by the quiesce fail with
    /// [`SyncError::NotActive`] and were never applied). Returns the new
    /// epoch. If draining fails, the quiesce is released and this instance
    /// stays active. To keep the old instance as a warm fallback, make it
    /// [`Replica::follow`] the new active afterwards.
    pub fn switchover(&self, target: &str, timeout: Duration) -> Result<Epoch, SyncError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.state();
        if st.role != Role::Active {
            return Err(not_active(&st));
        }
        if !st
            .links
            .iter()
            .any(|l| l.link.node == target && l.bulk_done)
        {
            return Err(SyncError::NoSuchStandby(target.into()));
        }
        st.quiesced = true;
        let last = st.seq;
        // Drain.
        loop {
            let l = st
                .links
                .iter()
                .find(|l| l.link.node == target && !l.link.core.is_closed());
            match l {
                None => {
                    st.quiesced = false;
                    drop(st);
                    self.inner.cond.notify_all();
                    return Err(SyncError::NoSuchStandby(target.into()));
                }
                Some(l) if l.acked >= last => break,
                Some(_) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                st.quiesced = false;
                drop(st);
                self.inner.cond.notify_all();
                return Err(SyncError::Timeout(
                    timeout,
                    "the switchover target to drain",
                ));
            }
            st = self
                .inner
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        // Point of no return: demote first, so nothing more is acknowledged here.
        let new_epoch = st.epoch.next();
        st.role = Role::Standby;
        st.set_epoch(new_epoch);
        st.quiesced = false;
        let link = st
            .links
            .iter()
            .find(|l| l.link.node == target)
            .map(|l| l.link.clone())
            .expect("checked above");
        let others: Vec<Arc<Link>> = st
            .links
            .iter()
            .filter(|l| l.link.id != link.id)
            .map(|l| l.link.clone())
            .collect();
        drop(st);
        self.inner.cond.notify_all();
        for o in others {
            o.core.close();
        }
        let promote = Control::Promote { last_seq: last }.encode(new_epoch, last);
        link.push(&promote, usize::MAX);
        link.flush();
        let mut st = self.state();
        let result = loop {
            if link.promoted.load(Ordering::SeqCst) == new_epoch.0 {
                break Ok(new_epoch);
            }
            if !st.links.iter().any(|l| l.link.id == link.id) {
                break Err(SyncError::Protocol(
                    "the switchover target closed the link before confirming its promotion".into(),
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(SyncError::Timeout(
                    timeout,
                    "the switchover target to confirm its promotion",
                ));
            }
            st = self
                .inner
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        let all: Vec<LinkState> = st.links.drain(..).collect();
        drop(st);
        for l in all {
            l.link.core.close();
        }
        info!(
            service = self.inner.schema.service(),
            target,
            epoch = new_epoch.0,
            ok = result.is_ok(),
            "switchover"
        );
        self.notify_role(Role::Standby, new_epoch);
        result
    }

    /// Active: steps down to a detached standby (links closed, nothing more
    /// acknowledged), e.g. when the control plane moves control elsewhere.
    pub fn demote(&self) -> Result<(), SyncError> {
        let mut st = self.state();
        if st.role != Role::Active && st.role != Role::Fenced {
            return Err(not_active(&st));
        }
        st.role = Role::Standby;
        st.quiesced = false;
        let links: Vec<LinkState> = st.links.drain(..).collect();
        let epoch = st.epoch;
        drop(st);
        for l in links {
            l.link.core.close();
        }
        self.inner.cond.notify_all();
        self.notify_role(Role::Standby, epoch);
        Ok(())
    }

    /// Tells this instance that `epoch` exists. If it is newer than the
    /// instance's own epoch, an active becomes fenced and a standby records it
    /// (frames of older epochs are then rejected).
    pub fn fence(&self, epoch: Epoch) {
        let mut st = self.state();
        if epoch <= st.epoch {
            return;
        }
        st.set_epoch(epoch);
        let was_active = st.role == Role::Active;
        if was_active {
            st.role = Role::Fenced;
            st.quiesced = false;
        }
        let links: Vec<LinkState> = st.links.drain(..).collect();
        drop(st);
        for l in links {
            l.link.core.close();
        }
        self.inner.cond.notify_all();
        if was_active {
            warn!(
                service = self.inner.schema.service(),
                epoch = epoch.0,
                "fenced by a newer epoch"
            );
            self.notify_role(Role::Fenced, epoch);
        }
    }
}
