//! ISSU steps: their order, names and operator-facing descriptions.

use serde::{Deserialize, Serialize};

/// Steps of the ISSU. See the module documentation for how they map to the procedure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Procedure step 1.
    Precheck,
    /// Procedure step 2: start extra N instances.
    StartExtras,
    /// Procedure step 2: sync them.
    SyncExtras,
    /// Procedure step 3: replace A's extra with N+1.
    PrimaryStartNew,
    /// Procedure step 3: sync N+1 to sufficient state.
    PrimarySyncNew,
    /// Procedure step 3: planned switch of control to N+1.
    PrimarySwitch,
    /// Procedure step 3/4: soak, N+1 in control, old N still running on A.
    PrimaryMixed,
    /// Procedure step 3: replace the old N on A with N+1.
    PrimaryUpgradeOld,
    /// Procedure step 3: sync it as A's local standby.
    PrimarySyncOld,
    /// Procedure step 5: replace B's extra with N+1.
    SecondaryStartNew,
    /// Procedure step 5: sync it.
    SecondarySyncNew,
    /// Procedure step 5: make it the synchronous HA standby, demote B's old N.
    SecondarySwitch,
    /// Procedure step 5: soak with mixed versions on B.
    SecondaryMixed,
    /// Procedure step 5: replace B's old N with N+1.
    SecondaryUpgradeOld,
    /// Procedure step 5: sync it.
    SecondarySyncOld,
    /// Procedure step 6: stop the extra instances.
    Retire,
    /// Procedure step 6: wait for the operator's commit (or the rollback timer).
    AwaitCommit,
    /// Converging back to N with an HA standby.
    Rollback,
}

impl Step {
    /// The forward steps in order.
    pub const FORWARD: [Step; 17] = [
        Step::Precheck,
        Step::StartExtras,
        Step::SyncExtras,
        Step::PrimaryStartNew,
        Step::PrimarySyncNew,
        Step::PrimarySwitch,
        Step::PrimaryMixed,
        Step::PrimaryUpgradeOld,
        Step::PrimarySyncOld,
        Step::SecondaryStartNew,
        Step::SecondarySyncNew,
        Step::SecondarySwitch,
        Step::SecondaryMixed,
        Step::SecondaryUpgradeOld,
        Step::SecondarySyncOld,
        Step::Retire,
        Step::AwaitCommit,
    ];

    /// Kebab-case name used in reports, status and fault specifications.
    pub fn name(self) -> &'static str {
        match self {
            Step::Precheck => "precheck",
            Step::StartExtras => "start-extras",
            Step::SyncExtras => "sync-extras",
            Step::PrimaryStartNew => "primary-start-new",
            Step::PrimarySyncNew => "primary-sync-new",
            Step::PrimarySwitch => "primary-switch",
            Step::PrimaryMixed => "primary-mixed",
            Step::PrimaryUpgradeOld => "primary-upgrade-old",
            Step::PrimarySyncOld => "primary-sync-old",
            Step::SecondaryStartNew => "secondary-start-new",
            Step::SecondarySyncNew => "secondary-sync-new",
            Step::SecondarySwitch => "secondary-switch",
            Step::SecondaryMixed => "secondary-mixed",
            Step::SecondaryUpgradeOld => "secondary-upgrade-old",
            Step::SecondarySyncOld => "secondary-sync-old",
            Step::Retire => "retire",
            Step::AwaitCommit => "await-commit",
            Step::Rollback => "rollback",
        }
    }

    /// Parses a step name.
    pub fn from_name(s: &str) -> Option<Step> {
        Step::FORWARD
            .iter()
            .copied()
            .chain([Step::Rollback])
            .find(|st| st.name() == s)
    }

    /// Procedure step (1-6) this engine step belongs to; `None` for `rollback`.
    pub fn procedure_step(self) -> Option<u8> {
        Some(match self {
            Step::Precheck => 1,
            Step::StartExtras | Step::SyncExtras => 2,
            Step::PrimaryStartNew
            | Step::PrimarySyncNew
            | Step::PrimarySwitch
            | Step::PrimaryMixed
            | Step::PrimaryUpgradeOld
            | Step::PrimarySyncOld => 3,
            Step::SecondaryStartNew
            | Step::SecondarySyncNew
            | Step::SecondarySwitch
            | Step::SecondaryMixed
            | Step::SecondaryUpgradeOld
            | Step::SecondarySyncOld => 5,
            Step::Retire | Step::AwaitCommit => 6,
            Step::Rollback => return None,
        })
    }

    /// Whether the operator may still `abort` (cheap undo, control never left N).
    pub fn abortable(self) -> bool {
        self <= Step::PrimarySyncNew
    }

    pub(super) fn next(self) -> Option<Step> {
        let i = Step::FORWARD.iter().position(|s| *s == self)?;
        Step::FORWARD.get(i + 1).copied()
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

pub(super) fn step_detail(step: Step) -> &'static str {
    match step {
        Step::Precheck => "verifying the HA standby's digest against the instance in control",
        Step::StartExtras => "starting a second instance of the running version on each appliance",
        Step::SyncExtras => "syncing the second instances",
        Step::PrimaryStartNew => {
            "replacing the first appliance's second instance with the target version"
        }
        Step::PrimarySyncNew => "waiting for the target instance to hold sufficient state",
        Step::PrimarySwitch => "switching control to the target version (new epoch)",
        Step::PrimaryMixed => {
            "soaking: target in control, the peer's running-version standby in sync"
        }
        Step::PrimaryUpgradeOld => "replacing the old instance with the target version",
        Step::PrimarySyncOld => "syncing it as local standby",
        Step::SecondaryStartNew => "replacing the peer's second instance with the target version",
        Step::SecondarySyncNew => "syncing it",
        Step::SecondarySwitch => "making it the synchronous HA standby",
        Step::SecondaryMixed => "soaking with mixed versions on the peer appliance",
        Step::SecondaryUpgradeOld => "replacing the peer's old instance with the target version",
        Step::SecondarySyncOld => "syncing it",
        Step::Retire => "stopping the extra instances",
        Step::AwaitCommit => {
            "every instance runs the target; waiting for commit (rollback still possible)"
        }
        Step::Rollback => "rolling back",
    }
}
