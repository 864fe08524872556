//! The pair's witness client, built from the agent's `[witness]` section.

use std::sync::Arc;
use std::time::Duration;

use hitless_witness::{Witness, WitnessError, WitnessKind};

use crate::config::WitnessSection;

/// The witness client `section` names (none for `kind = "none"`). A witness that cannot be
/// reached yet is not an error here: its client connects when first asked, and until then
/// the engine makes no control change.
pub async fn connect(section: &WitnessSection) -> Result<Option<Arc<dyn Witness>>, WitnessError> {
    let timeout = Duration::from_millis(section.timeout_ms);
    match section.kind {
        WitnessKind::None => Ok(None),
        kind => Err(WitnessError::Config(format!(
            "this build has no {kind} witness client yet (endpoints {:?}, timeout {timeout:?})",
            section.endpoints
        ))),
    }
}
