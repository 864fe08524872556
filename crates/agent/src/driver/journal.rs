//! The driver's journal: every transition is written, with immediate durability, and
//! mirrored to the peer agent before its commands run; a driver taking over restores the
//! engine from it.

use hitless_core::{Command, Engine, EngineError, Event, InstanceId};
use thiserror::Error;
use tracing::{debug, info};

use super::{now_ms, Driver, Transition};

/// Errors of the driver's journal.
#[derive(Debug, Error)]
pub enum JournalError {
    /// A transition could not be written: its commands are not executed.
    #[error("the journal refused a write; not executing: {0}")]
    Write(#[source] hitless_journal::JournalError),
    /// The journal's last record could not be read.
    #[error("the journal's last record cannot be read: {0}")]
    Read(#[source] hitless_journal::JournalError),
    /// The engine state the journal holds is not one the engine accepts.
    #[error("the engine cannot be restored from the journal: {0}")]
    Restore(#[source] EngineError),
}

impl Driver {
    /// Takes over driving from the journal (the previous driver's appliance was lost, or this
    /// agent restarted). Returns false if the journal holds no state.
    pub fn restore(&mut self) -> Result<bool, JournalError> {
        let last = self.journal.last().map_err(JournalError::Read)?;
        let Some((index, t)) = last else {
            return Ok(false);
        };
        let mut state = t.state;
        // Whether control changes go through a witness is this agent's configuration.
        state.config.witness = self.engine_config.witness;
        let engine = Engine::restore(state).map_err(JournalError::Restore)?;
        info!(index, "engine restored from the journal");
        self.instances = t.instances;
        // A witness change the journal's engine waited for is asked again now, not at the
        // next tick: a failover waits for the answer.
        let ask = engine.witness_in_flight();
        self.engine = Some(engine);
        if let Some(c) = ask {
            self.execute(vec![c]);
        }
        self.publish();
        Ok(true)
    }

    /// After this agent restarted while driving: its own instances died with it (instances
    /// share their agent's fate), so report them failed, then re-execute the commands the
    /// engine was waiting for (they are idempotent).
    pub fn resume_after_restart(&mut self) -> Result<(), JournalError> {
        let Some(engine) = self.engine.as_ref() else {
            return Ok(());
        };
        let mine: Vec<InstanceId> = engine
            .state()
            .pair
            .instances
            .iter()
            .filter(|i| i.appliance == self.me && i.state.is_live())
            .map(|i| i.id)
            .collect();
        let again = engine.in_flight_commands();
        self.execute(again);
        for instance in mine {
            self.feed(Event::InstanceFailed {
                instance,
                reason: "its agent restarted".into(),
            })?;
        }
        Ok(())
    }

    /// Feeds one event to the engine, journals the transition and executes the commands.
    pub fn feed(&mut self, event: Event) -> Result<(), JournalError> {
        let Some(engine) = self.engine.as_mut() else {
            debug!(?event, "not driving; event ignored");
            return Ok(());
        };
        let commands = engine.handle(event.clone());
        let quiet_tick = matches!(event, Event::Tick) && commands.is_empty();
        if !quiet_tick {
            self.record(Some(event), commands.clone())?;
        }
        self.execute(commands);
        self.publish();
        Ok(())
    }

    pub(super) fn record(
        &mut self,
        event: Option<Event>,
        commands: Vec<Command>,
    ) -> Result<(), JournalError> {
        let state = self
            .engine
            .as_ref()
            .expect("recording while driving")
            .snapshot();
        let t = Transition {
            at_unix_ms: now_ms(),
            event,
            state,
            commands,
            instances: self.instances.clone(),
        };
        let index = self.journal.append(&t).map_err(JournalError::Write)?;
        // Mirror to the peer (its agent imports it into its own journal).
        if let Ok(batch) = self.journal.export_batch(index, 1) {
            for (i, env) in batch {
                self.apps.remote.mirror(i, env);
            }
        }
        if index % 512 == 0 && index > 1024 {
            let _ = self.journal.compact(index - 1024);
        }
        Ok(())
    }

    /// Sends the latest record, which holds the whole engine state, to the peer's mirror.
    pub(super) fn mirror_latest(&self) {
        let last = self.journal.next_index().saturating_sub(1);
        if let Ok(batch) = self.journal.export_batch(last, 1) {
            for (i, env) in batch {
                self.apps.remote.mirror(i, env);
            }
        }
    }
}
