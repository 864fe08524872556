//! The builtin witness: the `hitless witness` daemon and its client.
//!
//! * [`frame`]: the checked frames of the protocol;
//! * [`wire`]: its messages and their limits;
//! * [`store`]: the records on disk;
//! * [`server`]: the daemon;
//! * [`client`]: [`BuiltinWitness`], the [`crate::Witness`] it serves.

pub mod client;
pub mod frame;
pub mod server;
pub mod store;
pub mod wire;

pub use client::BuiltinWitness;
pub use server::{run, serve, ServeError, Server, ServerConfig, DEFAULT_LEASE_MAX};
pub use store::StoreError;
pub use wire::{Request, Response, WireError};
