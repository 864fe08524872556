//! hitless-agent: the appliance daemon.
//!
//! It runs instances through a hypervisor backend, drives the ISSU engine (hitless-core) by
//! executing its commands and feeding it observations, keeps the engine's journal on disk
//! and mirrored to the peer appliance, links to the peer agent with heartbeats, serves the
//! HTTP API used by the CLI, and serves the device's service address (the front).

pub mod api;
pub mod appliance;
pub mod auth;
pub mod config;
pub mod daemon;
pub mod driver;
pub mod epoch;
pub mod framing;
pub mod front;
pub mod images;
pub mod lease;
pub mod peer;
pub mod plan;
pub mod remote;
pub mod resp;
pub mod witness;

pub use config::AgentConfig;
pub use daemon::run;
