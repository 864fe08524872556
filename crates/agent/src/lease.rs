//! Lease-guarded reads (`[witness] reads = "lease"`): the appliance whose front serves the
//! service address holds the pair's lease at the witness, and its front forwards nothing past
//! the moment the lease could have run out there.
//!
//! The front's lease ends at `asked + lease_ms × 9/10`: `asked` is when this host sent the
//! request (the witness started the lease later), and the tenth allows the two clocks to run
//! at rates 10% apart. A promotion's new front forwards nothing until the witness grants it
//! the lease, that is until the old holder's lease has run out or was released: a client
//! never reads, from the old side, a value the new side has already overwritten.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hitless_witness::{Lease, Witness};
use tracing::{debug, info, warn};

use crate::appliance::Appliance;

/// How often the keeper looks whether this appliance serves the address.
const LOOK: Duration = Duration::from_millis(25);

/// The share of the lease the front uses (the rest allows clock rate drift).
fn usable(lease: Duration) -> Duration {
    lease * 9 / 10
}

/// Keeps the lease while this appliance's front serves the address (runs until the process
/// ends; each request is bounded by the witness client's timeout).
pub fn start_keeper(appliance: Arc<Appliance>, witness: Arc<dyn Witness>, lease: Duration) {
    appliance.front().require_read_lease();
    let holder = appliance.id().to_string();
    tokio::spawn(async move {
        let renew_every = lease / 4;
        let mut last_grant: Option<Instant> = None;
        let mut held = false;
        loop {
            tokio::time::sleep(LOOK).await;
            if !appliance.holds_address() {
                if held {
                    held = false;
                    last_grant = None;
                    match witness.release(&holder).await {
                        Ok(()) => info!(
                            "read lease released: this appliance no longer serves the address"
                        ),
                        Err(e) => {
                            debug!("cannot release the read lease (it runs out by itself): {e}")
                        }
                    }
                }
                continue;
            }
            if last_grant.is_some_and(|t| t.elapsed() < renew_every) {
                continue;
            }
            let asked = Instant::now();
            match witness.lease(&holder, lease).await {
                Ok(Lease::Granted { ttl }) => {
                    let valid = usable(ttl.min(lease)).saturating_sub(asked.elapsed());
                    appliance.front().renew_read_lease(valid);
                    if !held {
                        info!(?ttl, "read lease granted: this front serves");
                    }
                    held = true;
                    last_grant = Some(asked);
                }
                Ok(Lease::Refused {
                    holder: h,
                    retry_after,
                }) => {
                    debug!(holder = ?h, ?retry_after, "read lease held elsewhere: this front waits");
                    held = false;
                    last_grant = None;
                }
                Err(e) => {
                    warn!("cannot renew the read lease: {e}; the front stops when it runs out");
                    last_grant = None;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::usable;
    use std::time::Duration;

    #[test]
    fn the_front_uses_less_than_the_lease() {
        let l = Duration::from_millis(2000);
        assert!(usable(l) < l);
        assert_eq!(usable(l), Duration::from_millis(1800));
    }
}
