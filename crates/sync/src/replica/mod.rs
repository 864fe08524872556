//! The replica handle: roles, apply, standby attach, follow, fencing, switchover.

mod follow;

pub use follow::{
    serve, AckToken, Batch, Durability, FollowHandle, Replica, ReplicaConfig, Role, ServeHandle,
    StandbyStatus, Status,
};
