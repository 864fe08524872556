//! Domain model: the pair, its appliances, the instances they run, image versions and the
//! control epoch used as a fencing token.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A software version of the appliance OS image, `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
    /// Patch number.
    pub patch: u32,
}

impl Version {
    /// Builds a version from its three numbers.
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Error returned when a version string is not `major.minor.patch`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("version {0:?} is not of the form major.minor.patch with decimal numbers")]
pub struct ParseVersionError(pub String);

impl FromStr for Version {
    type Err = ParseVersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseVersionError(s.to_string());
        let mut parts = s.trim().split('.');
        let mut next = || -> Result<u32, ParseVersionError> {
            let p = parts.next().ok_or_else(err)?;
            if p.is_empty() || p.len() > 9 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err());
            }
            p.parse().map_err(|_| err())
        };
        let v = Version::new(next()?, next()?, next()?);
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(v)
    }
}

/// A reference to an OS image: its name and version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageRef {
    /// Image name (for example `appliance-os`).
    pub name: String,
    /// Image version.
    pub version: Version,
}

impl ImageRef {
    /// Builds an image reference.
    pub fn new(name: impl Into<String>, version: Version) -> Self {
        Self {
            name: name.into(),
            version,
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.version)
    }
}

/// One of the two appliances (hosts) of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplianceId {
    /// The primary appliance.
    Primary,
    /// The secondary appliance.
    Secondary,
}

impl ApplianceId {
    /// Both appliances, primary first.
    pub const ALL: [ApplianceId; 2] = [ApplianceId::Primary, ApplianceId::Secondary];

    /// The peer appliance.
    pub fn other(self) -> Self {
        match self {
            ApplianceId::Primary => ApplianceId::Secondary,
            ApplianceId::Secondary => ApplianceId::Primary,
        }
    }

    /// Lower-case name (`primary` / `secondary`).
    pub fn name(self) -> &'static str {
        match self {
            ApplianceId::Primary => "primary",
            ApplianceId::Secondary => "secondary",
        }
    }
}

impl fmt::Display for ApplianceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Identifier of an instance. Identifiers are never reused within a pair, so a command naming
/// an instance can always be re-executed safely.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InstanceId(pub u64);

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "i{}", self.0)
    }
}

/// Lifecycle state of an instance as the engine knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    /// `StartInstance` issued, not yet confirmed.
    Starting,
    /// Started (or in control); not attached as a standby.
    Running,
    /// Attached as a standby; bulk sync or catch-up in progress.
    Syncing,
    /// Standby holding sufficient state: bulk done, lag bounded, digest verified.
    Ready,
    /// Crashed, failed to start, lost with its appliance or fenced.
    Failed,
    /// `StopInstance` issued, not yet confirmed.
    Stopping,
    /// Stopped; holds no state.
    Stopped,
}

impl InstanceState {
    /// Whether the instance is (or may be) running and consuming a slot on its appliance.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            InstanceState::Starting
                | InstanceState::Running
                | InstanceState::Syncing
                | InstanceState::Ready
                | InstanceState::Stopping
        )
    }

    /// Whether the instance is up and usable (started and not being stopped).
    pub fn is_up(self) -> bool {
        matches!(
            self,
            InstanceState::Running | InstanceState::Syncing | InstanceState::Ready
        )
    }
}

/// Role of an instance in the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Serves clients; exactly one per control epoch.
    InControl,
    /// Synchronous standby: every acknowledged write is applied on it before the
    /// acknowledgement, so it is a safe unplanned-failover target once `Ready`.
    HaStandby,
    /// Asynchronous standby (lag bounded): promoted only by a planned switchover that drains.
    LocalStandby,
    /// Not attached to the instance in control.
    Spare,
}

pub use hitless_epoch::ControlEpoch;

/// One instance of the appliance OS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Identifier, unique for the life of the pair.
    pub id: InstanceId,
    /// Appliance the instance runs on.
    pub appliance: ApplianceId,
    /// Image (and so version) the instance runs.
    pub image: ImageRef,
    /// Lifecycle state.
    pub state: InstanceState,
    /// Role in the pair.
    pub role: Role,
    /// Last sequence number reported applied (from sync progress or readiness).
    pub applied_seq: u64,
    /// Last reported replication lag in mutations.
    pub lag: u64,
    /// Sequence number at which the standby's digest was last verified.
    pub verified_seq: Option<u64>,
    /// How many times this standby has been re-attached after falling out of sync.
    pub resyncs: u32,
}

impl Instance {
    /// A new instance in the given state and role.
    pub fn new(
        id: InstanceId,
        appliance: ApplianceId,
        image: ImageRef,
        state: InstanceState,
        role: Role,
    ) -> Self {
        Self {
            id,
            appliance,
            image,
            state,
            role,
            applied_seq: 0,
            lag: 0,
            verified_seq: None,
            resyncs: 0,
        }
    }

    /// The version the instance runs.
    pub fn version(&self) -> Version {
        self.image.version
    }

    /// Whether this is a standby (HA or local) holding sufficient state.
    pub fn is_ready_standby(&self) -> bool {
        self.state == InstanceState::Ready
            && matches!(self.role, Role::HaStandby | Role::LocalStandby)
    }
}

/// The pair: both appliances, every instance ever started, the control epoch and the instance
/// in control.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pair {
    /// Instance table, ordered by id.
    pub instances: Vec<Instance>,
    /// Current control epoch.
    pub epoch: ControlEpoch,
    /// Instance in control, if any.
    pub in_control: Option<InstanceId>,
    /// Whether the primary appliance is reachable and healthy.
    pub primary_up: bool,
    /// Whether the secondary appliance is reachable and healthy.
    pub secondary_up: bool,
}

impl Pair {
    /// The usual steady layout: `active` in control on the primary appliance, `standby` its
    /// in-sync HA standby on the secondary, both on `image`, at `epoch`.
    pub fn steady(
        image: ImageRef,
        active: InstanceId,
        standby: InstanceId,
        epoch: ControlEpoch,
    ) -> Self {
        Self {
            instances: vec![
                Instance::new(
                    active,
                    ApplianceId::Primary,
                    image.clone(),
                    InstanceState::Running,
                    Role::InControl,
                ),
                Instance::new(
                    standby,
                    ApplianceId::Secondary,
                    image,
                    InstanceState::Ready,
                    Role::HaStandby,
                ),
            ],
            epoch,
            in_control: Some(active),
            primary_up: true,
            secondary_up: true,
        }
    }

    /// Looks an instance up.
    pub fn get(&self, id: InstanceId) -> Option<&Instance> {
        self.instances.iter().find(|i| i.id == id)
    }

    /// Looks an instance up, mutably.
    pub fn get_mut(&mut self, id: InstanceId) -> Option<&mut Instance> {
        self.instances.iter_mut().find(|i| i.id == id)
    }

    /// The instance in control, if it is still up.
    pub fn control(&self) -> Option<&Instance> {
        self.in_control
            .and_then(|id| self.get(id))
            .filter(|i| i.state.is_up())
    }

    /// Whether an appliance is up.
    pub fn is_up(&self, a: ApplianceId) -> bool {
        match a {
            ApplianceId::Primary => self.primary_up,
            ApplianceId::Secondary => self.secondary_up,
        }
    }

    /// Sets an appliance's health.
    pub fn set_up(&mut self, a: ApplianceId, up: bool) {
        match a {
            ApplianceId::Primary => self.primary_up = up,
            ApplianceId::Secondary => self.secondary_up = up,
        }
    }

    /// Live instances on an appliance.
    pub fn live_on(&self, a: ApplianceId) -> impl Iterator<Item = &Instance> {
        self.instances
            .iter()
            .filter(move |i| i.appliance == a && i.state.is_live())
    }

    /// Whether an appliance's live instances run more than one version.
    pub fn is_mixed(&self, a: ApplianceId) -> bool {
        let mut it = self.live_on(a).map(|i| i.version());
        match it.next() {
            Some(first) => it.any(|v| v != first),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_parses_and_prints() {
        let v: Version = "1.20.3".parse().unwrap();
        assert_eq!(v, Version::new(1, 20, 3));
        assert_eq!(v.to_string(), "1.20.3");
        for bad in [
            "", "1", "1.2", "1.2.3.4", "a.b.c", "1..3", "-1.2.3", "1.2.3 x",
        ] {
            assert!(bad.parse::<Version>().is_err(), "{bad}");
        }
    }

    #[test]
    fn steady_pair_has_control_and_ha_standby() {
        let img = ImageRef::new("os", Version::new(1, 0, 0));
        let p = Pair::steady(img, InstanceId(1), InstanceId(2), ControlEpoch(1));
        assert_eq!(p.control().unwrap().id, InstanceId(1));
        assert!(p.get(InstanceId(2)).unwrap().is_ready_standby());
        assert!(!p.is_mixed(ApplianceId::Primary));
        let json = serde_json::to_string(&p).unwrap();
        let back: Pair = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
    }
}
