//! The seeded schedule of `hitless lab check`: which fault each round injects, how long it is
//! held, and whether an ISSU starts while it lasts. A pure function of (seed, rounds, faults,
//! hold): the same arguments give the same schedule, so a failing run can be run again.

use anyhow::bail;
use serde::Serialize;

use hitless_netlab::Partition;

/// A fault the checker can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum Fault {
    /// An nftables partition of the two-host lab.
    Partition(Partition),
    /// kill -9 of the instance in control.
    KillInControl,
    /// kill -9 of an appliance's agent (0: primary, 1: secondary), started again at the heal
    /// on its configuration and journal.
    KillAgent(usize),
    /// SIGSTOP of the driving agent, SIGCONT at the heal.
    PauseAgent,
    /// kill -9 of the witness, started again on the same data at the heal.
    RestartWitness,
}

impl From<Fault> for String {
    fn from(f: Fault) -> String {
        f.name().to_owned()
    }
}

impl Fault {
    /// Every fault, in the order the default list has them.
    pub const ALL: [Fault; 10] = [
        Fault::Partition(Partition::PartitionPeers),
        Fault::Partition(Partition::IsolatePrimary),
        Fault::Partition(Partition::IsolateSecondary),
        Fault::Partition(Partition::OneWayPrimary),
        Fault::Partition(Partition::IsolateWitness),
        Fault::KillInControl,
        Fault::KillAgent(0),
        Fault::KillAgent(1),
        Fault::PauseAgent,
        Fault::RestartWitness,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Partition(p) => p.name(),
            Fault::KillInControl => "kill-in-control",
            Fault::KillAgent(0) => "kill-agent-primary",
            Fault::KillAgent(_) => "kill-agent-secondary",
            Fault::PauseAgent => "pause-agent",
            Fault::RestartWitness => "restart-witness",
        }
    }

    pub fn parse(name: &str) -> anyhow::Result<Fault> {
        match Fault::ALL.into_iter().find(|f| f.name() == name) {
            Some(f) => Ok(f),
            None => bail!(
                "unknown fault {name:?}; the checker knows {}",
                Fault::ALL.map(Fault::name).join(", ")
            ),
        }
    }

    /// Whether the fault needs the two-host lab's network.
    pub fn needs_network(self) -> bool {
        matches!(self, Fault::Partition(_))
    }

    /// Whether the fault needs a witness.
    pub fn needs_witness(self) -> bool {
        self == Fault::RestartWitness
    }
}

/// Parses `--faults a,b,c`; empty entries are refused, duplicates kept once.
pub fn parse_list(list: &str) -> anyhow::Result<Vec<Fault>> {
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim) {
        if name.is_empty() {
            bail!("--faults {list:?} has an empty entry");
        }
        let f = Fault::parse(name)?;
        if !out.contains(&f) {
            out.push(f);
        }
    }
    Ok(out)
}

/// The faults run when `--faults` is not given: every fault the lab can inject (no partition
/// without the two-host network, no witness restart without a witness).
pub fn default_faults(network: bool, witness: bool) -> Vec<Fault> {
    Fault::ALL
        .into_iter()
        .filter(|f| network || !f.needs_network())
        .filter(|f| witness || !f.needs_witness())
        .collect()
}

/// One round of the schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Round {
    pub fault: Fault,
    /// How long the fault is held before it is healed.
    pub hold_ms: u64,
    /// When set, an ISSU is started this many ms before the fault is injected, so that the
    /// fault hits it under way.
    pub issu_lead_ms: Option<u64>,
}

/// A small seeded generator (SplitMix64): the schedule depends on nothing else.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Longest time an ISSU runs before the fault of its round.
pub const MAX_ISSU_LEAD_MS: u64 = 2000;

/// The schedule of `rounds` rounds over `faults`: each round one fault, held `hold_ms` plus
/// up to a quarter more, and on about one round in three an ISSU started up to
/// [`MAX_ISSU_LEAD_MS`] before the fault.
pub fn schedule(seed: u64, rounds: u32, faults: &[Fault], hold_ms: u64) -> Vec<Round> {
    if faults.is_empty() {
        return Vec::new();
    }
    let mut rng = SplitMix64::new(seed);
    (0..rounds)
        .map(|_| {
            let fault = faults[rng.below(faults.len() as u64) as usize];
            let hold = hold_ms + rng.below(hold_ms / 4 + 1);
            let issu = rng.below(3) == 0;
            let lead = rng.below(MAX_ISSU_LEAD_MS + 1);
            Round {
                fault,
                hold_ms: hold,
                issu_lead_ms: issu.then_some(lead),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_another_seed_another() {
        let faults = default_faults(true, true);
        let a = schedule(7, 50, &faults, 3000);
        assert_eq!(a, schedule(7, 50, &faults, 3000));
        assert_eq!(a.len(), 50);
        assert_ne!(a, schedule(8, 50, &faults, 3000));
        // A prefix of a longer run is the shorter run.
        assert_eq!(schedule(7, 10, &faults, 3000)[..], a[..10]);
    }

    #[test]
    fn rounds_stay_within_the_faults_and_bounds_given() {
        let faults = parse_list("isolate-primary,pause-agent").unwrap();
        let s = schedule(1, 200, &faults, 4000);
        assert!(s.iter().all(|r| faults.contains(&r.fault)));
        assert!(s.iter().all(|r| (4000..=5000).contains(&r.hold_ms)));
        assert!(s
            .iter()
            .all(|r| r.issu_lead_ms.is_none_or(|l| l <= MAX_ISSU_LEAD_MS)));
        // Both faults and both kinds of round (with and without an ISSU) occur.
        for f in &faults {
            assert!(s.iter().any(|r| r.fault == *f), "{f:?} never scheduled");
        }
        assert!(s.iter().any(|r| r.issu_lead_ms.is_some()));
        assert!(s.iter().any(|r| r.issu_lead_ms.is_none()));
        assert!(schedule(1, 5, &[], 3000).is_empty());
    }

    #[test]
    fn every_fault_name_parses_back_and_bad_lists_are_refused() {
        for f in Fault::ALL {
            assert_eq!(Fault::parse(f.name()).unwrap(), f);
        }
        assert_eq!(
            parse_list(" isolate-primary , isolate-primary,kill-in-control").unwrap(),
            vec![
                Fault::Partition(Partition::IsolatePrimary),
                Fault::KillInControl
            ]
        );
        let e = parse_list("isolate-primary,melt").unwrap_err();
        assert!(format!("{e:#}").contains("kill-in-control"), "{e:#}");
        assert!(parse_list("isolate-primary,,pause-agent").is_err());
    }

    #[test]
    fn the_default_list_leaves_out_what_the_lab_cannot_inject() {
        assert_eq!(default_faults(true, true).len(), Fault::ALL.len());
        assert!(!default_faults(true, false).contains(&Fault::RestartWitness));
        assert!(default_faults(false, true)
            .iter()
            .all(|f| !matches!(f, Fault::Partition(_))));
    }
}
