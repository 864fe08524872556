//! hitless-core: the domain model of an appliance pair, the sans-IO ISSU engine with its
//! steady-state HA policy, the invariants every transition must keep, and a deterministic
//! simulator of a pair driven by the engine.
//!
//! The crate performs no I/O, reads no clock and uses no randomness outside the simulator's
//! seeded generator: every run is a pure function of its inputs.

pub mod domain;
pub mod engine;
pub mod invariants;
pub mod sim;
pub mod witness;

pub use domain::{
    ApplianceId, ControlEpoch, ImageRef, Instance, InstanceId, InstanceState, Pair, Role, Version,
};
pub use engine::{
    Command, CompatVerdict, Engine, EngineConfig, EngineError, EngineState, Event, Outcome, Report,
    Status, Step, Stuck, RESUME_COMMANDS,
};
pub use witness::{Versioned, WitnessChange, WitnessRecord, WitnessRefusal};
